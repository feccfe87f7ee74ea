"""Loss-vs-tokens curves for a study: annealed models at several token counts from one run.

With the warmup-stable-decay schedule a run of T tokens is identical to the main run up to the step where
its own decay starts, so the main run keeps a checkpoint at each such step and a short *decay branch*
resumes from it and decays to T tokens (decay_fraction x T tokens per point instead of T). Each point is
scored on the held-out and training splits in nats per token and bits per byte (docs/study.md)."""

from __future__ import annotations

import copy
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mobilellm.errors import MobileLLMError
from mobilellm.fileio import write_json_atomic


@dataclass
class Branch:
    tokens: int  # the point's token count (rounded to whole steps)
    start_step: int  # where the decay starts: the main run's checkpoint it resumes from
    total_steps: int


def tokens_per_step(cfg) -> int:
    return cfg.batch_plan(1)[1] * cfg.data.seq_len


def main_total_steps(cfg) -> int:
    if cfg.run.max_steps:
        return cfg.run.max_steps
    return math.ceil(cfg.run.max_tokens / tokens_per_step(cfg))


def plan_branches(cfg, points: list) -> list[Branch]:
    """One decay branch per token count below the main run's; refuses points the schedule cannot give."""
    if not points:
        return []
    if cfg.schedule.kind != "wsd":
        raise MobileLLMError("study curve points need train.schedule.kind: wsd (decay branches from the stable phase)")
    per_step, total = tokens_per_step(cfg), main_total_steps(cfg)
    main_decay = total - max(1, int(round(total * cfg.schedule.decay_fraction)))
    branches = []
    for tokens in sorted(int(float(t)) for t in points):
        steps = max(1, round(tokens / per_step))
        start = steps - max(1, int(round(steps * cfg.schedule.decay_fraction)))  # lr_at's own rule
        if start <= cfg.schedule.warmup_steps or start >= main_decay:
            raise MobileLLMError(f"study curve point {tokens:,} tokens: its decay would start at step {start}, "
                                 f"which must lie after warmup ({cfg.schedule.warmup_steps}) and before the main "
                                 f"run's decay (step {main_decay} of {total})")
        branches.append(Branch(steps * per_step, start, steps))
    return branches


def branch_config(cfg, branch: Branch, out_dir: Path):
    bcfg = copy.deepcopy(cfg)
    bcfg.run.max_steps, bcfg.run.max_tokens, bcfg.run.out_dir = branch.total_steps, None, str(out_dir)
    bcfg.run.keep_steps, bcfg.run.save_every, bcfg.run.eval_every = [], 0, 0
    return bcfg


def _spread(n: int, count: int) -> list[int]:
    """`count` sample indices spread evenly over `n` (all of them when there are fewer)."""
    if n <= count:
        return list(range(n))
    return sorted(set(np.linspace(0, n - 1, count).round().astype(int).tolist()))


def score(model, tokenizer, manifest, seq_len: int, samples: int, batch_size: int = 16) -> dict:
    """Held-out and training-split loss and bits per byte on `samples` spread-out samples of each."""
    from mobilellm.data.loader import PackedTokens
    from mobilellm.eval.perplexity import packed_loss

    out = {}
    for split, prefix in (("val", "val"), ("train", "train")):
        data = PackedTokens(manifest, split, seq_len)
        picked = [data[i] for i in _spread(len(data), samples)]
        if not picked:
            raise MobileLLMError(f"the {split} split of {manifest} has no samples of {seq_len + 1} tokens")
        res = packed_loss(model, iter(picked), len(picked), batch_size=batch_size)
        n_bytes = sum(len(tokenizer.decode(s[1:].tolist()).encode("utf-8")) for s in picked)
        out[f"{prefix}_loss"] = res["loss"]
        out[f"{prefix}_bpb"] = res["loss"] * res["tokens"] / (math.log(2) * max(n_bytes, 1))
    out["gap"] = out["val_loss"] - out["train_loss"]  # > 0: the held-out split is harder (or repetition shows)
    return out


def score_dir(model_dir: Path, manifest, seq_len: int, samples: int, device: str) -> dict:
    from mobilellm.checkpoint import load_model_dir
    from mobilellm.tokenizer import load_tokenizer

    model = load_model_dir(model_dir, device=device)
    return score(model, load_tokenizer(model_dir), manifest, seq_len, samples)


def run_branches(cfg, branches: list[Branch], data_dir: Path, samples: int, device: str,
                 progress: bool = False) -> list[dict]:
    """Train every decay branch of a finished main run, score it, and keep only its logs."""
    from mobilellm.train import state as run_state
    from mobilellm.train.trainer import train

    run_dir = Path(cfg.run.out_dir)
    saved = dict(run_state.checkpoints(run_dir))
    points = []
    for branch in branches:
        out = run_dir / "branches" / f"tokens-{branch.tokens}"
        done = out / "point.json"
        if done.exists():
            points.append(json.loads(done.read_text()))
            continue
        if branch.start_step not in saved:
            raise MobileLLMError(f"{run_dir} has no checkpoint at step {branch.start_step} for the "
                                 f"{branch.tokens:,}-token decay branch (run.keep_steps lost?)")
        if out.exists():
            shutil.rmtree(out)  # an interrupted branch: redo it from its start
        result = train(branch_config(cfg, branch, out), resume=str(saved[branch.start_step]), progress=progress)
        point = {"tokens": result.tokens, "steps": result.steps, "decay_from_step": branch.start_step,
                 **score_dir(result.final_dir, data_dir, cfg.data.seq_len, samples, device)}
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # results travel, weights do not
        shutil.rmtree(out / "final", ignore_errors=True)
        write_json_atomic(done, point)
        points.append(point)
    return points
