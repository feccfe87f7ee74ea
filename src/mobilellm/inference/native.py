"""The native CPU backend: native_kernels.c, compiled on first use and called through ctypes.

One C call runs the whole network for a set of tokens (a prefill chunk or a batched decode step),
so a decoded token costs one Python call instead of a few hundred framework ops; on a small model at
batch 1 that overhead is as large as the matrix products. The library is built once per machine with
the system C compiler (`$CC`, else `cc`; GCC or Clang with OpenMP) for the CPU it runs on
(-march=native) and cached under `$MOBILELLM_CACHE_DIR/native` (default `~/.cache/mobilellm/native`),
keyed by the source, the flags and the CPU. Without a compiler, backend "auto" falls back to the
PyTorch backend; `MOBILELLM_NATIVE=0` forces that.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

from mobilellm.errors import MobileLLMError
from mobilellm.inference.backend import Backend
from mobilellm.inference.layout import Matrix as LayoutMatrix
from mobilellm.inference.layout import block_weights, embedding_table, output_matrix
from mobilellm.model import KVCache, MobileLLM, rope_cos_sin
from mobilellm.precision import FLOAT_DTYPES, INT4_GROUP
from mobilellm.sysinfo import proc_line, return_freed_memory

SOURCE = Path(__file__).with_name("native_kernels.c")
WEIGHT_TYPES = {"fp32": 0, "fp16": 1, "bf16": 2, "int8": 3, "int4": 4}
# the integer kernels' instruction sets, as mobilellm_isa numbers them
ISAS = ("scalar", "avx2", "avx512-vnni", "neon-dotprod")
PREFILL_CHUNK = 64  # tokens per call in prefill: bounds the scratch memory, keeps weight rows hot
CONVERT_ROWS = 512  # rows converted at a time while loading: bounds the temporaries (a few MiB), not the result
HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14  # Linux


class NativeUnavailable(MobileLLMError):
    """The native library could not be built or loaded here (the message says why)."""


class Matrix(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("scale", ctypes.c_void_p),
                ("type", ctypes.c_int32), ("rows", ctypes.c_int32), ("cols", ctypes.c_int32), ("aux", ctypes.c_void_p)]


class Block(ctypes.Structure):
    _fields_ = [("ln1", ctypes.c_void_p), ("ln2", ctypes.c_void_p),
                ("qkv", Matrix), ("o", Matrix), ("up", Matrix), ("down", Matrix)]


class Net(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int32) for name in
                ("dim", "n_heads", "n_kv", "head_dim", "ffn", "vocab", "n_logical", "max_batch", "max_len", "swiglu")]
    _fields_ += [("eps", ctypes.c_float), ("layer_to_block", ctypes.c_void_p), ("blocks", ctypes.c_void_p),
                 ("embed", ctypes.c_void_p), ("norm", ctypes.c_void_p), ("head", Matrix),
                 ("rope_cos", ctypes.c_void_p), ("rope_sin", ctypes.c_void_p),
                 ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p)]


# ---- building the library ---------------------------------------------------------------------

_library = None
_library_lock = threading.Lock()


def _compile_flags() -> list[str]:
    flags = ["-O3", "-march=native", "-fopenmp", "-fno-strict-aliasing", "-shared", "-fPIC"]
    if platform.machine() in ("x86_64", "AMD64"):
        flags.append("-mprefer-vector-width=512")  # full AVX-512 vectors where the CPU has them
    return flags


def _cpu_key() -> str:
    """What -march=native depends on: the CPU's feature flags (a cache shared by two machines stays right)."""
    return proc_line("/proc/cpuinfo", ("flags", "Features")) or platform.processor() or platform.machine()


def cache_dir() -> Path:
    root = os.environ.get("MOBILELLM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mobilellm")
    return Path(root) / "native"


def build_library() -> Path:
    """Compile native_kernels.c for this CPU unless a matching build is cached; returns the .so path."""
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise NativeUnavailable(f"no C compiler {compiler!r} on PATH (set CC, or install gcc)")
    flags = _compile_flags()
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), compiler.encode(), " ".join(flags).encode(),
                                     _cpu_key().encode()])).hexdigest()[:16]
    target = cache_dir() / f"kernels-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([compiler, *flags, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True,
                              check=False)
        if proc.returncode != 0:
            first = (proc.stderr.strip().splitlines() or ["(no output)"])[0]
            raise NativeUnavailable(f"compiling the native kernels failed: {first}")
        os.replace(tmp, target)  # atomic: a concurrent build of the same key writes the same file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def library():
    """The loaded library (built on first use); NativeUnavailable if it cannot be had here."""
    global _library
    with _library_lock:
        if _library is None:
            if os.environ.get("MOBILELLM_NATIVE", "1") == "0":
                raise NativeUnavailable("the native backend is switched off (MOBILELLM_NATIVE=0)")
            try:
                lib = ctypes.CDLL(str(build_library()))
            except OSError as exc:
                raise NativeUnavailable(f"loading the native kernels failed: {exc}") from None
            lib.mobilellm_forward.restype = ctypes.c_int
            lib.mobilellm_forward.argtypes = [ctypes.POINTER(Net), ctypes.c_int] + [ctypes.c_void_p] * 3 + \
                [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
            lib.mobilellm_matmul.restype = ctypes.c_int
            lib.mobilellm_matmul.argtypes = [ctypes.POINTER(Matrix), ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                             ctypes.c_int]
            lib.mobilellm_isa.restype = ctypes.c_int
            lib.mobilellm_isa.argtypes = [ctypes.c_int]
            _library = lib
        return _library


def integer_isa(force: str | None = None) -> str:
    """The integer kernels' instruction set (ISAS): the best this CPU has, or `force` where it has that."""
    return ISAS[library().mobilellm_isa(ISAS.index(force) if force else -1)]


def integer_weights(data: torch.Tensor, scale: torch.Tensor, precision: str) -> list[torch.Tensor]:
    """(data, scale, aux) as native_kernels.c reads int8 / int4 matrices, from layout.Matrix.converted:
    int8 rows and their int32 sums; int4 values + 8 packed two per byte (value j and j + 16 of each
    group of 32 in one byte) with each row's fp32 sum of dequantized weights."""
    q = data.to(torch.int8)
    if precision == "int8":
        return [q.contiguous(), scale.float().reshape(-1).contiguous(), q.to(torch.int32).sum(1, dtype=torch.int32)]
    rows, cols = q.shape
    nib = (q.to(torch.int16) + 8).to(torch.uint8).view(rows, cols // 32, 2, 16)  # [-8, 7] stored as [0, 15]
    packed = (nib[:, :, 0] | (nib[:, :, 1] << 4)).reshape(rows, cols // 2)
    scale = scale.float().contiguous()
    row_sum = (q.double().view(rows, cols // 32, 32).sum(-1) * scale.double()).sum(1).float()
    return [packed.contiguous(), scale, row_sum]


def _integer_struct(parts: list[torch.Tensor], precision: str) -> Matrix:
    data, scale, aux = parts  # as integer_weights returns them
    cols = data.shape[1] * (2 if precision == "int4" else 1)
    return Matrix(_ptr(data), _ptr(scale), WEIGHT_TYPES[precision], data.shape[0], cols, _ptr(aux))


def qmatmul(data: torch.Tensor, scale: torch.Tensor, x: torch.Tensor, precision: str = "int8") -> torch.Tensor:
    """x (n, in) fp32 times integer weights on the native integer kernels, one matrix product alone:
    data/scale as layout.Matrix.converted(precision) gives them (int8 rows, or int4 values in groups);
    activations quantized per token as quantize.fake_quantize_activations does. Returns (n, out) fp32."""
    keep = integer_weights(data, scale, precision)
    m = _integer_struct(keep, precision)
    x = x.float().contiguous()
    y = torch.empty(x.shape[0], m.rows)
    if library().mobilellm_matmul(ctypes.byref(m), _ptr(x), x.shape[0], _ptr(y), torch.get_num_threads()) != 0:
        raise MobileLLMError("the native matrix product could not allocate its scratch memory")
    del keep
    return y


@functools.cache
def note_once(message: str) -> None:
    print(message, file=sys.stderr)


# ---- the network as the library sees it ------------------------------------------------------


def longest_run(items: list) -> int:
    """The most times one value occurs in a row ([0, 0, 1, 1] -> 2; [0, 1, 0, 1] -> 1)."""
    best = run = 0
    for i, item in enumerate(items):
        run = run + 1 if i and item == items[i - 1] else 1
        best = max(best, run)
    return best


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _arena(specs: list[tuple[tuple[int, ...], torch.dtype]]) -> list[torch.Tensor]:
    """Empty tensors of these (shape, dtype) in one buffer that Linux is asked to back with 2 MiB pages.

    Every decoded token streams all weights from memory; with 4 KiB pages the hardware prefetcher
    stops at each page boundary and the TLB misses every few rows. Asked for before the first write
    (the buffer is fresh, untouched memory), so the pages are huge from the start where the kernel
    allows it ("madvise" or "always" transparent huge pages); elsewhere plain pages.
    """
    nbytes = [math.prod(shape) * dtype.itemsize for shape, dtype in specs]
    sizes = [(n + 63) // 64 * 64 for n in nbytes]  # 64-byte aligned slices
    arena = torch.empty(sum(sizes) + HUGE_PAGE, dtype=torch.uint8)
    start = (arena.data_ptr() + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE
    if sys.platform.startswith("linux") and sum(sizes) >= HUGE_PAGE:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(sum(sizes) // HUGE_PAGE * HUGE_PAGE), MADV_HUGEPAGE)
    out, offset = [], start - arena.data_ptr()
    for (shape, dtype), n, size in zip(specs, nbytes, sizes):
        out.append(arena[offset:offset + n].view(dtype).view(shape))
        offset += size
    return out


def _packed(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors copied into one _arena."""
    out = _arena([(tuple(t.shape), t.dtype) for t in tensors])
    for view, t in zip(out, tensors):
        view.copy_(t)
    return out


def _integer_specs(shape, precision: str) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of integer_weights' (data, scale, aux) for an (out, in) matrix."""
    rows, cols = shape
    if precision == "int8":
        return [((rows, cols), torch.int8), ((rows,), torch.float32), ((rows,), torch.int32)]
    return [((rows, cols // 2), torch.uint8), ((rows, cols // INT4_GROUP), torch.float32), ((rows,), torch.float32)]


class NativeBackend(Backend):
    """model.MobileLLM's weights in the inference layout (layout.py), laid out for native_kernels.c.

    Matrices as fp32, fp16, bf16, int8 with one scale per output row or int4 in groups of 32 input
    columns (layout.Matrix.converted; integer ones in the kernel's form, integer_weights).
    The embedding table stays fp32 (one row is read per token); the tied output matrix is that same
    table in fp32 mode and its own converted copy otherwise.
    """

    name = "native"

    def __init__(self, model: MobileLLM, precision: str, max_batch: int, max_len: int, consume: bool = False):
        super().__init__(model.config, precision, max_batch, max_len)
        self.lib = library()
        if precision in ("int8", "int4") and integer_isa() in ISAS[:2]:
            note_once(f"mobilellm: the integer kernels use {integer_isa()} "
                       "(this CPU has neither AVX-512 VNNI nor ARM dot products)")
        cfg = self.config
        self.cache = KVCache(cfg, max_batch, max_len, device="cpu")  # fp32, contiguous
        self._keep: list[torch.Tensor] = []  # every tensor the C struct points into
        blocks = (Block * len(model.layers))()
        self.block_nbytes: list[int] = []  # weight bytes of each physical block (for --verbose)
        threads = torch.get_num_threads()
        # one thread while converting: each op touches a chunk of a few MiB, and waking a thread team
        # for each of thousands of small ops costs more than the work (milliseconds each on a busy CPU)
        torch.set_num_threads(1)
        try:
            embed, head, gated = self._convert(model, consume, blocks)
        finally:
            torch.set_num_threads(threads)
        hd = cfg.attn_head_dim
        cos, sin = rope_cos_sin(torch.arange(max_len), hd, cfg.rope_theta)
        rope_cos, rope_sin = cos[:, :hd // 2].float().contiguous(), sin[:, :hd // 2].float().contiguous()
        layer_to_block = torch.tensor(list(model.layer_to_block), dtype=torch.int32)
        self.block_repeats = longest_run(list(model.layer_to_block))  # immediate sharing: runs in a row
        self._keep += [embed, rope_cos, rope_sin, layer_to_block]
        self._blocks = blocks
        k, v = self.cache.k, self.cache.v
        self.net = Net(cfg.dim, cfg.n_heads, cfg.n_kv_heads, hd, cfg.ffn_dim, cfg.vocab_size, len(layer_to_block),
                       max_batch, max_len, int(gated), cfg.norm_eps, _ptr(layer_to_block),
                       ctypes.addressof(blocks), _ptr(embed), self._hold(model.norm.weight), head,
                       _ptr(rope_cos), _ptr(rope_sin), _ptr(k), _ptr(v))
        self._net_ref = ctypes.byref(self.net)

    def _convert(self, model: MobileLLM, consume: bool, blocks) -> tuple[torch.Tensor, Matrix, bool]:
        """The weights into the kernel's layout, `blocks` filled: (embedding table, output matrix, gated)."""
        cfg, precision = self.config, self.precision
        with torch.no_grad():
            # the embedding and output matrix first, while no block is converted yet: their sources
            # (the largest matrices) and their copies are then in memory together at the lowest point
            (embed,) = _packed([embedding_table(model)])
            if cfg.tie_embeddings and precision == "fp32":  # the output matrix is the embedding table
                head = Matrix(_ptr(embed), None, WEIGHT_TYPES["fp32"], *embed.shape)
            else:
                (head,) = self._matrices([output_matrix(model)])
            if consume:
                model.embed_tokens = torch.nn.Identity()
                model.lm_head = None
            self.nbytes += embed.numel() * 4
            for i, block in enumerate(model.layers):
                before = self.nbytes
                w = block_weights(block, cfg, consume)
                b = blocks[i]
                b.ln1, b.ln2 = self._hold(w.ln1), self._hold(w.ln2)
                matrices, gated = [w.qkv, w.o, w.up, w.down], w.gated
                del w  # _matrices lets go of each original as it converts it: about one matrix's at a time
                b.qkv, b.o, b.up, b.down = self._matrices(matrices)
                self.block_nbytes.append(self.nbytes - before)
                if consume:  # as the temporaries, the freed originals stay with glibc until trimmed
                    return_freed_memory()
        return embed, head, gated

    def _hold(self, t: torch.Tensor) -> int:
        # a copy: a view of the model's tensor would keep the loaded weights alive
        t = t.detach().to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        self._keep.append(t)
        self.nbytes += t.numel() * 4
        return _ptr(t)

    def _matrices(self, matrices: list[LayoutMatrix]) -> list[Matrix]:
        """Weight matrices converted to the decode precision into one _arena, one matrix at a time (the list
        is emptied as it goes, so each original can be freed once converted) and
        integer ones CONVERT_ROWS output rows at a time (every step of the conversion is per row): the
        fp32 / fp64 temporaries of a whole vocabulary-sized matrix would be several times its integers."""
        p = self.precision
        if p in ("int8", "int4"):
            packed = _arena([spec for m in matrices for spec in _integer_specs(m.shape, p)])
            for i in range(len(matrices)):
                m, matrices[i] = matrices[i], None
                for r in range(0, m.shape[0], CONVERT_ROWS):
                    chunk = integer_weights(*m.rows(r, r + CONVERT_ROWS).converted(p), p)
                    for dst, src in zip(packed[3 * i:3 * i + 3], chunk):
                        dst[r:r + CONVERT_ROWS].copy_(src)
                del m, chunk
                return_freed_memory()  # glibc keeps freed temporaries (a few MiB a matrix) until trimmed
            structs = [_integer_struct(packed[i:i + 3], p) for i in range(0, len(packed), 3)]
        else:
            packed = _arena([(tuple(m.shape), FLOAT_DTYPES[p]) for m in matrices])
            for i, dst in enumerate(packed):
                m, matrices[i] = matrices[i], None
                dst.copy_(m.converted(p)[0])
                del m
            structs = [Matrix(_ptr(data), None, WEIGHT_TYPES[p], *data.shape) for data in packed]
        self._keep += packed
        self.nbytes += sum(t.numel() * t.element_size() for t in packed)
        return structs

    def _prefill(self, row: int, ids: list[int]) -> torch.Tensor:
        for start in range(0, len(ids), PREFILL_CHUNK):  # causal across chunks: earlier ones are in the cache
            chunk = ids[start:start + PREFILL_CHUNK]
            last = start + len(chunk) == len(ids)
            logits = self._forward(chunk, [row] * len(chunk), list(range(start, start + len(chunk))),
                                   [len(chunk) - 1] if last else [])
        return logits[0]

    def _decode(self, rows: list[int], tokens: list[int], positions: list[int]) -> torch.Tensor:
        return self._forward(tokens, rows, positions, list(range(len(rows))))

    def _forward(self, tokens: list[int], rows: list[int], positions: list[int], out_index: list[int]) -> torch.Tensor:
        """Logits (len(out_index), vocab) fp32. Token i writes its keys/values at (rows[i], positions[i])
        and attends to columns 0..positions[i] of its row; tokens of one row come in position order."""
        n = len(tokens)
        tok = torch.tensor(tokens, dtype=torch.int64)
        meta = torch.tensor([*rows, *positions, *out_index], dtype=torch.int32)
        logits = torch.empty(len(out_index), self.config.vocab_size)
        base, step = meta.data_ptr(), meta.element_size()
        status = self.lib.mobilellm_forward(self._net_ref, n, tok.data_ptr(), base, base + n * step,
                                            len(out_index), base + 2 * n * step, logits.data_ptr(),
                                            torch.get_num_threads())
        if status != 0:
            raise MobileLLMError("the native forward pass could not allocate its scratch memory")
        return logits
