"""AdamW with the paper's parameter groups, and the learning-rate schedules."""

from __future__ import annotations

import math

import torch

from mobilellm.train.config import TrainConfig


def param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    """Weight decay on matrices; never on norms; on the (shared) embedding as configured."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_norm = p.ndim < 2
        is_embedding = "embed_tokens" in name
        if is_norm or (is_embedding and not cfg.optim.decay_embeddings):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": cfg.optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, lr: float, device: torch.device) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        param_groups(model, cfg), lr=lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
        fused=device.type == "cuda",  # one kernel for all parameters on GPU
    )


def lr_at(step: int, total_steps: int, peak: float, cfg: TrainConfig) -> float:
    """LR for optimizer step `step` (0-based): linear warmup, then cosine (or stable + linear decay)."""
    s = cfg.schedule
    floor = peak * s.min_lr_ratio
    warmup = min(s.warmup_steps, max(total_steps - 1, 0))
    if step < warmup:
        return peak * (step + 1) / warmup
    if s.kind == "wsd":
        decay_steps = max(1, int(round(total_steps * s.decay_fraction)))
        decay_start = total_steps - decay_steps
        if step < decay_start:
            return peak
        progress = min(1.0, (step - decay_start + 1) / decay_steps)
        return peak + (floor - peak) * progress
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup - 1))
    if s.kind == "linear":
        return peak + (floor - peak) * progress
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
