import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import run_cli
from mobilellm.checkpoint import load_model_dir, save_model_dir
from mobilellm.config import get_preset
from mobilellm.errors import MobileLLMError
from mobilellm.model import MobileLLM
from mobilellm.quantize import (
    QuantizedEmbedding,
    QuantizedLinear,
    dequantize_weight,
    fake_quantize_activations,
    pack_int4,
    quantize_model,
    quantize_weight,
    scheme_from_name,
    to_fast_cpu,
    unpack_int4,
)


def tiny(preset="mobilellm-tiny", **changes):
    # ffn_dim 192: every input width is a multiple of 32, as 8da4w needs
    return MobileLLM(get_preset(preset, **{"ffn_dim": 192, **changes})).eval()


@pytest.mark.parametrize("bits,group", [(8, None), (4, 32), (4, 64)])
def test_weight_quantization_is_symmetric_min_max_within_half_a_step(bits, group):
    w = torch.randn(48, 128) * torch.rand(48, 1) * 3
    q, scale = quantize_weight(w, bits, group)
    assert q.dtype == torch.int8 and scale.shape == (48, 128 // (group or 128))
    assert q.min() >= -(2 ** (bits - 1)) and q.max() <= 2 ** (bits - 1) - 1
    err = (dequantize_weight(q, scale) - w).abs().reshape(48, scale.shape[1], -1)
    assert (err <= scale[..., None] / 2 + 1e-6).all()
    # min-max: each group's largest magnitude maps to the edge of the symmetric range
    amax = w.abs().reshape(48, scale.shape[1], -1).amax(-1)
    assert torch.allclose(scale, amax / (2 ** bits - 1) * 2)


def test_int4_packing_roundtrips_and_halves_the_bytes():
    q = torch.randint(-8, 8, (16, 64), dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (16, 32)
    assert torch.equal(unpack_int4(packed), q)


def test_activation_fake_quant_is_per_token_and_keeps_zero_exact():
    x = torch.randn(2, 5, 64) * torch.tensor([0.01, 1, 10, 100, 1000])[None, :, None]
    x[0, 0, :7] = 0
    y = fake_quantize_activations(x)
    span = x.amax(-1).clamp(min=0) - x.amin(-1).clamp(max=0)
    assert ((y - x).abs() <= (span / 255)[..., None] * 0.5 + 1e-6).all()  # per-token step, not per-tensor
    assert (y[0, 0, :7] == 0).all()


@pytest.mark.parametrize("scheme", ["w8a8", "8da4w"])
def test_quantized_linear_equals_an_integer_matmul(scheme):
    """Dequantize correctness: the float reference path equals int8 x intN accumulation in int64."""
    qlin = QuantizedLinear.from_linear(torch.nn.Linear(128, 96, bias=False), scheme_from_name(scheme))
    x = torch.randn(3, 128) * 2 + 0.5
    # integer reference: asymmetric per-token int8 activations, symmetric weights, exact int64 sums per group
    lo, hi = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
    sx = (hi - lo) / 255
    zp = torch.clamp(-128 - torch.round(lo / sx), -128, 127)
    qx = torch.clamp(torch.round(x * (1.0 / sx)) + zp, -128, 127).long() - zp.long()  # (3, 128)
    G = qlin.weight_scale.shape[1]
    acc = torch.einsum("tgi,ogi->tog", qx.reshape(3, G, -1), qlin.weight_q.long().reshape(96, G, -1))  # int64
    expected = (acc.double() * qlin.weight_scale.double()[None]).sum(-1) * sx.double()
    assert torch.allclose(qlin(x).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme,embedding,tol", [("w8a8", "none", 0.05), ("int8", "int8", 0.05), ("8da4w", "int4", 0.5)])
def test_quantized_dir_roundtrips_through_load_model_dir(tmp_path, scheme, embedding, tol):
    model = tiny()
    tokens = torch.randint(0, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        ref = model(tokens)
        q = quantize_model(copy.deepcopy(model), scheme, embedding=embedding)
        out = q(tokens)
    save_model_dir(q, tmp_path / "q")
    hf = json.loads((tmp_path / "q" / "config.json").read_text())
    assert hf["quantization"]["scheme"] == scheme and hf["model_type"] == "mobilellm"
    state = load_file(tmp_path / "q" / "model.safetensors")
    qkey = "model.layers.0.mlp.up_proj.weight"
    assert state[qkey].dtype == (torch.uint8 if scheme == "8da4w" else torch.int8)
    assert state[qkey + "_scale"].dtype == torch.float32
    reloaded = load_model_dir(tmp_path / "q")
    assert isinstance(reloaded.layers[1].self_attn.q_proj, QuantizedLinear)
    assert isinstance(reloaded.embed_tokens, QuantizedEmbedding) == (embedding != "none")
    with torch.no_grad():
        assert torch.equal(reloaded(tokens), out)  # exactly the same integers and scales
    assert 0 < (out - ref).abs().max() < tol * ref.abs().max()


def test_layer_shared_model_quantizes_each_block_once(tmp_path):
    model = tiny("mobilellm-tiny-ls")
    save_model_dir(model, tmp_path / "f")
    save_model_dir(quantize_model(copy.deepcopy(model), "w8a8"), tmp_path / "q")
    state = load_file(tmp_path / "q" / "model.safetensors")
    assert len([k for k in state if k.endswith("q_proj.weight")]) == model.config.n_layers
    reloaded = load_model_dir(tmp_path / "q")
    assert reloaded.layer_to_block == model.layer_to_block
    f_bytes = (tmp_path / "f" / "model.safetensors").stat().st_size
    q_bytes = (tmp_path / "q" / "model.safetensors").stat().st_size
    assert q_bytes < 0.6 * f_bytes  # block weights at 1 byte instead of 4; embedding stays fp32


def test_fast_cpu_path_keeps_the_int8_weights():
    model = quantize_model(tiny(), "int8")
    tokens = torch.randint(0, model.config.vocab_size, (1, 16))
    with torch.no_grad():
        ref = model(tokens)
        fast = to_fast_cpu(copy.deepcopy(model))(tokens)
    assert not any(isinstance(m, QuantizedLinear) for m in to_fast_cpu(copy.deepcopy(model)).modules())
    assert (fast - ref).abs().max() < 0.05 * ref.abs().max()  # only the activation rounding differs


def test_quantize_matches_torchao_numerics():
    pytest.importorskip("torchao")
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8Tensor,
        _apply_int8_act_asym_per_token_quant_dequant,
    )

    w = torch.randn(64, 128)
    for bits, group in ((8, None), (4, 32)):
        q, scale = quantize_weight(w, bits, group)
        ref = IntxUnpackedToInt8Tensor.from_hp(w, (1, group or 128), getattr(torch, f"int{bits}"))
        assert torch.equal(ref.qdata, q)
        assert torch.equal(ref.scale.reshape(scale.shape), scale)
    x = torch.randn(7, 128) * 3 + 1
    assert torch.equal(fake_quantize_activations(x), _apply_int8_act_asym_per_token_quant_dequant(x))


def test_quantize_cli_writes_a_loadable_dir_and_reports_size(tmp_path):
    model = tiny()
    save_model_dir(model, tmp_path / "f")
    proc = run_cli("quantize", tmp_path / "f", "--precision", "int4", "--group-size", "32", "--output", tmp_path / "q",
                   check=True)
    assert "8da4w" in proc.stdout and "MiB" in proc.stdout
    q = load_model_dir(tmp_path / "q")
    assert q.quantization["group_size"] == 32
    tokens = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        assert F.cosine_similarity(q(tokens).flatten(), model(tokens).flatten(), dim=0) > 0.95


def test_quantize_cli_bad_input_is_one_line_and_writes_nothing(tmp_path):
    save_model_dir(MobileLLM(get_preset("mobilellm-tiny")), tmp_path / "f")  # ffn_dim 172: no 32-group fits
    cases = [
        (["quantize", tmp_path / "missing", "--precision", "int8", "--output", tmp_path / "o1"], "does not exist"),
        (["quantize", tmp_path / "f", "--precision", "int4", "--output", tmp_path / "o2"], "ffn_dim (172)"),
        (["quantize", tmp_path / "f", "--precision", "int4", "--group-size", "48", "--output", tmp_path / "o3"],
         "multiple of 32"),
    ]
    for args, needle in cases:
        proc = run_cli(*args)
        assert proc.returncode != 0
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], proc.stderr
        assert not args[-1].exists()
    run_cli("quantize", tmp_path / "f", "--precision", "int8", "--output", tmp_path / "q", check=True)
    proc = run_cli("quantize", tmp_path / "q", "--precision", "int8-weight-only", "--output", tmp_path / "qq")
    assert proc.returncode != 0 and "already quantized" in proc.stderr and not (tmp_path / "qq").exists()


def test_quantize_rejects_a_group_size_that_does_not_divide():
    with pytest.raises(MobileLLMError, match="does not divide"):
        quantize_model(tiny(ffn_dim=160), "8da4w", group_size=64)
