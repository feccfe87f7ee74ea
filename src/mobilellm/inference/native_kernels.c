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
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < 4; j++) out[i][j] = _mm512_reduce_add_ps(acc[i][j]);
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

typedef struct {
    uint8_t *q;      /* (n, ld) quantized activations, u = q + 128 */
    float *scale;    /* (n,) */
    int32_t *zero;   /* (n,) zpu = zero point + 128 */
    int ld;
} QActs;

static void quantize_row(const float *x, int cols, uint8_t *u, float *scale, int32_t *zero) {
    const float eps = 1.1920928955078125e-07f;  /* float32 eps: quantize._EPS */
    float lo = 0.f, hi = 0.f;                   /* the range always holds 0 */
    for (int k = 0; k < cols; k++) { lo = x[k] < lo ? x[k] : lo; hi = x[k] > hi ? x[k] : hi; }
    float s = (hi - lo) / 255.f;
    s = s > eps ? s : eps;
    float z = -128.f - nearbyintf(lo / s);  /* round half to even, as torch.round */
    z = z < -128.f ? -128.f : (z > 127.f ? 127.f : z);
    const float inv = 1.f / s;
    for (int k = 0; k < cols; k++) {
        float q = nearbyintf(x[k] * inv) + z;
        q = q < -128.f ? -128.f : (q > 127.f ? 127.f : q);
        u[k] = (uint8_t)((int)q + 128);
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
/* 4 rows read side by side are 4 streams to the hardware prefetcher, which then falls behind at
   batch 1 (weights streamed from DRAM): fetch PREFETCH_BYTES ahead explicitly (measured: int8
   decode ~10% faster than one row at a time, where without it it was ~20% slower) */
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 8192
#endif
#define AVX2 __attribute__((target("avx2,fma")))
#define VNNI __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vnni")))

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

static VNNI void dot4_i8_vnni(const uint8_t *u, const int8_t *const *w, int n, int32_t *out) {
    __m512i acc[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
    int k = 0;
    for (; k + 64 <= n; k += 64) {
        const __m512i x = _mm512_loadu_si512(u + k);
        for (int i = 0; i < 4; i++) {
            _mm_prefetch((const char *)(w[i] + k) + PREFETCH_BYTES, _MM_HINT_T0);
            acc[i] = _mm512_dpbusd_epi32(acc[i], x, _mm512_loadu_si512(w[i] + k));
        }
    }
    const int8_t *tail[4] = {w[0] + k, w[1] + k, w[2] + k, w[3] + k};
    dot4_i8_avx2(u + k, tail, n - k, out);
    for (int i = 0; i < 4; i++) out[i] += _mm512_reduce_add_epi32(acc[i]);
}

/* two groups per step: their 32 packed bytes unpack to [lo0 lo1 hi0 hi1] (16-byte lanes), reordered
   to the activations' order [lo0 hi0 lo1 hi1]; int32 lanes 0-7 are group g, lanes 8-15 group g + 1.
   The values stay + 8 (unsigned nibbles): the sums start from -8 * (the activations' sums) instead. */
static VNNI inline __m512i unpack_pair(const uint8_t *w) {
    const __m256i m = _mm256_set1_epi8(15), b = _mm256_loadu_si256((const __m256i *)w);
    const __m256i lo = _mm256_and_si256(b, m), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), m);
    const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    return _mm512_shuffle_i64x2(v, v, _MM_SHUFFLE(3, 1, 2, 0));
}

static VNNI void dot4_i4_vnni(const uint8_t *u, const uint8_t *const *w, const float *const *s, int groups, float *out) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    int g = 0;
    for (; g + 2 <= groups; g += 2) {
        const __m512i x = _mm512_loadu_si512(u + 32 * g);
        const __m512i start = _mm512_dpbusd_epi32(_mm512_setzero_si512(), x, _mm512_set1_epi8(-8));
        for (int i = 0; i < 4; i++) {
            _mm_prefetch((const char *)(w[i] + 16 * g) + PREFETCH_BYTES, _MM_HINT_T0);
            const __m512i sum = _mm512_dpbusd_epi32(start, x, unpack_pair(w[i] + 16 * g));
            const __m512 scale = _mm512_mask_mov_ps(_mm512_set1_ps(s[i][g]), 0xFF00, _mm512_set1_ps(s[i][g + 1]));
            acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, acc[i]);
        }
    }
    float tail[4] = {0.f, 0.f, 0.f, 0.f};
    if (g < groups) {
        const uint8_t *wt[4] = {w[0] + 16 * g, w[1] + 16 * g, w[2] + 16 * g, w[3] + 16 * g};
        const float *st[4] = {s[0] + g, s[1] + g, s[2] + g, s[3] + g};
        dot4_i4_avx2(u + 32 * g, wt, st, groups - g, tail);
    }
    for (int i = 0; i < 4; i++) out[i] = _mm512_reduce_add_ps(acc[i]) + tail[i];
}

/* Prefill: the 4 rows' pairs of groups unpacked once into wu (row i at wu + i * ld, pair p at 64 p),
   then dot4_i4_vnni's arithmetic on them for every token, without unpacking again. */
static VNNI void unpack4_i4_vnni(const uint8_t *const *w, int groups, uint8_t *wu, int ld) {
    for (int i = 0; i < 4; i++)
        for (int g = 0; g + 2 <= groups; g += 2) _mm512_storeu_si512(wu + (size_t)i * ld + 32 * g, unpack_pair(w[i] + 16 * g));
}

static VNNI void dot4_i4u_vnni(const uint8_t *u, const uint8_t *wu, int ld, const uint8_t *const *w, const float *const *s,
                               int groups, float *out) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    int g = 0;
    for (; g + 2 <= groups; g += 2) {
        const __m512i x = _mm512_loadu_si512(u + 32 * g);
        const __m512i start = _mm512_dpbusd_epi32(_mm512_setzero_si512(), x, _mm512_set1_epi8(-8));
        for (int i = 0; i < 4; i++) {
            const __m512i sum = _mm512_dpbusd_epi32(start, x, _mm512_loadu_si512(wu + (size_t)i * ld + 32 * g));
            const __m512 scale = _mm512_mask_mov_ps(_mm512_set1_ps(s[i][g]), 0xFF00, _mm512_set1_ps(s[i][g + 1]));
            acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, acc[i]);
        }
    }
    float tail[4] = {0.f, 0.f, 0.f, 0.f};
    if (g < groups) {
        const uint8_t *wt[4] = {w[0] + 16 * g, w[1] + 16 * g, w[2] + 16 * g, w[3] + 16 * g};
        const float *st[4] = {s[0] + g, s[1] + g, s[2] + g, s[3] + g};
        dot4_i4_avx2(u + 32 * g, wt, st, groups - g, tail);
    }
    for (int i = 0; i < 4; i++) out[i] = _mm512_reduce_add_ps(acc[i]) + tail[i];
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
    if (best == ISA_AVX2 && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni")) best = ISA_VNNI;
#elif defined(HAVE_NEON_DOT)
    if (have_dotprod()) best = ISA_NEON;
    if (force > ISA_SCALAR && force < ISA_NEON) force = ISA_SCALAR;  /* x86's: none here */
#endif
    if (force >= 0) isa = force < best ? force : best;
    else if (isa < 0) isa = best;
    return isa;
}

static void dot4_i8(const uint8_t *u, const int8_t *const *w, int n, int32_t *out) {
#if defined(__x86_64__)
    if (isa == ISA_VNNI) return dot4_i8_vnni(u, w, n, out);
    if (isa == ISA_AVX2) return dot4_i8_avx2(u, w, n, out);
#elif defined(HAVE_NEON_DOT)
    if (isa == ISA_NEON) return dot4_i8_neon(u, w, n, out);
#endif
    dot4_i8_scalar(u, w, n, out);
}

static void dot4_i4(const uint8_t *u, const uint8_t *const *w, const float *const *s, int groups, float *out) {
#if defined(__x86_64__)
    if (isa == ISA_VNNI) return dot4_i4_vnni(u, w, s, groups, out);
    if (isa == ISA_AVX2) return dot4_i4_avx2(u, w, s, groups, out);
#elif defined(HAVE_NEON_DOT)
    if (isa == ISA_NEON) return dot4_i4_neon(u, w, s, groups, out);
#endif
    dot4_i4_scalar(u, w, s, groups, out);
}

/* The integer version of matmul below (same contract): activations quantized once, shared by the
   threads; then every (row, token) is one integer dot product, so a token's result never depends
   on the other tokens of the call (nor on which rows share its 4-row step: rows are independent). */
static void matmul_int(const Matrix *m, const float *x, int ldx, int n, float *y, int ldy, int add, const QActs *qa,
                       uint8_t *buf) {
    const int cols = m->cols, groups = cols / 32;
#pragma omp for schedule(static)
    for (int t = 0; t < n; t++)
        quantize_row(x + (size_t)t * ldx, cols, qa->q + (size_t)t * qa->ld, qa->scale + t, qa->zero + t);
#pragma omp for schedule(static)
    for (int r0 = 0; r0 < m->rows; r0 += 4) {
        const int nr = m->rows - r0 < 4 ? m->rows - r0 : 4;
        int r[4];
        for (int i = 0; i < 4; i++) r[i] = r0 + (i < nr ? i : nr - 1);
        for (int t = 0; t < n; t++) {
            const uint8_t *u = qa->q + (size_t)t * qa->ld;
            float v[4];
            if (m->type == W_I8) {
                const int8_t *w[4];
                int32_t acc[4];
                for (int i = 0; i < 4; i++) w[i] = (const int8_t *)m->data + (size_t)r[i] * cols;
                dot4_i8(u, w, cols, acc);
                for (int i = 0; i < 4; i++)
                    v[i] = m->scale[r[i]] * qa->scale[t] * (float)(acc[i] - qa->zero[t] * ((const int32_t *)m->aux)[r[i]]);
            } else {
                const uint8_t *w[4];
                const float *s[4];
                float acc[4];
                for (int i = 0; i < 4; i++) {
                    w[i] = (const uint8_t *)m->data + (size_t)r[i] * (cols / 2);
                    s[i] = m->scale + (size_t)r[i] * groups;
                }
#if defined(__x86_64__)
                if (isa == ISA_VNNI && n > 1) {  /* buf: 4 unpacked rows of `cols` bytes */
                    if (t == 0) unpack4_i4_vnni(w, groups, buf, cols);
                    dot4_i4u_vnni(u, buf, cols, w, s, groups, acc);
                } else
#endif
                    dot4_i4(u, w, s, groups, acc);
                for (int i = 0; i < 4; i++) v[i] = qa->scale[t] * (acc[i] - (float)qa->zero[t] * ((const float *)m->aux)[r[i]]);
            }
            for (int i = 0; i < nr; i++) put(y + (size_t)t * ldy + r0 + i, v[i], add);
        }
    }
}

/* y[t, r] = (add ? y[t, r] : 0) + W[r] . x[t] for n tokens; rows split over the threads.
   Runs inside a parallel region and ends with its barrier; buf holds 4 rows of fp32 (and one more
   for the bf16 path). xb: scratch for bf16 activations where a prefill may use them, else NULL:
   then bf16 weights multiply bf16-rounded activations. qa: scratch for integer weights' activations
   (and buf for unpacked int4 rows). */
static void matmul(const Matrix *m, const float *x, int ldx, int n, float *y, int ldy, int add, float *buf,
                   uint16_t *xb, const QActs *qa) {
    if (m->type == W_I8 || m->type == W_I4) {
        matmul_int(m, x, ldx, n, y, ldy, add, qa, (uint8_t *)buf);
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

static inline float silu(float g) { return g / (1.f + expf(-g)); }

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
    const size_t sizes[] = {(size_t)n * D, (size_t)n * D, (size_t)n * qkv_dim, (size_t)n * H * hd,
                            (size_t)n * up_dim, (size_t)threads * per_thread, (size_t)n * widest / 2 + 32,
                            2 * (size_t)n, (size_t)n * ldq / 4 + 16};
    size_t total = 0;
    for (int i = 0; i < 9; i++) total += sizes[i];
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
    mobilellm_isa(-1);

#pragma omp parallel num_threads(threads)
    {
        float *buf = thread_rows + (size_t)omp_get_thread_num() * per_thread;
#pragma omp for schedule(static)
        for (int t = 0; t < n; t++) memcpy(x + (size_t)t * D, net->embed + (size_t)tokens[t] * D, sizeof(float) * D);

        for (int layer = 0; layer < net->n_logical; layer++) {
            const Block *b = &net->blocks[net->layer_to_block[layer]];
            const size_t slot = (size_t)layer * net->max_batch;
#pragma omp for schedule(static)
            for (int t = 0; t < n; t++) rms_norm(x + (size_t)t * D, b->ln1, D, net->eps, xn + (size_t)t * D);
            matmul(&b->qkv, xn, D, n, qkv, qkv_dim, 0, buf, xb, &qa);
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
               heads of one group read the same cached keys/values (no repeated copies) */
#pragma omp for schedule(static)
            for (int i = 0; i < n * H; i++) {
                const int t = i / H, head = i % H, len = positions[t] + 1;
                const float *q = qkv + (size_t)t * qkv_dim + head * hd;
                const size_t base = ((slot + rows[t]) * KV + head / group) * S * hd;
                const float *K = net->k_cache + base, *V = net->v_cache + base;
                for (int j = 0; j < len; j++) buf[j] = dot_head(q, K + (size_t)j * hd, hd) * scale;
                softmax(buf, len);
                float *out = att + (size_t)t * H * hd + head * hd;
                memset(out, 0, sizeof(float) * hd);
                for (int j = 0; j < len; j++) {
                    const float p = buf[j], *vj = V + (size_t)j * hd;
#pragma omp simd
                    for (int k = 0; k < hd; k++) out[k] += p * vj[k];
                }
            }
            matmul(&b->o, att, H * hd, n, x, D, 1, buf, xb, &qa);
#pragma omp for schedule(static)
            for (int t = 0; t < n; t++) rms_norm(x + (size_t)t * D, b->ln2, D, net->eps, xn + (size_t)t * D);
            matmul(&b->up, xn, D, n, h, up_dim, 0, buf, xb, &qa);
#pragma omp for schedule(static)
            for (int t = 0; t < n; t++) {
                float *ht = h + (size_t)t * up_dim;
                if (net->swiglu)
                    for (int j = 0; j < F; j++) ht[j] = silu(ht[j]) * ht[F + j];
                else
                    for (int j = 0; j < F; j++) ht[j] = ht[j] > 0.f ? ht[j] : 0.f;
            }
            matmul(&b->down, h, up_dim, n, x, D, 1, buf, xb, &qa);
        }
#pragma omp for schedule(static)
        for (int i = 0; i < n_out; i++)
            rms_norm(x + (size_t)out_index[i] * D, net->norm, D, net->eps, xn + (size_t)i * D);
        matmul(&net->head, xn, D, n_out, logits, net->vocab, 0, buf, xb, &qa);
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
    matmul(m, x, cols, n, y, m->rows, 0, buf + (size_t)omp_get_thread_num() * 5 * cols, NULL, &qa);
    free(buf);
    return 0;
}
