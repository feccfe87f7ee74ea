/* Runs mobilellm_forward on a network that tests/test_native_aarch64.py wrote to a file, so that a
   build for another CPU (aarch64, under user-mode emulation) can be checked against PyTorch.

   usage: driver IN OUT
   IN:  int64 blob_bytes, n, n_out; the blob (a Net at offset 0; every pointer in it, in its Blocks
        and in its Matrices is an offset into the blob, 0 for NULL); int64 tokens[n]; int32 rows[n],
        positions[n], out_index[n_out]
   OUT: float logits[n_out][vocab] */
#include "native_kernels.c"

#include <stdio.h>

#define FIX(p) ((p) = (p) ? (void *)(base + (uintptr_t)(p)) : NULL)

static void fix_matrix(Matrix *m, char *base) {
    FIX(m->data);
    FIX(m->scale);
    FIX(m->aux);
}

static int read_all(FILE *f, void *dst, size_t bytes) { return fread(dst, 1, bytes, f) == bytes; }

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: %s IN OUT\n", argv[0]); return 2; }
    FILE *in = fopen(argv[1], "rb");
    int64_t head[3];
    if (!in || !read_all(in, head, sizeof head)) { fprintf(stderr, "cannot read %s\n", argv[1]); return 1; }
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
    FILE *out = fopen(argv[2], "wb");
    if (!out || fwrite(logits, sizeof(float), (size_t)n_out * net->vocab, out) != (size_t)n_out * net->vocab) {
        fprintf(stderr, "cannot write %s\n", argv[2]);
        return 1;
    }
    fclose(out);
    return 0;
}
