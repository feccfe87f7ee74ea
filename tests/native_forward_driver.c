/* Runs mobilellm_forward on a network that tests/test_native_aarch64.py wrote to a file (or
   mobilellm_matmul on one integer matrix), so that a build for another CPU (aarch64, under user-mode
   emulation) can be checked against PyTorch and the x86 build.

   usage: driver forward|matmul IN OUT [ISA]
   ISA: the integer kernels' instruction set to force (mobilellm_isa's number); the one in use is
        printed as "isa N", so a test sees which kernels ran
   forward IN:  int64 blob_bytes, n, n_out; the blob (a Net at offset 0; every pointer in it, in its
        Blocks and in its Matrices is an offset into the blob, 0 for NULL); int64 tokens[n]; int32
        rows[n], positions[n], out_index[n_out]
   forward OUT: float logits[n_out][vocab]
   matmul IN:  int64 type, rows, cols, n, data_bytes, scale_bytes, aux_bytes; those three arrays;
        float x[n][cols]
   matmul OUT: float y[n][rows] */
#include "native_kernels.c"

#include <stdio.h>

#define FIX(p) ((p) = (p) ? (void *)(base + (uintptr_t)(p)) : NULL)

static void fix_matrix(Matrix *m, char *base) {
    FIX(m->data);
    FIX(m->scale);
    FIX(m->aux);
}

static int read_all(FILE *f, void *dst, size_t bytes) { return fread(dst, 1, bytes, f) == bytes; }

static int write_all(const char *path, const float *y, size_t count) {
    FILE *out = fopen(path, "wb");
    if (!out || fwrite(y, sizeof(float), count, out) != count) {
        fprintf(stderr, "cannot write %s\n", path);
        return 1;
    }
    fclose(out);
    return 0;
}

static int run_matmul(FILE *in, const char *out) {
    int64_t head[7];
    if (!read_all(in, head, sizeof head)) { fprintf(stderr, "short input\n"); return 1; }
    void *part[3];
    for (int i = 0; i < 3; i++)
        if (!(part[i] = malloc(head[4 + i] + 1)) || !read_all(in, part[i], head[4 + i])) { fprintf(stderr, "short input\n"); return 1; }
    const Matrix m = {part[0], part[1], (int32_t)head[0], (int32_t)head[1], (int32_t)head[2], part[2]};
    const size_t n = head[3];
    float *x = malloc(sizeof(float) * n * m.cols), *y = malloc(sizeof(float) * n * m.rows);
    if (!x || !y || !read_all(in, x, sizeof(float) * n * m.cols)) { fprintf(stderr, "short input\n"); return 1; }
    if (mobilellm_matmul(&m, x, (int)n, y, 1) != 0) { fprintf(stderr, "matmul failed\n"); return 1; }
    return write_all(out, y, n * m.rows);
}

int main(int argc, char **argv) {
    if (argc != 4 && argc != 5) { fprintf(stderr, "usage: %s forward|matmul IN OUT [ISA]\n", argv[0]); return 2; }
    printf("isa %d\n", mobilellm_isa(argc == 5 ? atoi(argv[4]) : -1));
    FILE *in = fopen(argv[2], "rb");
    if (!in) { fprintf(stderr, "cannot read %s\n", argv[2]); return 1; }
    if (!strcmp(argv[1], "matmul")) return run_matmul(in, argv[3]);
    int64_t head[3];
    if (!read_all(in, head, sizeof head)) { fprintf(stderr, "cannot read %s\n", argv[2]); return 1; }
    const int n = (int)head[1], n_out = (int)head[2];
    char *base = malloc(head[0]);
    int64_t *tokens = malloc(sizeof(int64_t) * n);
    int32_t *meta = malloc(sizeof(int32_t) * (2 * n + n_out));
    if (!base || !tokens || !meta || !read_all(in, base, head[0]) || !read_all(in, tokens, sizeof(int64_t) * n) ||
        !read_all(in, meta, sizeof(int32_t) * (2 * n + n_out))) { fprintf(stderr, "short input\n"); return 1; }
    fclose(in);

    Net *net = (Net *)base;
    FIX(net->layer_to_block);
    FIX(net->blocks);
    FIX(net->embed);
    FIX(net->norm);
    FIX(net->rope_cos);
    FIX(net->rope_sin);
    FIX(net->k_cache);
    FIX(net->v_cache);
    fix_matrix(&net->head, base);
    int n_blocks = 0;
    for (int i = 0; i < net->n_logical; i++) n_blocks = net->layer_to_block[i] + 1 > n_blocks ? net->layer_to_block[i] + 1 : n_blocks;
    Block *blocks = (Block *)net->blocks;
    for (int i = 0; i < n_blocks; i++) {
        FIX(blocks[i].ln1);
        FIX(blocks[i].ln2);
        fix_matrix(&blocks[i].qkv, base);
        fix_matrix(&blocks[i].o, base);
        fix_matrix(&blocks[i].up, base);
        fix_matrix(&blocks[i].down, base);
    }
    float *logits = malloc(sizeof(float) * (size_t)n_out * net->vocab);
    if (!logits || mobilellm_forward(net, n, tokens, meta, meta + n, n_out, meta + 2 * n, logits, 1) != 0) {
        fprintf(stderr, "forward failed\n");
        return 1;
    }
    return write_all(argv[3], logits, (size_t)n_out * net->vocab);
}
