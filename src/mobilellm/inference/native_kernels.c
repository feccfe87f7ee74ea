/* Native CPU forward pass for mobilellm's generation engine (built and loaded by native.py).

One call, mobilellm_forward, runs the whole network for a set of tokens: a prefill chunk of one
prompt and a batched decode step alike. Each token names its KV-cache row and its position; it
writes its keys/values there and attends to columns 0..position of that row, so a prefill chunk is
causal and rows of a batch never see each other.

Weights are fp32, fp16, bf16, int8 with one scale per output row, or int4 in groups of 32 input
columns. Float weights multiply fp32 activations; integer weights multiply activations quantized
per token to int8 (quantize.py's rule) on integer dot products, scales applied in fp32 (see the
integer section below). The KV cache, attention and the residual stream stay fp32. At batch 1 a CPU spends the token streaming weights from memory, so the point
of this file is to do that with nothing between the matrix products: one call per token instead of
a few hundred framework ops. Plain C loops that the compiler vectorizes (-O3 -march=native), with
OpenMP threads splitting the output rows of each matrix and the (token, head) pairs of attention.
The integer dot products have per-ISA versions chosen at run time: AVX-512 VNNI and AVX2 on x86-64,
NEON dot products (Armv8.2 DotProd, read from HWCAP on Linux) on ARM64, plain C everywhere else.
*/
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>

enum { W_F32 = 0, W_F16 = 1, W_BF16 = 2, W_I8 = 3, W_I4 = 4 };

typedef struct {
    const void *data;     /* (rows, cols), row-major, in `type`; int4: (rows, cols / 2) bytes, see dot_i4 */
    const float *scale;   /* int8: one per row; int4: (rows, cols / 32); otherwise NULL */
    int32_t type, rows, cols;
    const void *aux;      /* int8: int32 sum of each row's integers; int4: fp32 sum of each row's
                             dequantized weights (the activation zero point's share); otherwise NULL */
} Matrix;

typedef struct {
    const float *ln1, *ln2;
    Matrix qkv;           /* q rows, k rows (both with RoPE pairs adjacent), v rows */
    Matrix o, up, down;   /* up: gate rows then up rows (SwiGLU) or up rows (ReLU) */
} Block;

typedef struct {
    int32_t dim, n_heads, n_kv, head_dim, ffn, vocab, n_logical, max_batch, max_len, swiglu;
    float eps;
    const int32_t *layer_to_block;  /* n_logical entries: the physical block each logical layer runs */
    const Block *blocks;
    const float *embed;             /* (vocab, dim) */
    const float *norm;
    Matrix head;
    const float *rope_cos, *rope_sin;  /* (max_len, head_dim / 2) */
    float *k_cache, *v_cache;       /* (n_logical, max_batch, n_kv, max_len, head_dim) */
} Net;

#if defined(__x86_64__)
#include <immintrin.h>  /* also for the integer kernels, compiled per instruction set (target attributes) */
#endif
#if defined(__AVX512F__)
#define HAVE_AVX512 1
#endif

#if defined(__x86_64__)
/* [sum a, sum b, sum c, sum d] of 4 vectors' lanes in about a quarter of the work of 4 separate
   reductions (see reduce4_epi32); AVX-512F only, so the float path and the VNNI kernels share it */
static inline __attribute__((target("avx2,fma,avx512f"))) __m128 reduce4_ps(__m512 a, __m512 b, __m512 c, __m512 d) {
    const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    const __m512d abd = _mm512_castps_pd(ab), cdd = _mm512_castps_pd(cd);
    const __m512 abcd = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(abd, cdd)), _mm512_castpd_ps(_mm512_unpackhi_pd(abd, cdd)));
    const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(abcd),
                                      _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(abcd), 1)));
    return _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
}
#endif

/* Weight element k of a float matrix m as fp32. */
static inline float weight_at(const Matrix *m, size_t k) {
    switch (m->type) {
    case W_F16: return (float)((const _Float16 *)m->data)[k];
    case W_BF16: {  /* bf16 is the top half of an fp32 */
        const uint32_t bits = (uint32_t)((const uint16_t *)m->data)[k] << 16;
        float f;
        memcpy(&f, &bits, sizeof f);
        return f;
    }
    default: return ((const float *)m->data)[k];
    }
}

#ifdef HAVE_AVX512
/* 16 weights from element `at` on, as fp32 */
static inline __m512 load16(const Matrix *m, size_t at) {
    switch (m->type) {
    case W_F16: return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)m->data + at)));
    case W_BF16: {
        const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)m->data + at)));
        return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
    }
    default: return _mm512_loadu_ps((const float *)m->data + at);
    }
}
#endif

/* Row r of m as fp32 in buf (or a pointer into m itself when it is fp32). */
static const float *row_f32(const Matrix *m, int r, float *buf) {
    const size_t off = (size_t)r * m->cols;
    if (m->type == W_F32) return (const float *)m->data + off;
    int k = 0;
#ifdef HAVE_AVX512
    for (; k + 16 <= m->cols; k += 16) _mm512_storeu_ps(buf + k, load16(m, off + k));
#endif
    for (; k < m->cols; k++) buf[k] = weight_at(m, off + k);
    return buf;
}

static inline float dot(const float *restrict w, const float *restrict x, int n) {
    float a = 0.f;
#pragma omp simd reduction(+ : a)
    for (int k = 0; k < n; k++) a += w[k] * x[k];
    return a;
}

/* Row r of m . x, reading the row in its own type (one token: the weights are read once, straight
   from memory, which is all a decode step does). */
static float dot_row(const Matrix *m, int r, const float *x) {
    const size_t off = (size_t)r * m->cols;
    int k = 0;
    float acc = 0.f;
#ifdef HAVE_AVX512
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();  /* two chains hide the FMA latency */
    for (; k + 32 <= m->cols; k += 32) {
        a0 = _mm512_fmadd_ps(load16(m, off + k), _mm512_loadu_ps(x + k), a0);
        a1 = _mm512_fmadd_ps(load16(m, off + k + 16), _mm512_loadu_ps(x + k + 16), a1);
    }
    for (; k + 16 <= m->cols; k += 16) a0 = _mm512_fmadd_ps(load16(m, off + k), _mm512_loadu_ps(x + k), a0);
    acc = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#endif
    for (; k < m->cols; k++) acc += weight_at(m, off + k) * x[k];
    return acc;
}

/* out[i][j] = w[i] . x[j] for up to 4 rows and 4 tokens: each weight and activation value loaded
   once feeds 4 products (many tokens: prefill is compute-bound). */
static void tile(const float *const *w, int nr, const float *x, int ldx, int nt, int n, float out[4][4]) {
#ifdef HAVE_AVX512
    if (nr == 4 && nt == 4 && n % 16 == 0) {
        __m512 acc[4][4];
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < 4; j++) acc[i][j] = _mm512_setzero_ps();
        for (int k = 0; k < n; k += 16) {
            __m512 xs[4];
            for (int j = 0; j < 4; j++) xs[j] = _mm512_loadu_ps(x + (size_t)j * ldx + k);
            for (int i = 0; i < 4; i++) {
                const __m512 wk = _mm512_loadu_ps(w[i] + k);
                for (int j = 0; j < 4; j++) acc[i][j] = _mm512_fmadd_ps(wk, xs[j], acc[i][j]);
            }
        }
        for (int j = 0; j < 4; j++) {
            float sums[4];
            _mm_storeu_ps(sums, reduce4_ps(acc[0][j], acc[1][j], acc[2][j], acc[3][j]));
            for (int i = 0; i < 4; i++) out[i][j] = sums[i];
        }
        return;
    }
#endif
    for (int i = 0; i < nr; i++)
        for (int j = 0; j < nt; j++) out[i][j] = dot(w[i], x + (size_t)j * ldx, n);
}

#ifdef HAVE_AVX512
/* e^x for 16 lanes: 2^n * e^r with n = round(x / ln 2), |r| <= ln2 / 2, a degree-6 polynomial for
   e^r (relative error ~1e-7, like expf); lanes below -87 give 0 (they are softmax's masked tail). */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
    const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
    const __m512 r2 = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);  /* ln 2 in two parts */
    __m512 p = _mm512_set1_ps(1.f / 720);
    p = _mm512_fmadd_ps(p, r2, _mm512_set1_ps(1.f / 120));
    p = _mm512_fmadd_ps(p, r2, _mm512_set1_ps(1.f / 24));
    p = _mm512_fmadd_ps(p, r2, _mm512_set1_ps(1.f / 6));
    p = _mm512_fmadd_ps(p, r2, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r2, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r2, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}
#endif

/* softmax(scores[0..len)) in place */
static void softmax(float *scores, int len) {
    float top = -INFINITY, sum = 0.f;
    for (int j = 0; j < len; j++) top = scores[j] > top ? scores[j] : top;
    int j = 0;
#ifdef HAVE_AVX512
    const __m512 shift = _mm512_set1_ps(top);
    __m512 total = _mm512_setzero_ps();
    for (; j + 16 <= len; j += 16) {
        const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(scores + j), shift));
        _mm512_storeu_ps(scores + j, e);
        total = _mm512_add_ps(total, e);
    }
    sum = _mm512_reduce_add_ps(total);
#endif
    for (; j < len; j++) sum += scores[j] = expf(scores[j] - top);
    const float inv = 1.f / sum;
    for (j = 0; j < len; j++) scores[j] *= inv;
}

/* q . k over one head (head_dim values) */
/* scores[j] = q . k_j * scale for `len` cached keys (rows of hd values), 4 keys per step where
   hd % 16 == 0 (one reduction for 4 scores: a 512-token prompt computes ~10^7 of them) */
static void head_scores(const float *q, const float *K, int hd, int len, float scale, float *scores);

static inline float dot_head(const float *q, const float *k, int hd) {
#ifdef HAVE_AVX512
    if (hd % 16 == 0) {
        __m512 a = _mm512_setzero_ps();
        for (int d = 0; d < hd; d += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), _mm512_loadu_ps(k + d), a);
        return _mm512_reduce_add_ps(a);
    }
#endif
    return dot(q, k, hd);
}

static void head_scores(const float *q, const float *K, int hd, int len, float scale, float *scores) {
    int j = 0;
#ifdef HAVE_AVX512
    if (hd % 16 == 0)
        for (; j + 4 <= len; j += 4) {
            __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
            for (int d = 0; d < hd; d += 16) {
                const __m512 qd = _mm512_loadu_ps(q + d);
                for (int i = 0; i < 4; i++) acc[i] = _mm512_fmadd_ps(qd, _mm512_loadu_ps(K + (size_t)(j + i) * hd + d), acc[i]);
            }
            _mm_storeu_ps(scores + j, _mm_mul_ps(reduce4_ps(acc[0], acc[1], acc[2], acc[3]), _mm_set1_ps(scale)));
        }
#endif
    for (; j < len; j++) scores[j] = dot_head(q, K + (size_t)j * hd, hd) * scale;
}

/* out = sum_j p[j] * V[j] over `len` cached values (rows of hd values); the sum kept in registers
   where hd is a multiple of 16 up to 128 */
static void weighted_values(const float *p, const float *V, int hd, int len, float *out) {
#ifdef HAVE_AVX512
    if (hd % 16 == 0 && hd <= 128) {
        __m512 acc[8];
        const int nv = hd / 16;
        for (int v = 0; v < nv; v++) acc[v] = _mm512_setzero_ps();
        for (int j = 0; j < len; j++) {
            const __m512 pj = _mm512_set1_ps(p[j]);
            for (int v = 0; v < nv; v++) acc[v] = _mm512_fmadd_ps(pj, _mm512_loadu_ps(V + (size_t)j * hd + 16 * v), acc[v]);
        }
        for (int v = 0; v < nv; v++) _mm512_storeu_ps(out + 16 * v, acc[v]);
        return;
    }
#endif
    memset(out, 0, sizeof(float) * hd);
    for (int j = 0; j < len; j++) {
        const float pj = p[j], *vj = V + (size_t)j * hd;
#pragma omp simd
        for (int k = 0; k < hd; k++) out[k] += pj * vj[k];
    }
}

static inline void put(float *out, float value, int add) { *out = add ? *out + value : value; }

#if defined(HAVE_AVX512) && defined(__AVX512BF16__)
#define HAVE_BF16_DOT 1
/* n fp32 values (n % 32 == 0) as bf16, rounded to nearest even */
static void to_bf16(const float *x, uint16_t *out, int n) {
    for (int k = 0; k < n; k += 32)
        _mm512_storeu_si512(out + k, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + k + 16), _mm512_loadu_ps(x + k)));
}

/* Row r of m as bf16 (in place: bf16 weights are the only ones that take this path). */
static const uint16_t *row_bf16(const Matrix *m, int r, uint16_t *dst, float *tmp) {
    if (m->type == W_BF16) return (const uint16_t *)m->data + (size_t)r * m->cols;
    to_bf16(row_f32(m, r, tmp), dst, m->cols);
    return dst;
}

/* out[i][j] = w[i] . x[j] in bf16 (n % 32 == 0) for up to 4 rows and 4 tokens: the bf16
   dot-product instruction does twice the products of an fp32 FMA. Forced inline: called from
   matmul, GCC 12 kept it out of line and the 16 sums out of registers (prefill ~15% slower). */
static inline __attribute__((always_inline)) void tile_bf16(const uint16_t *const *w, int nr, const uint16_t *x, int ldx, int nt, int n, float out[4][4]) {
    __m512 acc[4][4];
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++) acc[i][j] = _mm512_setzero_ps();
    for (int k = 0; k < n; k += 32) {
        __m512bh xs[4];
        for (int j = 0; j < nt; j++) xs[j] = (__m512bh)_mm512_loadu_si512(x + (size_t)j * ldx + k);
        for (int i = 0; i < nr; i++) {
            const __m512bh wk = (__m512bh)_mm512_loadu_si512(w[i] + k);
            for (int j = 0; j < nt; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], wk, xs[j]);
        }
    }
    for (int i = 0; i < nr; i++)
        for (int j = 0; j < nt; j++) out[i][j] = _mm512_reduce_add_ps(acc[i][j]);
}
#endif

/* ---- integer weights: int8 rows and int4 groups times int8 activations ------------------------
   Each token's activations are quantized once per matrix by quantize.py's rule (asymmetric min-max
   over the row, zero point zp in [-128, 127]) and stored as u = q + 128 in [0, 255]: the unsigned
   operand the u8 x s8 dot-product instructions take. With zpu = zp + 128, u - zpu = q - zp, so
     int8: y = wscale[r] * xscale * (sum_k u_k w_k - zpu * sum_k w_k)     exact int32 sums
     int4: y = xscale * (sum_g s_g * sum_{k in g} u_k w_k - zpu * sum_k s_g(k) w_k)
   The instruction set is picked at run time (mobilellm_isa): AVX-512 VNNI, AVX2, NEON dot products
   (aarch64, below), or plain C. */

enum { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_VNNI = 2 };

/* calls of at most this many tokens (decode steps) normalize and quantize activations in every
   thread instead of splitting them: a few hundred values, cheaper than the barrier it saves */
#define SMALL_N 8

typedef struct {
    uint8_t *q;      /* (n, ld) quantized activations, u = q + 128 */
    float *scale;    /* (n,) */
    int32_t *zero;   /* (n,) zpu = zero point + 128 */
    int ld;
} QActs;

/* Position of activation k in the quad order the VNNI int4 kernel reads (see dot4_i4_quads): within
   each run of 4 groups (128 values; the last run may have fewer, t), first values 0-15 of the t
   groups, then values 16-31. Runs of 16 values stay together. */
static inline int quad_position(int k, int cols) {
    const int q = k / 128 * 128, r = k - q, t = cols - q < 128 ? (cols - q) / 32 : 4;
    const int g = r / 32, j = r % 32;
    return q + (j < 16 ? 16 * g + j : 16 * t + 16 * g + j - 16);
}

static void quantize_row(const float *x, int cols, uint8_t *u, float *scale, int32_t *zero, int quads) {
    const float eps = 1.1920928955078125e-07f;  /* float32 eps: quantize._EPS */
    float lo = 0.f, hi = 0.f;                   /* the range always holds 0 */
    int k = 0;
#ifdef HAVE_AVX512
    __m512 vlo = _mm512_setzero_ps(), vhi = _mm512_setzero_ps();
    for (; k + 16 <= cols; k += 16) {
        const __m512 v = _mm512_loadu_ps(x + k);
        vlo = _mm512_min_ps(vlo, v);
        vhi = _mm512_max_ps(vhi, v);
    }
    lo = _mm512_reduce_min_ps(vlo);
    hi = _mm512_reduce_max_ps(vhi);
#endif
    for (; k < cols; k++) { lo = x[k] < lo ? x[k] : lo; hi = x[k] > hi ? x[k] : hi; }
    float s = (hi - lo) / 255.f;
    s = s > eps ? s : eps;
    float z = -128.f - nearbyintf(lo / s);  /* round half to even, as torch.round */
    z = z < -128.f ? -128.f : (z > 127.f ? 127.f : z);
    const float inv = 1.f / s;
    k = 0;
#ifdef HAVE_AVX512
    if (cols % 16 == 0) {  /* 16 values at a time: rounded to nearest even (the default mode), clamped */
        const __m512 vz = _mm512_set1_ps(z + 128.f), vinv = _mm512_set1_ps(inv);
        for (; k < cols; k += 16) {
            const __m512 q = _mm512_add_ps(_mm512_roundscale_ps(_mm512_mul_ps(_mm512_loadu_ps(x + k), vinv),
                                                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), vz);
            const __m512 c = _mm512_min_ps(_mm512_max_ps(q, _mm512_setzero_ps()), _mm512_set1_ps(255.f));
            _mm_storeu_si128((__m128i *)(u + (quads ? quad_position(k, cols) : k)), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(c)));
        }
    }
#endif
    for (; k < cols; k++) {
        float q = nearbyintf(x[k] * inv) + z;
        q = q < -128.f ? -128.f : (q > 127.f ? 127.f : q);
        u[quads ? quad_position(k, cols) : k] = (uint8_t)((int)q + 128);
    }
    *scale = s;
    *zero = (int32_t)z + 128;
}

/* int4 weights: group g of a row (32 values) is 16 bytes, byte j = value j (low nibble) and value
   j + 16 (high nibble), each stored as value + 8 in [0, 15]; unpacking is a mask and a shift. */
static inline int nibble(uint8_t b, int high) { return ((high ? b >> 4 : b) & 15) - 8; }

/* Each kernel takes 4 rows at once (w[0..3], s[0..3]: their weights and int4 scales; a tail of fewer
   rows repeats the last one): 4 independent sums hide the dot-product instructions' latency, and each
   activation vector loaded feeds 4 rows. */

static void dot4_i8_scalar(const uint8_t *u, const int8_t *const *w, int n, int32_t *out) {
    for (int i = 0; i < 4; i++) {
        int32_t acc = 0;
        for (int k = 0; k < n; k++) acc += (int32_t)u[k] * w[i][k];
        out[i] = acc;
    }
}

static void dot4_i4_scalar(const uint8_t *u, const uint8_t *const *w, const float *const *s, int groups, float *out) {
    for (int i = 0; i < 4; i++) {
        float acc = 0.f;
        for (int g = 0; g < groups; g++) {
            int32_t sum = 0;
            for (int j = 0; j < 16; j++)
                sum += (int32_t)u[32 * g + j] * nibble(w[i][16 * g + j], 0) +
                       (int32_t)u[32 * g + 16 + j] * nibble(w[i][16 * g + j], 1);
            acc += s[i][g] * (float)sum;
        }
        out[i] = acc;
    }
}

#if defined(__x86_64__)
/* At batch 1 the weights stream from DRAM and the hardware prefetcher falls behind: fetch
   PREFETCH_BYTES ahead explicitly. int8 decode reads a step's 4 rows one after another (in address
   order: 2 threads, 125M, 1.2-1.3x the decode speed of reading them side by side, 2026-12-03); int4
   reads them side by side, which measured faster for it (its rows are half as long). */
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 8192
#endif
#define AVX2 __attribute__((target("avx2,fma")))
#define VNNI __attribute__((target("avx2,fma,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")))

static AVX2 inline int32_t hsum8(__m256i v) {
    __m128i x = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    x = _mm_add_epi32(x, _mm_shuffle_epi32(x, 0x4e));
    return _mm_cvtsi128_si32(_mm_add_epi32(x, _mm_shuffle_epi32(x, 0xb1)));
}

static AVX2 inline float hsum8f(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}

/* u8 x s8 products widened to int16 and summed in pairs exactly (maddubs would saturate at
   255 * 127 * 2): 16 activations (as int16) times 16 weights -> 8 int32 */
static AVX2 inline __m256i madd16(__m256i x16, __m128i w) { return _mm256_madd_epi16(x16, _mm256_cvtepi8_epi16(w)); }

static AVX2 inline __m256i widen16(const uint8_t *u) { return _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)u)); }

static AVX2 void dot4_i8_avx2(const uint8_t *u, const int8_t *const *w, int n, int32_t *out) {
    __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
    int k = 0;
    for (; k + 16 <= n; k += 16) {
        const __m256i x = widen16(u + k);
        for (int i = 0; i < 4; i++) acc[i] = _mm256_add_epi32(acc[i], madd16(x, _mm_loadu_si128((const __m128i *)(w[i] + k))));
    }
    const int8_t *tail[4] = {w[0] + k, w[1] + k, w[2] + k, w[3] + k};
    dot4_i8_scalar(u + k, tail, n - k, out);
    for (int i = 0; i < 4; i++) out[i] += hsum8(acc[i]);
}

/* 16 packed bytes -> the group's 32 values: low nibbles then high nibbles, less 8 */
static AVX2 inline void unpack_group(const uint8_t *w, __m128i *lo, __m128i *hi) {
    const __m128i b = _mm_loadu_si128((const __m128i *)w), m = _mm_set1_epi8(15), eight = _mm_set1_epi8(8);
    *lo = _mm_sub_epi8(_mm_and_si128(b, m), eight);
    *hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(b, 4), m), eight);
}

static AVX2 void dot4_i4_avx2(const uint8_t *u, const uint8_t *const *w, const float *const *s, int groups, float *out) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int g = 0; g < groups; g++) {
        const __m256i xlo = widen16(u + 32 * g), xhi = widen16(u + 32 * g + 16);
        for (int i = 0; i < 4; i++) {
            __m128i lo, hi;
            unpack_group(w[i] + 16 * g, &lo, &hi);
            const __m256i sum = _mm256_add_epi32(madd16(xlo, lo), madd16(xhi, hi));
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_set1_ps(s[i][g]), acc[i]);
        }
    }
    for (int i = 0; i < 4; i++) out[i] = hsum8f(acc[i]);
}

/* the sums of 4 vectors' lanes at once (reduce4_ps below, in int32): two rounds of interleave-and-add
   leave, in each 128-bit lane, [a b c d] partial sums, then the 4 lanes are added (a quarter of 4
   separate reductions; with 576-column rows the reductions cost as much as the products) */
static VNNI inline __m128i reduce4_epi32(__m512i a, __m512i b, __m512i c, __m512i d) {
    const __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
    const __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
    const __m512i abcd = _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
    const __m256i half = _mm256_add_epi32(_mm512_castsi512_si256(abcd), _mm512_extracti64x4_epi64(abcd, 1));
    return _mm_add_epi32(_mm256_castsi256_si128(half), _mm256_extracti128_si256(half, 1));
}

/* 4 rows times NT tokens (1 or 4): each weight vector loaded feeds NT tokens (prefill is
   compute-bound); a tail of fewer than 64 columns goes to the AVX2 kernel */
static VNNI inline __attribute__((always_inline)) void dot4_i8_tile(const uint8_t *const *u, const int NT,
                                                                    const int8_t *const *w, int n, int32_t out[4][4]) {
    __m512i acc[4][4];
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < NT; j++) acc[i][j] = _mm512_setzero_si512();
    int k = 0;
    if (NT == 1) {  /* decode: the 4 rows one after another, in address order (one stream to prefetch) */
        const int end = n / 64 * 64;
        for (int i = 0; i < 4; i++) {
            __m512i a = _mm512_setzero_si512(), b = _mm512_setzero_si512();  /* two chains: dpbusd latency */
            int kk = 0;
            for (; kk + 128 <= end; kk += 128) {
                _mm_prefetch((const char *)(w[i] + kk) + PREFETCH_BYTES, _MM_HINT_T0);
                _mm_prefetch((const char *)(w[i] + kk) + PREFETCH_BYTES + 64, _MM_HINT_T0);
                a = _mm512_dpbusd_epi32(a, _mm512_loadu_si512(u[0] + kk), _mm512_loadu_si512(w[i] + kk));
                b = _mm512_dpbusd_epi32(b, _mm512_loadu_si512(u[0] + kk + 64), _mm512_loadu_si512(w[i] + kk + 64));
            }
            if (kk < end) a = _mm512_dpbusd_epi32(a, _mm512_loadu_si512(u[0] + kk), _mm512_loadu_si512(w[i] + kk));
            acc[i][0] = _mm512_add_epi32(a, b);
        }
        k = end;
    } else
    for (; k + 64 <= n; k += 64) {
        __m512i x[4];
        for (int j = 0; j < NT; j++) x[j] = _mm512_loadu_si512(u[j] + k);
        for (int i = 0; i < 4; i++) {
            if (NT == 1) _mm_prefetch((const char *)(w[i] + k) + PREFETCH_BYTES, _MM_HINT_T0);
            const __m512i wk = _mm512_loadu_si512(w[i] + k);
            for (int j = 0; j < NT; j++) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], x[j], wk);
        }
    }
    const int8_t *tail[4] = {w[0] + k, w[1] + k, w[2] + k, w[3] + k};
    for (int j = 0; j < NT; j++) {
        int32_t rest[4], sums[4];
        dot4_i8_avx2(u[j] + k, tail, n - k, rest);
        _mm_storeu_si128((__m128i *)sums, reduce4_epi32(acc[0][j], acc[1][j], acc[2][j], acc[3][j]));
        for (int i = 0; i < 4; i++) out[i][j] = rest[i] + sums[i];
    }
}

static VNNI void dot4_i8_vnni(const uint8_t *const *u, int nt, const int8_t *const *w, int n, int32_t out[4][4]) {
    if (nt == 4) return dot4_i8_tile(u, 4, w, n, out);
    for (int j = 0; j < nt; j++) {
        int32_t one[4][4];
        dot4_i8_tile(u + j, 1, w, n, one);
        for (int i = 0; i < 4; i++) out[i][j] = one[i][0];
    }
}

/* 4 groups per step, for NT tokens (1 or 4) at once: the 4 groups' 64 packed bytes are one load,
   and a mask and a shift give the low nibbles (values 0-15 of each group) and the high ones (values
   16-31), which the activations in quad order (quantize_row) match byte for byte. int32 lane l sums 4
   products of group l / 4, so one scale vector [s0 x4, s1 x4, s2 x4, s3 x4] applies them. The
   nibbles stay + 8 (unsigned): each token's sums start from -8 * its activations' sums. A last step
   of t < 4 groups is the same with masked loads (zero lanes add nothing). */
static VNNI inline __attribute__((always_inline)) void quad_step(const uint8_t *const *u, const int NT,
                                                                 const uint8_t *const *w, const float *const *s, int g,
                                                                 const int t, const __mmask64 bytes, __m512 acc[4][4]) {
    const __m512i nib = _mm512_set1_epi8(15), minus8 = _mm512_set1_epi8(-8);
    const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    __m512i xlo[4], xhi[4], start[4];
    for (int j = 0; j < NT; j++) {
        xlo[j] = t == 4 ? _mm512_loadu_si512(u[j] + 32 * g) : _mm512_maskz_loadu_epi8(bytes, u[j] + 32 * g);
        xhi[j] = t == 4 ? _mm512_loadu_si512(u[j] + 32 * g + 64) : _mm512_maskz_loadu_epi8(bytes, u[j] + 32 * g + 16 * t);
        start[j] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), xlo[j], minus8), xhi[j], minus8);
    }
    for (int i = 0; i < 4; i++) {
        if (NT == 1) _mm_prefetch((const char *)(w[i] + 16 * g) + PREFETCH_BYTES, _MM_HINT_T0);
        const __m512i b = t == 4 ? _mm512_loadu_si512(w[i] + 16 * g) : _mm512_maskz_loadu_epi8(bytes, w[i] + 16 * g);
        const __m512i lo = _mm512_and_si512(b, nib), hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), nib);
        const __m128 s4 = t == 4 ? _mm_loadu_ps(s[i] + g) : _mm_maskz_loadu_ps((1 << t) - 1, s[i] + g);
        const __m512 scale = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(s4));
        for (int j = 0; j < NT; j++) {
            const __m512i sum = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(start[j], xlo[j], lo), xhi[j], hi);
            acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, acc[i][j]);
        }
    }
}

static VNNI inline __attribute__((always_inline)) void dot4_i4_quads(const uint8_t *const *u, const int NT,
                                                                     const uint8_t *const *w, const float *const *s,
                                                                     int groups, float out[4][4]) {
    __m512 acc[4][4];
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < NT; j++) acc[i][j] = _mm512_setzero_ps();
    for (int g = 0; g < groups; g += 4) {
        const int t = groups - g < 4 ? groups - g : 4;
        if (t == 4) quad_step(u, NT, w, s, g, 4, ~0ULL, acc);  /* full steps: plain loads (masked ones streamed
                                                                  from memory ran at half the speed) */
        else quad_step(u, NT, w, s, g, t, (1ULL << (16 * t)) - 1, acc);
    }
    for (int j = 0; j < NT; j++) {
        float sums[4];
        _mm_storeu_ps(sums, reduce4_ps(acc[0][j], acc[1][j], acc[2][j], acc[3][j]));
        for (int i = 0; i < 4; i++) out[i][j] = sums[i];
    }
}

static VNNI void dot4_i4_vnni(const uint8_t *const *u, int nt, const uint8_t *const *w, const float *const *s,
                              int groups, float out[4][4]) {
    if (nt == 4) return dot4_i4_quads(u, 4, w, s, groups, out);
    for (int j = 0; j < nt; j++) {
        float one[4][4];
        dot4_i4_quads(u + j, 1, w, s, groups, one);
        for (int i = 0; i < 4; i++) out[i][j] = one[i][0];
    }
}
#endif

/* GCC's arm_neon.h declares the dot products whatever -march says; older Clang's only with +dotprod */
#if defined(__aarch64__) && (defined(__ARM_FEATURE_DOTPROD) || !defined(__clang__))
#define HAVE_NEON_DOT 1
/* ARM64: the dot-product instructions (Armv8.2 DotProd; phones since 2018). They take u8 x u8 or
   s8 x s8, not u8 x s8, so the weights are made unsigned and the excess comes off once per 4 rows:
     int8: sum u (w + 128) - 128 sum u        int4: sum u (w + 8) - 8 sum u   (the nibbles as stored)
   in uint32 lanes, wrapping exactly like int32 (the true sums fit), so the results are the scalar
   kernels' bits. Built with a target attribute when the compiler's -march lacks dotprod (a CPU with
   DotProd is Armv8.2 or later) and chosen at run time from the CPU's HWCAP (Linux), so a generic
   armv8-a build still uses them and a CPU without them runs plain C. */
#include <arm_neon.h>
#if defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#endif
#ifdef __ARM_FEATURE_DOTPROD
#define DOTPROD
#else
#define DOTPROD __attribute__((target("arch=armv8.2-a+dotprod")))  /* as arm_neon.h declares vdotq */
#endif

enum { ISA_NEON = 3 };  /* after the x86 ones: mobilellm_isa's numbers are native.ISAS's */

static int have_dotprod(void) {
#if defined(__linux__)
    return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#elif defined(__ARM_FEATURE_DOTPROD)
    return 1;
#else
    return 0;
#endif
}

/* [sum of a's lanes, of b's, of c's, of d's] */
static DOTPROD inline uint32x4_t hsum4(uint32x4_t a, uint32x4_t b, uint32x4_t c, uint32x4_t d) {
    return vpaddq_u32(vpaddq_u32(a, b), vpaddq_u32(c, d));
}

static DOTPROD void dot4_i8_neon(const uint8_t *u, const int8_t *const *w, int n, int32_t *out) {
    const uint8x16_t flip = vdupq_n_u8(0x80), ones = vdupq_n_u8(1);
    uint32x4_t acc[4] = {vdupq_n_u32(0), vdupq_n_u32(0), vdupq_n_u32(0), vdupq_n_u32(0)}, su = vdupq_n_u32(0);
    int k = 0;
    for (; k + 16 <= n; k += 16) {
        const uint8x16_t x = vld1q_u8(u + k);
        su = vdotq_u32(su, x, ones);
        for (int i = 0; i < 4; i++) acc[i] = vdotq_u32(acc[i], x, veorq_u8(vld1q_u8((const uint8_t *)w[i] + k), flip));
    }
    const int8_t *tail[4] = {w[0] + k, w[1] + k, w[2] + k, w[3] + k};
    dot4_i8_scalar(u + k, tail, n - k, out);
    uint32_t sums[4];
    vst1q_u32(sums, vsubq_u32(hsum4(acc[0], acc[1], acc[2], acc[3]), vdupq_n_u32(128 * vaddvq_u32(su))));
    for (int i = 0; i < 4; i++) out[i] += (int32_t)sums[i];
}

/* The group sums of 4 rows side by side, then one fma per group in dot4_i4_scalar's order: its
   bits where the compiler fuses `acc += s * sum` there (GCC and Clang do by default). */
static DOTPROD void dot4_i4_neon(const uint8_t *u, const uint8_t *const *w, const float *const *s, int groups, float *out) {
    const uint8x16_t m = vdupq_n_u8(15), ones = vdupq_n_u8(1);
    float32x4_t acc = vdupq_n_f32(0.f);
    for (int g = 0; g < groups; g++) {
        const uint8x16_t xlo = vld1q_u8(u + 32 * g), xhi = vld1q_u8(u + 32 * g + 16);
        const uint32x4_t su = vdotq_u32(vdotq_u32(vdupq_n_u32(0), xlo, ones), xhi, ones);
        const uint32x4_t start = vmulq_n_u32(su, (uint32_t)-8);  /* -8 sum u, lane by lane (mod 2^32) */
        uint32x4_t sum[4];
        for (int i = 0; i < 4; i++) {
            const uint8x16_t b = vld1q_u8(w[i] + 16 * g);
            sum[i] = vdotq_u32(vdotq_u32(start, xlo, vandq_u8(b, m)), xhi, vshrq_n_u8(b, 4));
        }
        const float scale[4] = {s[0][g], s[1][g], s[2][g], s[3][g]};
        acc = vfmaq_f32(acc, vcvtq_f32_s32(vreinterpretq_s32_u32(hsum4(sum[0], sum[1], sum[2], sum[3]))), vld1q_f32(scale));
    }
    vst1q_f32(out, acc);
}
#endif

static int isa = -1;  /* chosen on first use */

/* The integer kernels' instruction set: `force` >= 0 asks for one (capped at what the CPU has),
   -1 keeps the current choice (the best the CPU has on first use). Returns the one in use. */
int mobilellm_isa(int force) {
    int best = ISA_SCALAR;
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = ISA_AVX2;
    if (best == ISA_AVX2 && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vnni"))
        best = ISA_VNNI;
#elif defined(HAVE_NEON_DOT)
    if (have_dotprod()) best = ISA_NEON;
    if (force > ISA_SCALAR && force < ISA_NEON) force = ISA_SCALAR;  /* x86's: none here */
#endif
    if (force >= 0) isa = force < best ? force : best;
    else if (isa < 0) isa = best;
    return isa;
}

/* out[i][j] = row i . token j for 4 rows and nt <= 4 tokens (exact int32 sums) */
static void dot4_i8(const uint8_t *const *u, int nt, const int8_t *const *w, int n, int32_t out[4][4]) {
#if defined(__x86_64__)
    if (isa == ISA_VNNI) return dot4_i8_vnni(u, nt, w, n, out);
#endif
    for (int j = 0; j < nt; j++) {
        int32_t one[4];
#if defined(__x86_64__)
        if (isa == ISA_AVX2) dot4_i8_avx2(u[j], w, n, one);
        else
#elif defined(HAVE_NEON_DOT)
        if (isa == ISA_NEON) dot4_i8_neon(u[j], w, n, one);
        else
#endif
            dot4_i8_scalar(u[j], w, n, one);
        for (int i = 0; i < 4; i++) out[i][j] = one[i];
    }
}

/* out[i][j] = row i . token j for 4 rows and nt <= 4 tokens */
static void dot4_i4(const uint8_t *const *u, int nt, const uint8_t *const *w, const float *const *s, int groups,
                    float out[4][4]) {
#if defined(__x86_64__)
    if (isa == ISA_VNNI) return dot4_i4_vnni(u, nt, w, s, groups, out);
#endif
    for (int j = 0; j < nt; j++) {
        float one[4];
#if defined(__x86_64__)
        if (isa == ISA_AVX2) dot4_i4_avx2(u[j], w, s, groups, one);
        else
#elif defined(HAVE_NEON_DOT)
        if (isa == ISA_NEON) dot4_i4_neon(u[j], w, s, groups, one);
        else
#endif
            dot4_i4_scalar(u[j], w, s, groups, one);
        for (int i = 0; i < 4; i++) out[i][j] = one[i];
    }
}

/* The integer version of matmul below (same contract): activations quantized once per matrix; then
   every (row, token) is one integer dot product, so a token's result never depends on the other
   tokens of the call (nor on which rows or tokens share a step: each is computed alone). A call of
   at most SMALL_N tokens (decode) quantizes them in every thread (`mine`, when it is not `shared`): no
   barrier, no thread idle while another quantizes; otherwise the threads split the rows of `shared`. */
static void matmul_int(const Matrix *m, const float *x, int ldx, int n, float *y, int ldy, int add, const QActs *shared,
                       const QActs *mine) {
    const int cols = m->cols, groups = cols / 32;
    const int quads = m->type == W_I4 && isa == ISA_VNNI;
    const int own = n <= SMALL_N && mine != shared;
    const QActs *qa = own ? mine : shared;
    if (own) {
        for (int t = 0; t < n; t++)
            quantize_row(x + (size_t)t * ldx, cols, qa->q + (size_t)t * qa->ld, qa->scale + t, qa->zero + t, quads);
    } else {
#pragma omp for schedule(static)
        for (int t = 0; t < n; t++)
            quantize_row(x + (size_t)t * ldx, cols, qa->q + (size_t)t * qa->ld, qa->scale + t, qa->zero + t, quads);
    }
#pragma omp for schedule(static)
    for (int r0 = 0; r0 < m->rows; r0 += 4) {
        const int nr = m->rows - r0 < 4 ? m->rows - r0 : 4;
        int r[4];
        for (int i = 0; i < 4; i++) r[i] = r0 + (i < nr ? i : nr - 1);
        if (m->type == W_I8) {
            const int8_t *w[4];
            for (int i = 0; i < 4; i++) w[i] = (const int8_t *)m->data + (size_t)r[i] * cols;
            for (int t = 0; t < n; t += 4) {
                const int nt = n - t < 4 ? n - t : 4;
                const uint8_t *u[4];
                for (int j = 0; j < nt; j++) u[j] = qa->q + (size_t)(t + j) * qa->ld;
                int32_t acc[4][4];
                dot4_i8(u, nt, w, cols, acc);
                for (int j = 0; j < nt; j++)
                    for (int i = 0; i < nr; i++)
                        put(y + (size_t)(t + j) * ldy + r0 + i,
                            m->scale[r[i]] * qa->scale[t + j] *
                                (float)(acc[i][j] - qa->zero[t + j] * ((const int32_t *)m->aux)[r[i]]), add);
            }
            continue;
        }
        const uint8_t *w[4];
        const float *s[4];
        for (int i = 0; i < 4; i++) {
            w[i] = (const uint8_t *)m->data + (size_t)r[i] * (cols / 2);
            s[i] = m->scale + (size_t)r[i] * groups;
        }
        for (int t = 0; t < n; t += 4) {
            const int nt = n - t < 4 ? n - t : 4;
            const uint8_t *u[4];
            for (int j = 0; j < nt; j++) u[j] = qa->q + (size_t)(t + j) * qa->ld;
            float acc[4][4];
            dot4_i4(u, nt, w, s, groups, acc);
            for (int j = 0; j < nt; j++)
                for (int i = 0; i < nr; i++)
                    put(y + (size_t)(t + j) * ldy + r0 + i,
                        qa->scale[t + j] * (acc[i][j] - (float)qa->zero[t + j] * ((const float *)m->aux)[r[i]]), add);
        }
    }
}

/* y[t, r] = (add ? y[t, r] : 0) + W[r] . x[t] for n tokens; rows split over the threads.
   Runs inside a parallel region and ends with its barrier; buf holds 4 rows of fp32 (and one more
   for the bf16 path). xb: scratch for bf16 activations where a prefill may use them, else NULL:
   then bf16 weights multiply bf16-rounded activations. qa, mine: scratch for integer weights'
   activations, shared and this thread's (see matmul_int). */
static void matmul(const Matrix *m, const float *x, int ldx, int n, float *y, int ldy, int add, float *buf,
                   uint16_t *xb, const QActs *qa, const QActs *mine) {
    if (m->type == W_I8 || m->type == W_I4) {
        matmul_int(m, x, ldx, n, y, ldy, add, qa, mine);
        return;
    }
    if (n == 1) {
#pragma omp for schedule(static)
        for (int r = 0; r < m->rows; r++) put(y + r, (m->scale ? m->scale[r] : 1.f) * dot_row(m, r, x), add);
        return;
    }
    const int cols = m->cols;
#ifdef HAVE_BF16_DOT
    const int bf16 = xb && n >= 4 && m->type == W_BF16 && cols % 32 == 0;
    if (bf16) {  /* activations rounded once per matrix, shared by the threads */
#pragma omp for schedule(static)
        for (int t = 0; t < n; t++) to_bf16(x + (size_t)t * ldx, xb + (size_t)t * cols, cols);
    }
#else
    (void)xb;
#endif
#pragma omp for schedule(static)
    for (int r0 = 0; r0 < m->rows; r0 += 4) {
        const int nr = m->rows - r0 < 4 ? m->rows - r0 : 4;
        const void *w[4];
        for (int i = 0; i < nr; i++) {
#ifdef HAVE_BF16_DOT
            if (bf16) {  /* bf16 rows in the first 2 * cols floats of buf, after them one fp32 row */
                w[i] = row_bf16(m, r0 + i, (uint16_t *)buf + (size_t)i * cols, buf + 2 * (size_t)cols);
                continue;
            }
#endif
            w[i] = row_f32(m, r0 + i, buf + (size_t)i * cols);
        }
        for (int t = 0; t < n; t += 4) {
            const int nt = n - t < 4 ? n - t : 4;
            float out[4][4];
#ifdef HAVE_BF16_DOT
            if (bf16) tile_bf16((const uint16_t *const *)w, nr, xb + (size_t)t * cols, cols, nt, cols, out);
            else
#endif
                tile((const float *const *)w, nr, x + (size_t)t * ldx, ldx, nt, cols, out);
            for (int i = 0; i < nr; i++)
                for (int j = 0; j < nt; j++)
                    put(y + (size_t)(t + j) * ldy + r0 + i, (m->scale ? m->scale[r0 + i] : 1.f) * out[i][j], add);
        }
    }
}

static void rms_norm(const float *x, const float *w, int dim, float eps, float *y) {
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int k = 0; k < dim; k++) ss += x[k] * x[k];
    const float inv = 1.f / sqrtf(ss / dim + eps);
    for (int k = 0; k < dim; k++) y[k] = w[k] * (x[k] * inv);
}

/* RMSNorm of n rows of x into y: split over the threads, or for a small call (own = 1) every
   thread normalizes all rows into its own y, with no barrier */
static void norm_rows(const float *x, const float *w, int dim, int n, float eps, float *y, int own) {
    if (own) {
        for (int t = 0; t < n; t++) rms_norm(x + (size_t)t * dim, w, dim, eps, y + (size_t)t * dim);
        return;
    }
#pragma omp for schedule(static)
    for (int t = 0; t < n; t++) rms_norm(x + (size_t)t * dim, w, dim, eps, y + (size_t)t * dim);
}

static inline float silu(float g) { return g / (1.f + expf(-g)); }

/* h[j] = silu(h[j]) * h[F + j] (SwiGLU) or relu(h[j]) for j in [from, to) */
static void activate(float *h, int F, int from, int to, int swiglu) {
    int j = from;
    if (!swiglu) {
        for (; j < to; j++) h[j] = h[j] > 0.f ? h[j] : 0.f;
        return;
    }
#ifdef HAVE_AVX512
    for (; j + 16 <= to; j += 16) {
        const __m512 g = _mm512_loadu_ps(h + j);
        const __m512 sig = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
        _mm512_storeu_ps(h + j, _mm512_mul_ps(sig, _mm512_loadu_ps(h + F + j)));
    }
#endif
    for (; j < to; j++) h[j] = silu(h[j]) * h[F + j];
}

int mobilellm_forward(const Net *net, int n, const int64_t *tokens, const int32_t *rows,
                      const int32_t *positions, int n_out, const int32_t *out_index, float *logits,
                      int threads) {
    const int D = net->dim, H = net->n_heads, KV = net->n_kv, hd = net->head_dim, F = net->ffn;
    const int S = net->max_len, qkv_dim = (H + 2 * KV) * hd, up_dim = net->swiglu ? 2 * F : F;
    const int group = H / KV, half = hd / 2;
    const float scale = 1.f / sqrtf((float)hd);
    int widest = D > F ? D : F;
    if (H * hd > widest) widest = H * hd;
    const int per_thread = 5 * widest > S ? 5 * widest : S;  /* 4 weight rows as fp32 (+1), or attention scores */
    if (threads < 1) threads = 1;

    /* all scratch up front: a thread cannot leave a parallel region early */
    const int ldq = (widest + 63) / 64 * 64;  /* quantized activations: bytes per token */
    const int small = n <= SMALL_N;           /* then every thread normalizes and quantizes for itself */
    const size_t mine = small ? (size_t)n * D + (size_t)n * ldq / 4 + 2 * (size_t)n : 0;  /* floats */
    const size_t sizes[] = {(size_t)n * D, (size_t)n * D, (size_t)n * qkv_dim, (size_t)n * H * hd,
                            (size_t)n * up_dim, (size_t)threads * per_thread, (size_t)n * widest / 2 + 32,
                            2 * (size_t)n, (size_t)n * ldq / 4 + 16, (size_t)threads * mine};
    size_t total = 0;
    for (int i = 0; i < 10; i++) total += sizes[i];
    float *scratch = malloc(sizeof(float) * total);
    if (!scratch) return -1;
    float *x = scratch, *xn = x + sizes[0], *qkv = xn + sizes[1], *att = qkv + sizes[2], *h = att + sizes[3];
    float *thread_rows = h + sizes[4];
    /* a prefill chunk (every token in one cache row) may round activations to bf16 for bf16
       weights; a batch of different rows never does, so a row's output does not depend on its batch */
    int one_row = n >= 4;
    for (int t = 1; t < n && one_row; t++) one_row = rows[t] == rows[0];
    uint16_t *xb = one_row ? (uint16_t *)(thread_rows + sizes[5]) : NULL;
    float *qscale = thread_rows + sizes[5] + sizes[6];
    const QActs qa = {(uint8_t *)(qscale + sizes[7]), qscale, (int32_t *)(qscale + n), ldq};
    float *thread_own = qscale + sizes[7] + sizes[8];
    mobilellm_isa(-1);

#pragma omp parallel num_threads(threads)
    {
        float *buf = thread_rows + (size_t)omp_get_thread_num() * per_thread;
        /* small calls: this thread's normalized activations (xs) and its quantized ones */
        float *own = thread_own + (size_t)omp_get_thread_num() * mine;
        float *xs = small ? own : xn;
        const QActs qmine = small ? (QActs){(uint8_t *)(own + (size_t)n * D + 2 * (size_t)n), own + (size_t)n * D,
                                            (int32_t *)(own + (size_t)n * D + n), ldq}
                                  : qa;
#pragma omp for schedule(static)
        for (int t = 0; t < n; t++) memcpy(x + (size_t)t * D, net->embed + (size_t)tokens[t] * D, sizeof(float) * D);

        for (int layer = 0; layer < net->n_logical; layer++) {
            const Block *b = &net->blocks[net->layer_to_block[layer]];
            const size_t slot = (size_t)layer * net->max_batch;
            norm_rows(x, b->ln1, D, n, net->eps, xs, small);
            matmul(&b->qkv, xs, D, n, qkv, qkv_dim, 0, buf, xb, &qa, &qmine);
            /* RoPE on queries and keys (adjacent pairs), then keys/values into the cache */
#pragma omp for schedule(static)
            for (int t = 0; t < n; t++) {
                float *v = qkv + (size_t)t * qkv_dim;
                const float *c = net->rope_cos + (size_t)positions[t] * half;
                const float *s = net->rope_sin + (size_t)positions[t] * half;
                for (int head = 0; head < H + KV; head++) {
                    float *p = v + head * hd;
                    for (int i = 0; i < half; i++) {
                        const float re = p[2 * i], im = p[2 * i + 1];
                        p[2 * i] = re * c[i] - im * s[i];
                        p[2 * i + 1] = re * s[i] + im * c[i];
                    }
                }
                for (int g = 0; g < KV; g++) {
                    const size_t at = (((slot + rows[t]) * KV + g) * S + positions[t]) * hd;
                    memcpy(net->k_cache + at, v + (H + g) * hd, sizeof(float) * hd);
                    memcpy(net->v_cache + at, v + (H + KV + g) * hd, sizeof(float) * hd);
                }
            }
            /* attention: each (token, head) over columns 0..position of the token's row; query
               heads of one group read the same cached keys/values (no repeated copies); dealt out
               one by one, as a prefill's later tokens attend to more columns */
#pragma omp for schedule(static, 1)
            for (int i = 0; i < n * H; i++) {
                const int t = i / H, head = i % H, len = positions[t] + 1;
                const float *q = qkv + (size_t)t * qkv_dim + head * hd;
                const size_t base = ((slot + rows[t]) * KV + head / group) * S * hd;
                const float *K = net->k_cache + base, *V = net->v_cache + base;
                head_scores(q, K, hd, len, scale, buf);
                softmax(buf, len);
                weighted_values(buf, V, hd, len, att + (size_t)t * H * hd + head * hd);
            }
            matmul(&b->o, att, H * hd, n, x, D, 1, buf, xb, &qa, &qmine);
            norm_rows(x, b->ln2, D, n, net->eps, xs, small);
            matmul(&b->up, xs, D, n, h, up_dim, 0, buf, xb, &qa, &qmine);
            /* the activation split over (token, 256 columns): at batch 1 both threads share it */
            const int spans = (F + 255) / 256;
#pragma omp for schedule(static)
            for (int i = 0; i < n * spans; i++) {
                const int t = i / spans, from = i % spans * 256;
                activate(h + (size_t)t * up_dim, F, from, from + 256 < F ? from + 256 : F, net->swiglu);
            }
            matmul(&b->down, h, up_dim, n, x, D, 1, buf, xb, &qa, &qmine);
        }
#pragma omp for schedule(static)
        for (int i = 0; i < n_out; i++)
            rms_norm(x + (size_t)out_index[i] * D, net->norm, D, net->eps, xn + (size_t)i * D);
        matmul(&net->head, xn, D, n_out, logits, net->vocab, 0, buf, xb, &qa, small ? &qmine : &qa);
    }
    free(scratch);
    return 0;
}

/* y = x . m^T for n tokens of m->cols values (the matrix products of mobilellm_forward, alone: for tests). */
int mobilellm_matmul(const Matrix *m, const float *x, int n, float *y, int threads) {
    const int cols = m->cols, ldq = (cols + 63) / 64 * 64;
    if (threads < 1) threads = 1;
    float *buf = malloc(sizeof(float) * ((size_t)threads * 5 * cols + 2 * (size_t)n + (size_t)n * ldq / 4 + 16));
    if (!buf) return -1;
    float *qscale = buf + (size_t)threads * 5 * cols;
    const QActs qa = {(uint8_t *)(qscale + 2 * (size_t)n), qscale, (int32_t *)(qscale + n), ldq};
    mobilellm_isa(-1);
#pragma omp parallel num_threads(threads)
    matmul(m, x, cols, n, y, m->rows, 0, buf + (size_t)omp_get_thread_num() * 5 * cols, NULL, &qa, &qa);
    free(buf);
    return 0;
}
