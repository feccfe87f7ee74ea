"""The native kernels built for aarch64 (Debian's cross compiler) give PyTorch's logits under
qemu-aarch64 user-mode emulation: the network the x86 build would run is written to a file, with
its pointers as offsets, and tests/native_forward_driver.c runs mobilellm_forward on it there.
Timing under emulation means nothing; correctness is the point.

The integer kernels run three ways there: NEON dot products (a +dotprod build, qemu's default CPU has
them), the plain C ones forced in that same binary, and a generic armv8-a build on a CPU without dot
products (qemu -cpu cortex-a53), which must find that out at run time and fall back."""

import copy
import ctypes
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch

from mobilellm.quantize import quantize_weight

from test_native_integer import RULES, reference, reference_net, tiny

native = pytest.importorskip("mobilellm.inference.native")
CROSS_CC, QEMU = "aarch64-linux-gnu-gcc", "qemu-aarch64"
DRIVER = Path(__file__).with_name("native_forward_driver.c")
SCALAR, NEON = native.ISAS.index("scalar"), native.ISAS.index("neon-dotprod")
NO_DOTPROD = "cortex-a53"  # an armv8.0 core: its HWCAP has no ASIMDDP


def build(out: Path, march: str) -> Path:
    proc = subprocess.run([CROSS_CC, "-O3", f"-march={march}", "-fopenmp", "-fno-strict-aliasing",
                           "-static", "-I", str(native.SOURCE.parent), "-o", str(out), str(DRIVER), "-lm"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return out


def run(exe: Path, mode: str, data: bytes, tmp_path: Path, isa: int | None = None, cpu: str | None = None,
        log: Path | None = None):
    """(the integer kernels' ISA number the driver used, its output as fp32); log: qemu's record of
    the instructions it translated (so of those that ran)"""
    (tmp_path / "in").write_bytes(data)
    cmd = [QEMU, *(["-cpu", cpu] if cpu else []), *(["-d", "in_asm", "-D", str(log)] if log else []),
           str(exe), mode, str(tmp_path / "in"), str(tmp_path / "out")]
    proc = subprocess.run(cmd + ([str(isa)] if isa is not None else []), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    used = int(proc.stdout.split()[1])
    return used, torch.frombuffer(bytearray((tmp_path / "out").read_bytes()), dtype=torch.float32)


def ran_udot(log: Path) -> bool:
    """Whether a UDOT (vector) instruction ran: qemu 7's disassembler shows it as .byte, so by its
    encoding in the log's "0xADDRESS:  WORD" lines."""
    words = (line.split()[1] for line in log.read_text().splitlines() if line.startswith("0x"))
    return any(int(w, 16) & 0xFFE0FC00 == 0x6E809400 for w in words if len(w) == 8)


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    missing = [tool for tool in (CROSS_CC, QEMU) if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs {' and '.join(missing)} (apt-get install gcc-aarch64-linux-gnu qemu-user)")
    try:
        native.library()  # the network is laid out by the x86 build's loader
    except native.NativeUnavailable as exc:
        pytest.skip(f"native backend unavailable: {exc}")
    # armv8.2-a with dot products: what phones since 2018 have; static, so qemu needs no aarch64 root
    return build(tmp_path_factory.mktemp("aarch64") / "driver", "armv8.2-a+fp16+dotprod")


@pytest.fixture(scope="module")
def generic_driver(driver, tmp_path_factory):
    """A build for any armv8-a CPU: the NEON kernels only through the run-time check."""
    return build(tmp_path_factory.mktemp("aarch64") / "generic", "armv8-a")


def serialize(backend, prompts: list[list[int]]) -> bytes:
    """The driver's input: prompt i prefilled into cache row i, all in one call, logits at every position."""
    tensors = {t.data_ptr(): t for t in backend._keep + [backend.cache.k, backend.cache.v]}
    chunks: list[tuple[int, bytes]] = []
    end = 0

    def add(data: bytes) -> int:
        nonlocal end
        offset = (end + 63) // 64 * 64
        chunks.append((offset, data))
        end = offset + len(data)
        return offset

    offsets: dict[int, int] = {}

    def where(ptr) -> int:
        if not ptr:
            return 0
        if ptr not in offsets:
            t = tensors[ptr]
            offsets[ptr] = add(ctypes.string_at(ptr, t.numel() * t.element_size()))
        return offsets[ptr]

    def matrix(m):
        m.data, m.scale, m.aux = where(m.data), where(m.scale), where(m.aux)

    net = native.Net.from_buffer_copy(backend.net)
    blocks = type(backend._blocks).from_buffer_copy(backend._blocks)
    add(bytes(ctypes.sizeof(net)))  # the Net itself, at offset 0
    net.blocks = add(bytes(ctypes.sizeof(blocks)))
    for name in ("layer_to_block", "embed", "norm", "rope_cos", "rope_sin", "k_cache", "v_cache"):
        setattr(net, name, where(getattr(net, name)))
    matrix(net.head)
    for b in blocks:
        b.ln1, b.ln2 = where(b.ln1), where(b.ln2)
        for m in (b.qkv, b.o, b.up, b.down):
            matrix(m)
    blob = bytearray(end)
    for offset, data in chunks:
        blob[offset:offset + len(data)] = data
    blob[:ctypes.sizeof(net)] = bytes(net)
    blob[net.blocks:net.blocks + ctypes.sizeof(blocks)] = bytes(blocks)
    ids = [t for p in prompts for t in p]
    rows = [i for i, p in enumerate(prompts) for _ in p]
    positions = [j for p in prompts for j in range(len(p))]
    n = len(ids)
    return (struct.pack("<3q", len(blob), n, n) + bytes(blob) + struct.pack(f"<{n}q", *ids)
            + struct.pack(f"<{3 * n}i", *rows, *positions, *range(n)))


def allowance(got: torch.Tensor, want: torch.Tensor) -> str | None:
    """test_native_integer's allowance for an activation that fp32 rounding moves across an int8
    rounding boundary (that position and the later ones of its prompt): None where it holds."""
    errors = torch.cat([(g - w).abs().amax(-1) / w.std() for g, w in zip(got, want)])
    close = (errors < 1e-4).float().mean()
    if close > 0.5 and errors.max() < 0.2:
        return None
    return f"{close:.0%} of positions match; worst {errors.max():.3f} std"


@pytest.mark.parametrize("preset", ["mobilellm-tiny", "mobilellm-tiny-ls"])
@pytest.mark.parametrize("precision", ["fp32", "int8", "int4"])
def test_aarch64_build_matches_torch(driver, generic_driver, tmp_path, preset, precision):
    model = tiny(preset)
    prompts = [torch.randint(3, 300, (12,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(8)]
    backend = native.NativeBackend(copy.deepcopy(model), precision, max_batch=len(prompts), max_len=12)
    data = serialize(backend, prompts)
    used, got = run(driver, "forward", data, tmp_path)
    got = got.view(len(prompts), 12, -1)
    if precision == "fp32":
        with torch.no_grad():
            torch.testing.assert_close(got, model(torch.tensor(prompts)), rtol=1e-4, atol=1e-4)
        return
    assert used == NEON, f"the +dotprod build ran the {native.ISAS[used]} integer kernels"
    # in one binary only the integer kernels change, and they give the same bits
    used, scalar = run(driver, "forward", data, tmp_path, isa=SCALAR)
    assert used == SCALAR and torch.equal(scalar.view_as(got), got), "NEON and plain C integer kernels disagree"
    used, fallback = run(generic_driver, "forward", data, tmp_path, cpu=NO_DOTPROD)
    assert used == SCALAR, f"an armv8-a build on {NO_DOTPROD} chose {native.ISAS[used]}"
    # against the quantized reference and the x86 build: other fp32 code, so rounding flips allowed
    ref = reference_net(model, precision)
    want = [ref(p) for p in prompts]
    with torch.inference_mode():
        ids = [t for p in prompts for t in p]
        x86 = backend._forward(ids, [i for i, p in enumerate(prompts) for _ in p],
                               [j for p in prompts for j in range(len(p))], list(range(len(ids)))).view_as(got)
    for name, result in (("NEON", got), ("fallback", fallback.view_as(got))):
        assert (miss := allowance(result, want)) is None, f"{name} against the reference: {miss}"
        assert (miss := allowance(result, x86)) is None, f"{name} against x86: {miss}"


def serialize_matrix(parts: list[torch.Tensor], precision: str, x: torch.Tensor) -> bytes:
    """The driver's matmul input: native.integer_weights' (data, scale, aux) and activations."""
    data, scale, aux = (p.contiguous() for p in parts)
    cols = data.shape[1] * (2 if precision == "int4" else 1)
    raw = [ctypes.string_at(t.data_ptr(), t.numel() * t.element_size()) for t in (data, scale, aux)]
    head = struct.pack("<7q", native.WEIGHT_TYPES[precision], data.shape[0], cols, x.shape[0], *map(len, raw))
    return head + b"".join(raw) + x.float().contiguous().numpy().tobytes()


# as test_native_integer: an odd number of int4 groups, int8 rows with a tail after the last 16 columns
SHAPES = [(p, n, c) for p in ("int8", "int4") for n, c in ((1, 96), (3, 160), (8, 256))] + [("int8", 5, 200)]


@pytest.mark.parametrize("precision,n,cols", SHAPES)
def test_aarch64_integer_kernels_match_x86(driver, generic_driver, tmp_path, precision, n, cols):
    """One integer matrix product alone on every aarch64 path, against x86's kernels and the reference."""
    torch.manual_seed(cols)
    bits, group, _ = RULES[precision]
    q, scale = quantize_weight(torch.randn(42, cols), bits=bits, group_size=group)  # 42: a tail of 2 rows
    x = torch.randn(n, cols) * 3
    data = serialize_matrix(native.integer_weights(q, scale, precision), precision, x)
    runs = {"neon": run(driver, "matmul", data, tmp_path), "scalar": run(driver, "matmul", data, tmp_path, isa=SCALAR),
            # qemu's default CPU has dot products: found at run time
            "generic": run(generic_driver, "matmul", data, tmp_path, log=tmp_path / "neon.log"),
            "generic scalar": run(generic_driver, "matmul", data, tmp_path, isa=SCALAR, log=tmp_path / "scalar.log"),
            "fallback": run(generic_driver, "matmul", data, tmp_path, cpu=NO_DOTPROD),
            "avx2": run(driver, "matmul", data, tmp_path, isa=native.ISAS.index("avx2"))}  # an x86 set: plain C
    assert {k: native.ISAS[u] for k, (u, _) in runs.items()} == {
        "neon": "neon-dotprod", "scalar": "scalar", "generic": "neon-dotprod", "generic scalar": "scalar",
        "fallback": "scalar", "avx2": "scalar"}
    # the armv8-a build has dot products only in the NEON kernels: they ran when chosen, and only then
    assert ran_udot(tmp_path / "neon.log") and not ran_udot(tmp_path / "scalar.log")
    got = {k: y.view(n, -1) for k, (_, y) in runs.items()}
    # int32 sums and the same fp32 steps in the same order: the same bits on every aarch64 path
    assert all(torch.equal(y, got["neon"]) for y in got.values()), "aarch64 integer kernels disagree"
    best = native.integer_isa()
    try:
        x86 = {isa: native.qmatmul(q, scale, x, precision) for isa in native.ISAS if native.integer_isa(isa) == isa}
    finally:
        native.integer_isa(best)
    for isa, want in x86.items():
        if precision == "int8":  # exact int32 sums, then the same two fp32 products
            assert torch.equal(got["neon"], want), f"aarch64 differs from x86 {isa}"
        else:  # the scaled group sums in fp32, fused or not, in another order: their rounding only
            torch.testing.assert_close(got["neon"], want, rtol=1e-5, atol=2e-4, msg=f"aarch64 against x86 {isa}")
    tol = {"int8": dict(rtol=1e-5, atol=1e-4), "int4": dict(rtol=1e-5, atol=2e-4)}[precision]
    torch.testing.assert_close(got["neon"], reference(q, scale, x), **tol)
