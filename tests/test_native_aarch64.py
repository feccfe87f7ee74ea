"""The native kernels built for aarch64 (Debian's cross compiler) give PyTorch's logits under
qemu-aarch64 user-mode emulation: the network the x86 build would run is written to a file, with
its pointers as offsets, and tests/native_forward_driver.c runs mobilellm_forward on it there.
Timing under emulation means nothing; correctness is the point."""

import copy
import ctypes
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch

from test_native_integer import reference_net, tiny

native = pytest.importorskip("mobilellm.inference.native")
CROSS_CC, QEMU = "aarch64-linux-gnu-gcc", "qemu-aarch64"
DRIVER = Path(__file__).with_name("native_forward_driver.c")


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    missing = [tool for tool in (CROSS_CC, QEMU) if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs {' and '.join(missing)} (apt-get install gcc-aarch64-linux-gnu qemu-user)")
    try:
        native.library()  # the network is laid out by the x86 build's loader
    except native.NativeUnavailable as exc:
        pytest.skip(f"native backend unavailable: {exc}")
    exe = tmp_path_factory.mktemp("aarch64") / "driver"
    # armv8.2-a with dot products: what phones since 2018 have; static, so qemu needs no aarch64 root
    proc = subprocess.run([CROSS_CC, "-O3", "-march=armv8.2-a+fp16+dotprod", "-fopenmp", "-fno-strict-aliasing",
                           "-static", "-I", str(native.SOURCE.parent), "-o", str(exe), str(DRIVER), "-lm"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return exe


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


@pytest.mark.parametrize("preset", ["mobilellm-tiny", "mobilellm-tiny-ls"])
@pytest.mark.parametrize("precision", ["fp32", "int8", "int4"])
def test_aarch64_build_matches_torch(driver, tmp_path, preset, precision):
    model = tiny(preset)
    prompts = [torch.randint(3, 300, (12,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(8)]
    backend = native.NativeBackend(copy.deepcopy(model), precision, max_batch=len(prompts), max_len=12)
    (tmp_path / "in").write_bytes(serialize(backend, prompts))
    proc = subprocess.run([QEMU, str(driver), str(tmp_path / "in"), str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    got = torch.frombuffer(bytearray((tmp_path / "out").read_bytes()), dtype=torch.float32).view(len(prompts), 12, -1)
    if precision == "fp32":
        with torch.no_grad():
            torch.testing.assert_close(got, model(torch.tensor(prompts)), rtol=1e-4, atol=1e-4)
        return
    # against the quantized reference, with test_native_integer's allowance for an activation that
    # fp32 rounding moves across an int8 rounding boundary (that position and the later ones)
    ref = reference_net(model, precision)
    errors = torch.cat([(got[i] - ref(p)).abs().amax(-1) / ref(p).std() for i, p in enumerate(prompts)])
    close = (errors < 1e-4).float().mean()
    assert close > 0.5 and errors.max() < 0.2, f"{close:.0%} of positions match; worst {errors.max():.3f} std"
