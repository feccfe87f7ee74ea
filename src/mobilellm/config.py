"""ModelConfig, the layer-sharing order (layer_to_block) and the named presets (docs/paper.md). A config
describes *physical* blocks (`n_layers`) and a sharing strategy mapping every *logical* layer to one."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from mobilellm.errors import MobileLLMError

SHARING_STRATEGIES = ("none", "immediate", "repeat_all", "reverse")
FFN_TYPES = ("swiglu", "relu")


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    dim: int = 576
    n_layers: int = 30  # physical blocks (distinct weights)
    n_heads: int = 9
    n_kv_heads: int = 3
    ffn_dim: int = 1536
    head_dim: int | None = None  # None: dim // n_heads
    ffn_type: str = "swiglu"  # "swiglu" (paper) or "relu" (FC-ReLU-FC, for ablations)
    tie_embeddings: bool = True  # embedding sharing: logits = h @ embed_tokens.weight.T
    layer_sharing: str = "none"  # one of SHARING_STRATEGIES
    share_repeats: int = 1  # runs of each block; 1 unless layer_sharing != "none"
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    init_std: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None
    source: str = field(default="", compare=False)  # where a preset's numbers come from

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise MobileLLMError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.head_dim is None and self.dim % self.n_heads != 0:
            raise MobileLLMError(f"model config: n_heads={self.n_heads} does not divide dim={self.dim}; "
                                 "choose a head count that divides the width or set head_dim")
        if self.n_heads % self.n_kv_heads != 0:
            raise MobileLLMError(f"model config: n_kv_heads={self.n_kv_heads} does not divide n_heads={self.n_heads}")
        if self.attn_head_dim % 2 != 0:
            raise MobileLLMError(f"model config: head_dim={self.attn_head_dim} must be even for RoPE")
        if self.ffn_type not in FFN_TYPES:
            raise MobileLLMError(f"model config: unknown ffn_type {self.ffn_type!r}; choose from {FFN_TYPES}")
        if self.layer_sharing not in SHARING_STRATEGIES:
            raise MobileLLMError(f"model config: unknown layer_sharing strategy {self.layer_sharing!r}; "
                                 f"choose from {SHARING_STRATEGIES}")
        if not isinstance(self.share_repeats, int) or self.share_repeats < 1:
            raise MobileLLMError(f"model config: share_repeats must be >= 1, got {self.share_repeats!r}")
        if self.layer_sharing == "none" and self.share_repeats != 1:
            raise MobileLLMError("model config: share_repeats > 1 needs a layer_sharing strategy other than 'none'")
        if self.layer_sharing != "none" and self.share_repeats < 2:
            raise MobileLLMError(f"model config: layer_sharing={self.layer_sharing!r} needs share_repeats >= 2")
        if not (self.norm_eps > 0 and self.rope_theta > 0 and self.init_std > 0):
            raise MobileLLMError("model config: norm_eps, rope_theta and init_std must be positive")

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads

    @property
    def n_logical_layers(self) -> int:
        return len(self.layer_to_block)

    @property
    def layer_to_block(self) -> list[int]:
        """Physical block index run at each logical layer."""
        blocks = list(range(self.n_layers))
        k = self.share_repeats
        if self.layer_sharing == "none":
            return blocks
        if self.layer_sharing == "immediate":  # 1,1,2,2,...: the block stays in cache between runs
            return [i for i in blocks for _ in range(k)]
        if self.layer_sharing == "repeat_all":  # 1..L, 1..L
            return blocks * k
        # reverse: 1..L, L..1, 1..L, ...
        return [i for r in range(k) for i in (blocks if r % 2 == 0 else blocks[::-1])]

    def block_params(self) -> int:
        d, hd = self.dim, self.attn_head_dim
        attn = d * self.n_heads * hd * 2 + d * self.n_kv_heads * hd * 2  # q, o + k, v
        ffn = d * self.ffn_dim * (3 if self.ffn_type == "swiglu" else 2)
        return attn + ffn + 2 * d  # + two RMSNorm weights

    def embedding_params(self) -> int:
        return self.vocab_size * self.dim

    def num_params(self) -> int:
        output = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return self.n_layers * self.block_params() + self.embedding_params() + output + self.dim

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Forward FLOPs per token (multiply-add = 2); training costs about 3x this.

        Counts every matmul of every logical layer, the output projection, and attention
        scores/values at the full context (not halved for the causal mask, as in PaLM's MFU).
        """
        t = seq_len or self.max_seq_len
        d, hd = self.dim, self.attn_head_dim
        matmul_params = self.block_params() - 2 * d
        per_layer = 2 * matmul_params + 2 * 2 * t * self.n_heads * hd
        return self.n_logical_layers * per_layer + 2 * self.vocab_size * d

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MobileLLMError(f"model config: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)

    def replace(self, **changes) -> "ModelConfig":
        return ModelConfig.from_dict({**self.to_dict(), **changes})


_PAPER = "MobileLLM paper, Liu et al. 2024, architecture table"
_PRESETS: dict[str, dict] = {
    "mobilellm-125m": dict(n_layers=30, dim=576, n_heads=9, n_kv_heads=3, ffn_dim=1536, source=_PAPER),
    "mobilellm-350m": dict(n_layers=32, dim=960, n_heads=15, n_kv_heads=5, ffn_dim=2560, source=_PAPER),
    "mobilellm-600m": dict(n_layers=40, dim=1152, n_heads=18, n_kv_heads=6, ffn_dim=3072, source=_PAPER),
    "mobilellm-1b": dict(n_layers=54, dim=1280, n_heads=20, n_kv_heads=5, ffn_dim=3584, source=_PAPER),
    "mobilellm-1.5b": dict(n_layers=54, dim=1600, n_heads=25, n_kv_heads=5, ffn_dim=4352, source=_PAPER),
}
_PRESETS["mobilellm-125m-ls"] = dict(
    _PRESETS["mobilellm-125m"], layer_sharing="immediate", share_repeats=2, source=_PAPER + ", LS"
)
_PRESETS["mobilellm-350m-ls"] = dict(
    _PRESETS["mobilellm-350m"], layer_sharing="immediate", share_repeats=2, source=_PAPER + ", LS"
)
# Small shapes for tests and CPU demos: deep-and-thin, GQA 2:1, head_dim 32.
_TINY = dict(vocab_size=512, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=172, max_seq_len=256)
_PRESETS["mobilellm-tiny"] = dict(_TINY, source="test size")
_PRESETS["mobilellm-tiny-ls"] = dict(_TINY, layer_sharing="immediate", share_repeats=2, source="test size, LS")
_PRESETS["mobilellm-mini-ls"] = dict(
    vocab_size=4096, dim=192, n_layers=8, n_heads=6, n_kv_heads=2, ffn_dim=512, max_seq_len=256,
    layer_sharing="immediate", share_repeats=2, source="CPU quickstart size, LS",
)


def list_presets() -> list[str]:
    return list(_PRESETS)


def get_preset(name: str, **overrides) -> ModelConfig:
    key = name.lower()
    if key not in _PRESETS:
        raise MobileLLMError(f"unknown preset {name!r}; choose from {', '.join(_PRESETS)}")
    return ModelConfig.from_dict({**_PRESETS[key], **overrides})
