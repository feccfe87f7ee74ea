"""Post-training quantization: the schemes (w8a8, int8, 8da4w), their numerics and the quantized modules.

Numerics follow torchao's conventions exactly, so the ExecuTorch exporter can hand our integers to
torchao/XNNPACK unchanged. The reference modules below compute in float on the dequantized values
("fake quant"): the result equals the integer kernel's up to float rounding and needs nothing beyond
torch. The on-disk format (read and written by mobilellm.checkpoint) is described in docs/export.md."""

from __future__ import annotations

from dataclasses import dataclass
import torch
import torch.nn.functional as F
from torch import nn

from mobilellm.errors import MobileLLMError
from mobilellm.model import MobileLLM

SCHEMES = ("w8a8", "int8", "8da4w")
EMBEDDING_MODES = ("none", "int8", "int4")
FORMAT_VERSION = 1
_EPS = torch.finfo(torch.float32).eps  # torchao's scale floor for float32


@dataclass(frozen=True)
class QuantScheme:
    name: str
    weight_bits: int  # 8 or 4
    group_size: int | None  # None: one scale per output channel
    dynamic_activations: bool  # int8 per-token activations


def scheme_from_name(name: str, group_size: int = 32) -> QuantScheme:
    if name == "w8a8":
        return QuantScheme(name, 8, None, True)
    if name == "int8":
        return QuantScheme(name, 8, None, False)
    if name == "8da4w":
        if group_size <= 0 or group_size % 32 != 0:
            raise MobileLLMError(f"--group-size {group_size}: 8da4w needs a positive multiple of 32 (XNNPACK's limit)")
        return QuantScheme(name, 4, group_size, True)
    raise MobileLLMError(f"unknown quantization scheme {name!r}; choose from {', '.join(SCHEMES)}")


def _qrange(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1  # int8 (-128, 127), int4 (-8, 7)


def quantize_weight(w: torch.Tensor, bits: int, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric min-max. w (out, in) float -> q (out, in) int8, scale (out, in // group) float32."""
    out_f, in_f = w.shape
    group = group_size or in_f
    if in_f % group != 0:
        raise MobileLLMError(f"group size {group} does not divide a weight's {in_f} input columns; "
                             "choose a --group-size that divides every layer width")
    qmin, qmax = _qrange(bits)
    grouped = w.detach().float().reshape(out_f, in_f // group, group)  # (out, G, group)
    amax = grouped.abs().amax(-1)  # (out, G)
    scale = (amax / ((qmax - qmin) / 2)).clamp(min=_EPS)
    q = torch.clamp(torch.round(grouped * (1.0 / scale[..., None])), qmin, qmax).to(torch.int8)  # torchao order
    return q.reshape(out_f, in_f), scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q (out, in) int8, scale (out, G) -> (out, in) float32."""
    out_f, in_f = q.shape
    groups = scale.shape[1]
    return (q.float().reshape(out_f, groups, in_f // groups) * scale[..., None]).reshape(out_f, in_f)


def fake_quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """Asymmetric per-token int8 quantize-dequantize, as the integer kernel sees its input. x (..., in)."""
    qmin, qmax = _qrange(8)
    x32 = x.float()
    lo = x32.amin(-1, keepdim=True).clamp(max=0)  # the range always holds 0 (exact zero padding)
    hi = x32.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / (qmax - qmin)).clamp(min=_EPS)  # (..., 1)
    zero_point = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
    q = torch.clamp(torch.round(x32 * (1.0 / scale)) + zero_point, qmin, qmax)
    return ((q - zero_point) * scale).to(x.dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], (out, in) with even in -> uint8 (out, in // 2), low nibble first."""
    u = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    lo = (packed & 0xF).to(torch.int8)
    hi = (packed >> 4).to(torch.int8)
    both = torch.stack((lo, hi), dim=-1).reshape(packed.shape[0], -1)  # (out, in)
    return torch.where(both >= 8, both - 16, both).to(torch.int8)


class QuantizedLinear(nn.Module):
    """A bias-free Linear holding integer weights and their scales (reference numerics)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bits: int, dynamic_activations: bool):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.bits = bits
        self.dynamic_activations = dynamic_activations
        self.register_buffer("weight_q", q.to(torch.int8))  # (out, in), values in the bits' range
        self.register_buffer("weight_scale", scale.float())  # (out, G)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: QuantScheme) -> "QuantizedLinear":
        q, scale = quantize_weight(linear.weight, scheme.weight_bits, scheme.group_size)
        return cls(q, scale, scheme.weight_bits, scheme.dynamic_activations)

    @property
    def group_size(self) -> int:
        return self.in_features // self.weight_scale.shape[1]

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_weight(self.weight_q, self.weight_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic_activations:
            x = fake_quantize_activations(x)
        return F.linear(x, self.dequantized_weight().to(x.dtype))

    def extra_repr(self) -> str:
        acts = "int8 dynamic per-token" if self.dynamic_activations else "float"
        return (f"in={self.in_features}, out={self.out_features}, weights=int{self.bits} "
                f"group={self.group_size}, activations={acts}")


class QuantizedEmbedding(nn.Module):
    """Embedding rows stored as integers with per-row (int8) or per-group (int4) scales.

    `.weight` is the dequantized matrix, so the tied output projection (`model.output_weight`)
    sees exactly the values the lookup returns.
    """

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bits: int):
        super().__init__()
        self.num_embeddings, self.embedding_dim = q.shape
        self.bits = bits
        self.register_buffer("weight_q", q.to(torch.int8))  # (V, dim)
        self.register_buffer("weight_scale", scale.float())  # (V, G)

    @property
    def weight(self) -> torch.Tensor:
        return dequantize_weight(self.weight_q, self.weight_scale)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = self.weight_q[tokens].float()  # (B, T, dim): dequantize only the rows looked up
        scale = self.weight_scale[tokens]  # (B, T, G)
        groups = scale.shape[-1]
        return (rows.unflatten(-1, (groups, -1)) * scale[..., None]).flatten(-2)


def embedding_quant(mode: str, group_size: int) -> tuple[int, int | None] | None:
    if mode == "none":
        return None
    if mode == "int8":
        return 8, None
    if mode == "int4":
        return 4, group_size
    raise MobileLLMError(f"unknown --embedding {mode!r}; choose from {', '.join(EMBEDDING_MODES)}")


def linear_names(model: MobileLLM) -> list[str]:
    """Qualified names of the block Linears (the output matrix is handled by the embedding setting)."""
    return [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear) and name.startswith("layers.")]


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def quantize_model(model: MobileLLM, scheme: str, *, group_size: int = 32, embedding: str = "none") -> MobileLLM:
    """Replace the block Linears (and optionally the embedding/output matrix) in place; returns the model."""
    if getattr(model, "quantization", None):
        raise MobileLLMError("model is already quantized; quantize its float model directory instead")
    spec = scheme_from_name(scheme, group_size)
    emb = embedding_quant(embedding, group_size)
    cfg = model.config
    widths = {"dim": cfg.dim, "ffn_dim": cfg.ffn_dim, "attention width": cfg.n_heads * cfg.attn_head_dim}
    checks = [(spec.group_size, widths)] + ([(emb[1], {"dim": cfg.dim})] if emb else [])
    for group, named in checks:
        for what, width in named.items():
            if group and width % group != 0:
                raise MobileLLMError(f"--group-size {group} does not divide the model's {what} ({width}); "
                                     f"choose a multiple of 32 that divides it ({_divisor_hint(width)})")
    with torch.no_grad():
        for name in linear_names(model):
            set_module(model, name, QuantizedLinear.from_linear(model.get_submodule(name), spec))
        if emb is not None:
            bits, group = emb
            q, scale = quantize_weight(model.embed_tokens.weight, bits, group)
            model.embed_tokens = QuantizedEmbedding(q, scale, bits)
            if model.lm_head is not None:
                q, scale = quantize_weight(model.lm_head.weight, bits, group)
                model.lm_head = QuantizedLinear(q, scale, bits, dynamic_activations=False)
    model.quantization = {"scheme": scheme, "group_size": spec.group_size, "embedding": embedding,
                          "embedding_group_size": emb[1] if emb else None, "format_version": FORMAT_VERSION}
    return model.eval()


def _divisor_hint(width: int) -> str:
    options = [g for g in (32, 64, 128, 256) if width % g == 0]
    return ", ".join(map(str, options)) if options else "none exists: use --scheme w8a8 or int8"


def float_modules(model: MobileLLM, keep=lambda module: False) -> MobileLLM:
    """Replace quantized modules (in place) by float ones holding their dequantized weights, the values
    the model computes with; modules for which keep(module) is true stay. For runtimes that take floats."""
    for name, mod in list(model.named_modules()):
        if keep(mod):
            continue
        if isinstance(mod, QuantizedLinear):
            linear = nn.Linear(mod.in_features, mod.out_features, bias=False)
            linear.weight = nn.Parameter(mod.dequantized_weight(), requires_grad=False)
            set_module(model, name, linear)
        elif isinstance(mod, QuantizedEmbedding):  # lookups are exact on the dequantized table
            set_module(model, name, nn.Embedding.from_pretrained(mod.weight, freeze=True))
    return model


def to_fast_cpu(model: MobileLLM) -> MobileLLM:
    """Swap int8 Linears for torch.ao's dynamic qint8 Linear (fbgemm/x86 kernels), the fastest CPU path.

    Weights keep their exact integers and per-channel scales; activations are quantized per tensor
    (not per token) by that kernel, so w8a8 results move slightly. 4-bit layers stay as they are.
    """
    import warnings

    from torch.ao.nn.quantized.dynamic import Linear as DynamicQLinear

    for name, mod in list(model.named_modules()):
        if not isinstance(mod, QuantizedLinear) or mod.bits != 8 or mod.weight_scale.shape[1] != 1:
            continue
        with warnings.catch_warnings():  # torch marks the quantized tensor API deprecated; still the fastest here
            warnings.simplefilter("ignore")
            qweight = torch._make_per_channel_quantized_tensor(
                mod.weight_q, mod.weight_scale[:, 0].double(), torch.zeros(mod.out_features, dtype=torch.long), 0)
            fast = DynamicQLinear(mod.in_features, mod.out_features, bias_=False, dtype=torch.qint8)
            fast.set_weight_bias(qweight, None)
        set_module(model, name, fast)
    return model
