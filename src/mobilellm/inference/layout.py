"""The one weight layout every inference backend is built from, and the precisions it converts to.

A block of model.MobileLLM becomes six pieces: two RMSNorm weights and four matrices, q|k|v and
gate|up fused (4 matrix products per block instead of 7). q and k rows are reordered so that RoPE
rotates adjacent pairs (one complex multiplication); attention scores are unchanged because
queries and keys move alike, and both backends fill their KV caches in that same order.

A matrix is float weights or, from a directory `mobilellm quantize` wrote, the quantizer's own
integers and scales: backends use those integers as they are wherever the precision matches, and
otherwise convert through quantize.quantize_weight, the project's one quantization rule.

Adding an architecture switch touches model.py, this file and native_kernels.c (docs/architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mobilellm.errors import MobileLLMError
from mobilellm.precision import FLOAT_DTYPES, INFERENCE, INT4_GROUP
from mobilellm.quantize import QuantizedLinear, dequantize_weight, quantize_weight

# Inference precisions (precision.py): float weights, int8 with one scale per output row, or int4
# with one scale per INT4_GROUP input columns.
PRECISIONS = INFERENCE


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise MobileLLMError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")


@dataclass
class Matrix:
    """One (out, in) weight matrix: float `weight`, or integers `q` with fp32 `scale` (out, groups)."""

    weight: torch.Tensor | None = None
    q: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    bits: int = 8

    @property
    def shape(self) -> torch.Size:
        return (self.weight if self.q is None else self.q).shape

    def rows(self, start: int, end: int) -> "Matrix":
        """Output rows start..end: every conversion here is per row, so converting slices gives the same values."""
        if self.q is None:
            return Matrix(weight=self.weight[start:end])
        return Matrix(q=self.q[start:end], scale=self.scale[start:end], bits=self.bits)

    def dense(self) -> torch.Tensor:
        """fp32 values: the float weights, or the integers times their scales (what the quantizer meant)."""
        if self.q is None:
            return self.weight.detach().float()
        return dequantize_weight(self.q, self.scale)

    def as_int8_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """int8 values and one fp32 scale per output row: the stored integers when they already are that."""
        if self.q is not None and self.bits == 8 and self.scale.shape[1] == 1:
            return self.q, self.scale.float().view(-1)
        q, scale = quantize_weight(self.dense(), bits=8, group_size=None)
        return q, scale.view(-1)

    def as_int4_groups(self) -> tuple[torch.Tensor, torch.Tensor]:
        """int4 values (as int8, (out, in)) and fp32 scales (out, in // INT4_GROUP): the stored integers
        when they already are that, else the weights quantized by the same rule."""
        if self.q is not None and self.bits == 4 and self.shape[1] // self.scale.shape[1] == INT4_GROUP:
            return self.q, self.scale.float()
        out_f, in_f = self.shape
        if in_f % INT4_GROUP:
            raise MobileLLMError(f"int4 needs every matrix width to be a multiple of {INT4_GROUP}; this model "
                                 f"has a ({out_f}, {in_f}) matrix (use int8)")
        return quantize_weight(self.dense(), bits=4, group_size=INT4_GROUP)

    def converted(self, precision: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(data, scale or None) in `precision`: int8 rows with (out,) scales, int4 values with (out, groups)."""
        if precision == "int8":
            return self.as_int8_rows()
        if precision == "int4":
            return self.as_int4_groups()
        return self.dense().to(FLOAT_DTYPES[precision]).contiguous(), None


def _matrix(linear: nn.Module) -> Matrix:
    if isinstance(linear, QuantizedLinear):
        return Matrix(q=linear.weight_q, scale=linear.weight_scale, bits=linear.bits)
    return Matrix(weight=linear.weight.detach())


def _fused(parts: list[Matrix]) -> Matrix:
    """Row-wise concatenation; quantized parts only when they share one format (rows carry their scales)."""
    if len(parts) == 1:
        return parts[0]
    if all(p.q is not None for p in parts) and len({(p.bits, p.scale.shape[1]) for p in parts}) == 1:
        return Matrix(q=torch.cat([p.q for p in parts]), scale=torch.cat([p.scale for p in parts]), bits=parts[0].bits)
    return Matrix(weight=torch.cat([p.dense() for p in parts]))


def interleave_rope_rows(m: Matrix, heads: int, hd: int) -> Matrix:
    """Reorder each head's rows from rotate-half pairs (i, i + hd/2) to adjacent pairs (2i, 2i+1)."""
    order = torch.arange(hd).view(2, hd // 2).t().reshape(-1)  # 0, hd/2, 1, hd/2 + 1, ...

    def rows(t: torch.Tensor) -> torch.Tensor:
        return t.view(heads, hd, -1)[:, order].reshape(t.shape)

    if m.q is None:
        return Matrix(weight=rows(m.weight))
    return Matrix(q=rows(m.q), scale=rows(m.scale), bits=m.bits)


@dataclass
class BlockWeights:
    ln1: torch.Tensor  # (dim,) input RMSNorm
    ln2: torch.Tensor  # (dim,) post-attention RMSNorm
    qkv: Matrix  # ((H + 2 KV) hd, dim): q rows, k rows (RoPE pairs adjacent), v rows
    o: Matrix  # (dim, H hd)
    up: Matrix  # (2 ffn, dim) gate rows then up rows (SwiGLU) or (ffn, dim) (ReLU)
    down: Matrix  # (dim, ffn)
    gated: bool  # SwiGLU: silu(gate) * up; else ReLU(up)


def block_weights(block: nn.Module, cfg, consume: bool = False) -> BlockWeights:
    """One block in the inference layout. consume=True empties the block's matrices (the caller gives
    the model up), so a converting backend holds one extra block at a time, not a second network."""
    attn, mlp = block.self_attn, block.mlp
    H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.attn_head_dim
    qkv = _fused([interleave_rope_rows(_matrix(attn.q_proj), H, hd),
                  interleave_rope_rows(_matrix(attn.k_proj), KV, hd), _matrix(attn.v_proj)])
    gated = cfg.ffn_type == "swiglu"
    up = _fused([_matrix(mlp.gate_proj), _matrix(mlp.up_proj)] if gated else [_matrix(mlp.up_proj)])
    weights = BlockWeights(block.input_layernorm.weight.detach(), block.post_attention_layernorm.weight.detach(),
                           qkv, _matrix(attn.o_proj), up, _matrix(mlp.down_proj), gated)
    if consume:
        for module in (attn, mlp):
            for name, child in list(module.named_children()):
                if isinstance(child, (nn.Linear, QuantizedLinear)):
                    setattr(module, name, nn.Identity())
    return weights


def output_matrix(model) -> Matrix:
    """The output projection: the (tied) embedding table or the separate lm_head, as stored."""
    if model.lm_head is not None:
        return _matrix(model.lm_head)
    return Matrix(weight=model.output_weight.detach())


def embedding_table(model) -> torch.Tensor:
    """(vocab, dim) fp32 rows the backends look tokens up in (a quantized embedding is dequantized)."""
    return model.embed_tokens.weight.detach().float()
