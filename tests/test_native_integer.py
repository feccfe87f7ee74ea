"""The native integer kernels (int8 rows, int4 groups of 32, int8 activations per token) equal the
quantized arithmetic they stand for (quantize.py's rules), on every instruction set this CPU has, alone
and inside the native forward pass."""

import copy

import pytest
import torch

from mobilellm.config import get_preset
from mobilellm.inference.layout import Matrix, output_matrix
from mobilellm.model import MobileLLM
from mobilellm.precision import INT4_GROUP
from mobilellm.quantize import dequantize_weight, fake_quantize_activations, quantize_model, quantize_weight

native = pytest.importorskip("mobilellm.inference.native")
RULES = {"int8": (8, None, "w8a8"), "int4": (4, INT4_GROUP, "8da4w")}  # bits, group, quantize.py scheme


@pytest.fixture(scope="module")
def lib():
    try:
        return native.library()
    except native.NativeUnavailable as exc:
        pytest.skip(f"native backend unavailable: {exc}")


@pytest.fixture(params=native.ISAS)
def isa(lib, request):
    """Each instruction set of the integer kernels that this CPU has (the others: skipped, saying so)."""
    best = native.integer_isa()
    if native.integer_isa(request.param) != request.param:  # an x86 set on ARM, or the reverse, too
        native.integer_isa(best)
        pytest.skip(f"this CPU has no {request.param} (best: {best})")
    yield request.param
    native.integer_isa(best)


def reference(q, scale, x):
    """What the integer kernel stands for, in float: fake-quantized activations times dequantized weights."""
    return fake_quantize_activations(x) @ dequantize_weight(q, scale).t()


# 96, 160, 192 and 576 input columns: int4 runs of 4 groups ending in 3, 1, 2 and 2 groups, int8 rows that
# are not a multiple of 64; 1-13 tokens: single tokens, 4-token tiles and their remainders
@pytest.mark.parametrize("precision", ["int8", "int4"])
@pytest.mark.parametrize("n,cols", [(1, 96), (3, 160), (8, 256), (5, 192), (13, 576)])
def test_qmatmul_matches_reference(isa, precision, n, cols):
    torch.manual_seed(n)
    bits, group, _ = RULES[precision]
    q, scale = quantize_weight(torch.randn(48, cols), bits=bits, group_size=group)
    x = torch.randn(n, cols) * 3
    got = native.qmatmul(q, scale, x, precision)
    # int8: exact int32 sums, then two fp32 multiplications; int4: fp32 sums of a few group sums, and
    # the zero point's share subtracted in fp32 (values of ~1e2 cancelling): a few fp32 ulps of 1e2
    tol = {"int8": dict(rtol=1e-5, atol=1e-4), "int4": dict(rtol=1e-5, atol=2e-4)}[precision]
    torch.testing.assert_close(got, reference(q, scale, x), **tol)


def test_int8_is_exact_on_every_instruction_set(lib):
    """int8 sums are exact integers: every instruction set gives the same bits."""
    torch.manual_seed(1)
    q, scale = quantize_weight(torch.randn(40, 200), bits=8, group_size=None)
    x = torch.randn(5, 200)
    best = native.integer_isa()
    try:
        results = [native.qmatmul(q, scale, x) for _ in (native.integer_isa(i) for i in native.ISAS)]
    finally:
        native.integer_isa(best)
    assert all(torch.equal(r, results[0]) for r in results)


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_qmatmul_batched_equals_one_by_one(lib, precision):
    torch.manual_seed(0)
    bits, group, _ = RULES[precision]
    q, scale = quantize_weight(torch.randn(32, 64), bits=bits, group_size=group)
    x = torch.randn(5, 64)
    batched = native.qmatmul(q, scale, x, precision)
    single = torch.cat([native.qmatmul(q, scale, x[i:i + 1], precision) for i in range(5)])
    assert torch.equal(batched, single)


def test_int4_layout_holds_every_value(lib):
    """Each int4 value -8..7 in each position of a group comes back: the packing and the unpacking agree."""
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(4)[torch.randperm(64)].view(2, 32)
    eye = torch.eye(32)  # one-hot activations pick out single weights (times the activation scale's rounding)
    got = native.qmatmul(q, torch.ones(2, 1), eye, "int4")
    torch.testing.assert_close(got, reference(q, torch.ones(2, 1), eye), rtol=0, atol=1e-5)
    assert torch.equal(got.round().t().to(torch.int8), q)


# ---- the forward pass -------------------------------------------------------------------------


def tiny(preset="mobilellm-tiny", **overrides) -> MobileLLM:
    # widths multiples of 32 (int4 groups): dim 128 (an even number of groups), ffn 96 (odd)
    torch.manual_seed(0)
    cfg = get_preset(preset, dim=128, ffn_dim=96, n_heads=4, n_kv_heads=2, vocab_size=300, **overrides)
    model = MobileLLM(cfg).eval()
    with torch.no_grad():  # larger than the default init, so that activations spread over the int8 range
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    return model


def reference_net(model: MobileLLM, precision: str):
    """The quantized network in float, ids -> logits (T, vocab): quantize.py's modules for the blocks
    (fake-quantized activations, dequantized weights), the output matrix quantized by the same rule."""
    bits, group, scheme = RULES[precision]
    ref = quantize_model(copy.deepcopy(model), scheme, group_size=group or 32)
    q, scale = quantize_weight(output_matrix(model).dense(), bits=bits, group_size=group)

    def logits(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return reference(q, scale, ref.hidden_states(torch.tensor([ids]))[0])
    return logits


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_native_forward_matches_quantized_reference(isa, precision):
    """Prefill logits at every position of 6 prompts (one longer than a prefill chunk) against the reference.

    fp32 rounding (attention, norms, sums in another order) can move one activation across a rounding
    boundary of its int8 grid, about one value in 10^4 here: that position and the later ones of its
    prompt (through the KV cache) then differ by one grid step's effect, measured at 0.01-0.08 of the
    logits' spread on this model. Elsewhere native and reference agree to fp32 rounding (~1e-6). So:
    most positions agree to 1e-4 of the spread (no systematic error: fp32 activations, a wrong scale
    or zero point or int4 layout miss at every position; quantization itself is 0.1 (int8) and 1 (int4)
    of the spread here), and none is off by more than 0.2 (a few flips, not a wrong matrix)."""
    model = tiny()
    backend = native.NativeBackend(copy.deepcopy(model), precision, max_batch=1, max_len=80)
    ref = reference_net(model, precision)
    prompts = [torch.randint(3, 300, (12,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(8)]
    errors = []
    for ids in prompts + [list(range(5, 75))]:  # the last: longer than one prefill chunk
        with torch.inference_mode():
            backend.free(0)
            got = backend._forward(ids, [0] * len(ids), list(range(len(ids))), list(range(len(ids))))
        want = ref(ids)
        errors.append((got - want).abs().amax(-1) / want.std())
    close = (torch.cat(errors[:-1]) < 1e-4).float().mean()  # short prompts: few flips each
    assert close > 0.5, f"native {precision}: only {close:.0%} of positions match the reference"
    worst = torch.cat(errors).max()
    assert worst < 0.2, f"native {precision} logits differ from the reference by {worst:.3f} std"


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_native_integer_batched_decode_equals_alone(lib, precision):
    """A row's logits do not depend on the rows decoded beside it (activations quantized per token)."""
    model = tiny()
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13]]
    batched = native.NativeBackend(copy.deepcopy(model), precision, max_batch=3, max_len=16)
    alone = native.NativeBackend(copy.deepcopy(model), precision, max_batch=1, max_len=16)
    with torch.inference_mode():
        for row, p in enumerate(prompts):
            batched.prefill(row, p)
        step = batched.decode([0, 1, 2], [20, 21, 22])
        for row, p in enumerate(prompts):
            alone.prefill(0, p)
            assert torch.equal(alone.decode([0], [20 + row])[0], step[row])
            alone.free(0)


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_native_integer_layer_sharing_equals_unrolled(lib, precision):
    """An LS model (each block run twice) gives the logits of the same network with the blocks copied."""
    shared = tiny("mobilellm-tiny-ls")
    unrolled = tiny(n_layers=len(shared.layer_to_block))
    unrolled.load_state_dict(shared.state_dict(), strict=False)
    for layer, block in enumerate(shared.layer_to_block):
        unrolled.layers[layer].load_state_dict(shared.layers[block].state_dict())
    ids = list(range(5, 30))
    with torch.inference_mode():
        a, b = (native.NativeBackend(m, precision, max_batch=1, max_len=32).prefill(0, ids) for m in (shared, unrolled))
    assert torch.equal(a, b)


def test_cpu_without_vnni_says_so_once(lib, capsys):
    """Where the best integer kernels are missing (forced here), building an int8 backend prints one
    line naming the instruction set in use, and the output is still right."""
    best = native.integer_isa()
    if native.integer_isa("avx2") != "avx2":
        native.integer_isa(best)
        pytest.skip(f"this CPU has no avx2 (best: {best})")
    native.note_once.cache_clear()
    try:
        model = tiny()
        backend = native.NativeBackend(copy.deepcopy(model), "int8", max_batch=1, max_len=16)
        native.NativeBackend(copy.deepcopy(model), "int8", max_batch=1, max_len=16)
        logits = backend.prefill(0, [1, 2, 3])
    finally:
        native.integer_isa(best)
        native.note_once.cache_clear()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "avx2" in lines[0], lines
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_prefill_does_not_depend_on_its_chunks(lib, precision, monkeypatch):
    """150 prompt tokens in the backend's prefill chunks give the logits and cache of the same prompt
    in chunks of 40: every (row, token) product is computed alone, whichever call it is in."""
    torch.manual_seed(0)
    model = tiny(max_seq_len=160)
    ids = torch.randint(3, 300, (150,), generator=torch.Generator().manual_seed(1)).tolist()
    one = native.NativeBackend(copy.deepcopy(model), precision, max_batch=1, max_len=160)
    whole = one.prefill(0, ids)
    monkeypatch.setattr(native, "PREFILL_CHUNK", 40)
    chunked = native.NativeBackend(copy.deepcopy(model), precision, max_batch=1, max_len=160)
    parts = chunked.prefill(0, ids)
    torch.testing.assert_close(whole, parts, rtol=0, atol=1e-5)
    torch.testing.assert_close(one.cache.k[:, 0, :, :150], chunked.cache.k[:, 0, :, :150], rtol=0, atol=1e-5)
