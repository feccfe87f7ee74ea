"""The native integer matrix product equals the quantized arithmetic it stands for (quantize.py's rules)."""

import pytest
import torch

from mobilellm.quantize import dequantize_weight, fake_quantize_activations, quantize_weight

native = pytest.importorskip("mobilellm.inference.native")


@pytest.fixture(scope="module")
def lib():
    try:
        return native.library()
    except native.NativeUnavailable as exc:
        pytest.skip(f"native backend unavailable: {exc}")


@pytest.mark.parametrize("n", [1, 3, 8])
def test_qmatmul_i8_matches_reference(lib, n):
    torch.manual_seed(n)
    w = torch.randn(48, 96)
    x = torch.randn(n, 96) * 3
    q, scale = quantize_weight(w, bits=8, group_size=None)
    got = native.qmatmul_i8(q, scale, x)
    want = fake_quantize_activations(x) @ dequantize_weight(q, scale).t()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_qmatmul_i8_batched_equals_one_by_one(lib):
    torch.manual_seed(0)
    q, scale = quantize_weight(torch.randn(32, 64), bits=8, group_size=None)
    x = torch.randn(5, 64)
    batched = native.qmatmul_i8(q, scale, x)
    single = torch.cat([native.qmatmul_i8(q, scale, x[i:i + 1]) for i in range(5)])
    assert torch.equal(batched, single)
