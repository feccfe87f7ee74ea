"""`mobilellm info`: shape, parameter counts, FLOPs and weight memory of a preset or model directory."""

from __future__ import annotations

from pathlib import Path

from mobilellm.config import ModelConfig, get_preset


def human(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}" if unit == "B" else f"{n / scale:.1f}{unit}"
    return str(int(n))


def human_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def resolve_config(name_or_dir: str) -> ModelConfig:
    """A preset name, or a model directory with a config.json."""
    if Path(name_or_dir).exists():
        from mobilellm.checkpoint import load_config

        return load_config(name_or_dir)
    return get_preset(name_or_dir)


def describe(cfg: ModelConfig, seq_len: int | None = None) -> str:
    total = cfg.num_params()
    emb = cfg.embedding_params()
    block = cfg.block_params()
    fwd = cfg.flops_per_token(seq_len)
    sharing = "none" if cfg.layer_sharing == "none" else f"{cfg.layer_sharing} x{cfg.share_repeats}"
    lines = [
        f"shape            dim={cfg.dim} heads={cfg.n_heads} kv_heads={cfg.n_kv_heads} head_dim={cfg.attn_head_dim} "
        f"ffn={cfg.ffn_dim} ({cfg.ffn_type}) vocab={cfg.vocab_size} context={cfg.max_seq_len}",
        f"layers           {cfg.n_layers} physical blocks, {cfg.n_logical_layers} logical layers (sharing: {sharing})",
        f"embeddings       {'shared with the output layer' if cfg.tie_embeddings else 'separate output matrix'}",
        f"params total     {total:,} ({human(total)})",
        f"params embedding {emb:,} ({human(emb)})" + ("" if cfg.tie_embeddings else f" + output {emb:,}"),
        f"params per block {block:,} ({human(block)}); all blocks {cfg.n_layers * block:,}",
        f"FLOPs per token  forward {human(fwd)} at context {seq_len or cfg.max_seq_len}; training (3x) {human(3 * fwd)}",
        "weight memory    " + "  ".join(
            f"{name} {human_bytes(total * nbytes)}" for name, nbytes in (("fp32", 4), ("bf16", 2), ("int8", 1), ("int4", 0.5))
        ),
    ]
    if cfg.source:
        lines.append(f"source           {cfg.source}")
    return "\n".join(lines)
