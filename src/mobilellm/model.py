"""The MobileLLM network in one file, bottom-up: norm -> RoPE -> attention -> MLP -> block -> model.

A pre-norm Llama decoder (docs/paper.md) with embedding sharing (logits from the input embedding matrix)
and layer sharing (`config.layer_to_block`: the physical block of each *logical* layer). Every logical
layer has its own K/V and KV-cache slot, so a block that runs twice never attends to its own first
run's keys (the reference code's shared-slot bug). Parameter names follow Hugging Face Llama minus the
`model.` prefix, so checkpoints map one-to-one (see checkpoint.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mobilellm.config import ModelConfig
from mobilellm.errors import MobileLLMError


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 math: bf16 squares lose too much precision (same order of ops as HF Llama).
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for the rotate-half convention; positions (T,) or (B, T) -> (..., T, head_dim) fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # (..., T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (..., T, hd)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, hd); cos/sin (T, hd) or (B, T, hd)."""
    if cos.dim() == 3:  # per-sequence positions: broadcast over heads
        cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class KVCache:
    """Preallocated keys/values, one slot per *logical* layer: (n_logical, B, n_kv, max_len, hd)."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        self.max_len = max_len or config.max_seq_len
        shape = (config.n_logical_layers, batch_size, config.n_kv_heads, self.max_len, config.attn_head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """Write k/v (B, n_kv, T, hd) at positions [start, start+T); return all keys/values so far."""
        end = start + k.shape[2]
        if end > self.max_len:
            raise MobileLLMError(f"KV cache full: position {end} exceeds its length {self.max_len}")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d, hd = config.dim, config.attn_head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, hd
        self.q_proj = nn.Linear(d, config.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, config.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, config.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(config.n_heads * hd, d, bias=False)

    def forward(self, x, cos, sin, *, cache: KVCache | None, layer: int, start: int,
                mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
        B = x.shape[0]
        # -1 for T: an exported graph's reshapes then have no symbolic size, which XNNPACK requires
        q = self.q_proj(x).view(B, -1, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, -1, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        v = self.v_proj(x).view(B, -1, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, start, k, v)  # (B, KV, S, hd), S = start + T
        # GQA without materialising repeated K/V: SDPA broadcasts each KV head over its query group.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=self.n_heads != self.n_kv_heads
        )  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).contiguous().view(B, -1, self.n_heads * self.head_dim))


class SwiGLU(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.up_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.down_proj = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class ReluFFN(nn.Module):
    """Vanilla FC-ReLU-FC feed-forward, only for the paper's SwiGLU ablation."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.down_proj = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.relu(self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = SwiGLU(config) if config.ffn_type == "swiglu" else ReluFFN(config)

    def forward(self, x, cos, sin, cache, layer, start, mask, is_causal):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache=cache, layer=layer, start=start,
                               mask=mask, is_causal=is_causal)
        return x + self.mlp(self.post_attention_layernorm(x))


class MobileLLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        # A skeleton built on the meta device (its weights get loaded) skips init: nn.init.normal_ on meta
        # imports torch's Python decompositions, ~70 MiB resident for the process's life.
        skeleton = torch.get_default_device().type == "meta"
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim,
                                         _weight=torch.empty(config.vocab_size, config.dim) if skeleton else None)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))  # physical blocks
        self.norm = RMSNorm(config.dim, config.norm_eps)
        # Untied output matrix only for ablations; the paper shares the input embedding.
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
        self.layer_to_block = config.layer_to_block  # physical block index for each logical layer
        self.activation_checkpointing = False
        self.residual_dtype: torch.dtype | None = None  # e.g. bf16 in mixed-precision training: half the traffic
        if not skeleton:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    @property
    def output_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def num_params(self) -> int:
        """Distinct parameters (a shared block or tied embedding counts once)."""
        return sum(p.numel() for p in self.parameters())

    def hidden_states(self, tokens: torch.Tensor, *, cache: KVCache | None = None, start: int = 0,
                      positions: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, dim).

        tokens (B, T); with a cache, they sit at positions [start, start+T) of every sequence.
        positions (T,) or (B, T) overrides the RoPE positions (left-padded batches).
        attn_mask (B or 1, 1, T, S) bool, True = may attend, overrides the causal mask.
        """
        B, T = tokens.shape
        if positions is None:
            positions = torch.arange(start, start + T, device=tokens.device)
        if start + T > self.config.max_seq_len and cache is None:
            raise MobileLLMError(f"sequence of {start + T} tokens exceeds max_seq_len={self.config.max_seq_len}")
        cos, sin = rope_cos_sin(positions, self.config.attn_head_dim, self.config.rope_theta)
        mask, is_causal = attn_mask, False
        if mask is None:
            if start == 0:
                is_causal = T > 1  # plain causal attention over the new tokens only
            elif T > 1:  # chunk after a cached prefix: query i sees keys 0 .. start+i
                key_pos = torch.arange(start + T, device=tokens.device)
                mask = key_pos[None, :] <= (start + torch.arange(T, device=tokens.device))[:, None]

        x = self.embed_tokens(tokens)  # (B, T, dim)
        if self.residual_dtype is not None:
            x = x.to(self.residual_dtype)
        for layer, block_idx in enumerate(self.layer_to_block):
            block = self.layers[block_idx]
            if self.activation_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, cos, sin, None, layer, start, mask, is_causal, use_reentrant=False)
            else:
                x = block(x, cos, sin, cache, layer, start, mask, is_causal)
        return self.norm(x)

    def forward(self, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
        """Logits (B, T, vocab). Training computes the loss from hidden_states() in chunks instead."""
        return F.linear(self.hidden_states(tokens, **kwargs), self.output_weight)
