"""The memory system's own limit for immediate layer sharing: how much longer a decode step's weight
reads take when every block is read twice in a row (the second time from cache) than once.

A decode step at batch 1 reads every layer block's weights once; with immediate block-wise sharing
(MobileLLM-LS) each block runs twice in a row, and the repeat can read the block from cache instead
of memory. This measures only the reads, no arithmetic: per token, `--blocks` distinct block-sized
buffers (the model's shape and precision: bytes as the native backend holds them) are read

  once        block 0, 1, 2, ...             (the model without sharing)
  twice       block 0, 0, 1, 1, 2, 2, ...    (immediate sharing: the repeat may hit the cache)
  distinct    2 x blocks distinct buffers    (twice the layers without sharing: all from memory)

by `--threads` OpenMP threads (software prefetch 8 KiB ahead, as the native kernels), each reading the same slice of a block every time (as the native
kernels split rows), with a barrier after each block. The "twice" overhead is the floor for a
layer-shared model's decode overhead on this machine: what remains above it is the kernels' compute.

    python benchmarks/cache_bandwidth.py [--preset mobilellm-125m] [--threads 2]
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

C_SOURCE = r"""
#include <stdint.h>
#include <stddef.h>
#include <omp.h>

/* pattern: the block index read at each step; every thread reads its slice of it, then a barrier.
   Returns seconds for `tokens` passes over the pattern. */
double read_pattern(uint64_t *const *blocks, size_t words, const int *pattern, int steps, int tokens, int threads,
                    uint64_t *sink) {
    double t0 = 0, t1 = 0;
    uint64_t total = 0;
#pragma omp parallel num_threads(threads) reduction(^ : total)
    {
        const int me = omp_get_thread_num(), n = omp_get_num_threads();
        const size_t from = words * me / n, to = words * (me + 1) / n;
        uint64_t acc = 0;
#pragma omp barrier
#pragma omp master
        t0 = omp_get_wtime();
        for (int t = 0; t < tokens; t++)
            for (int s = 0; s < steps; s++) {
                const uint64_t *p = blocks[pattern[s]];
                size_t k = from;
                for (; k + 8 <= to; k += 8) {  /* a cache line per step, fetched 8 KiB ahead as the kernels do */
                    __builtin_prefetch(p + k + 1024);
                    for (int j = 0; j < 8; j++) acc ^= p[k + j];
                }
                for (; k < to; k++) acc ^= p[k];
#pragma omp barrier
            }
#pragma omp master
        t1 = omp_get_wtime();
        total = acc;
    }
    *sink = total;
    return t1 - t0;
}
"""


def block_bytes(preset: str, precision: str) -> int:
    """A layer block's weight bytes as the native backend holds them (native._integer_specs: the
    integer matrices' data, scales and sums; float ones at their element size)."""
    import math

    from mobilellm.config import get_preset
    from mobilellm.inference.native import _integer_specs

    cfg = get_preset(preset)
    hd = cfg.attn_head_dim
    up_rows = 2 * cfg.ffn_dim if cfg.ffn_type == "swiglu" else cfg.ffn_dim
    shapes = [((cfg.n_heads + 2 * cfg.n_kv_heads) * hd, cfg.dim), (cfg.dim, cfg.n_heads * hd),
              (up_rows, cfg.dim), (cfg.dim, cfg.ffn_dim)]
    total = 2 * cfg.dim * 4  # the two norms
    for shape in shapes:
        if precision in ("int8", "int4"):
            total += sum(math.prod(s) * dtype.itemsize for s, dtype in _integer_specs(shape, precision))
        else:
            total += math.prod(shape) * {"fp32": 4, "bf16": 2, "fp16": 2}[precision]
    return total


def build(tmp: Path) -> ctypes.CDLL:
    cc = os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        sys.exit(f"error: no C compiler {cc!r} on PATH (set CC, or install gcc)")
    src, lib = tmp / "read.c", tmp / "read.so"
    src.write_text(C_SOURCE)
    subprocess.run([cc, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    out = ctypes.CDLL(str(lib))
    out.read_pattern.restype = ctypes.c_double
    out.read_pattern.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                 ctypes.c_int, ctypes.c_void_p]
    return out


def measure(lib, nbytes: int, blocks: int, threads: int, tokens: int, repeats: int) -> dict[str, float]:
    words = (nbytes + 7) // 8
    buffers = [(ctypes.c_uint64 * words)() for _ in range(2 * blocks)]
    for b in buffers:  # touch every page: reads must come from DRAM or cache, not the zero page
        ctypes.memset(b, 1, words * 8)
    table = (ctypes.c_void_p * len(buffers))(*[ctypes.addressof(b) for b in buffers])
    patterns = {"once": list(range(blocks)), "twice": [b for b in range(blocks) for _ in (0, 1)],
                "distinct": list(range(2 * blocks))}
    sink = ctypes.c_uint64()
    arrays = {name: (ctypes.c_int * len(pattern))(*pattern) for name, pattern in patterns.items()}
    for name, arr in arrays.items():  # warm-up
        lib.read_pattern(table, words, arr, len(patterns[name]), 2, threads, ctypes.byref(sink))
    best = {name: float("inf") for name in patterns}
    for _ in range(repeats):  # the patterns interleaved, so a busier moment does not favour one; the
        for name, arr in arrays.items():  # fastest timing of each: what the machine can do
            seconds = lib.read_pattern(table, words, arr, len(patterns[name]), tokens, threads, ctypes.byref(sink))
            best[name] = min(best[name], seconds / tokens)
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="mobilellm-125m", help="model shape (its block size per precision)")
    p.add_argument("--blocks", type=int, default=None, help="distinct blocks (default: the preset's layers)")
    p.add_argument("--precisions", default="int4,int8,fp32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=20, help="decode steps per timing")
    p.add_argument("--repeats", type=int, default=15, help="timings per pattern (the fastest is reported)")
    a = p.parse_args()
    from mobilellm.config import get_preset
    from mobilellm.sysinfo import cpu_cache_bytes, hardware

    blocks = a.blocks or get_preset(a.preset).n_layers
    caches = cpu_cache_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        lib = build(Path(tmp))
        print(f"{a.preset} shape, {blocks} blocks, {a.threads} threads; {hardware()}; "
              + ", ".join(f"L{k} {v / 2**20:.2f} MiB" for k, v in sorted(caches.items()) if k >= 2)
              + f"; {datetime.date.today()}")
        print()
        print("| precision | block MiB | per thread MiB | once ms/token | twice ms/token | distinct ms/token "
              "| twice overhead | distinct overhead |")
        print("|---|---|---|---|---|---|---|---|")
        for precision in a.precisions.split(","):
            nbytes = block_bytes(a.preset, precision)
            t = measure(lib, nbytes, blocks, a.threads, a.tokens, a.repeats)
            print(f"| {precision} | {nbytes / 2**20:.2f} | {nbytes / a.threads / 2**20:.2f} | {1e3 * t['once']:.3f} "
                  f"| {1e3 * t['twice']:.3f} | {1e3 * t['distinct']:.3f} | {100 * (t['twice'] / t['once'] - 1):+.1f}% "
                  f"| {100 * (t['distinct'] / t['once'] - 1):+.1f}% |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
