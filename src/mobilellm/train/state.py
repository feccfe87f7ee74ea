"""Run checkpoints: a model directory plus everything needed to continue exactly.

    <run dir>/checkpoints/step-00000100/
        model/               a complete model directory (loads anywhere a model dir does)
        trainer_state.pt     optimizer, step and token counters, data-loader state, RNG states
    <run dir>/final/         the model directory of the last step

Each checkpoint is built under a temporary name and renamed into place, so a crash or SIGKILL
mid-save leaves the previous checkpoints intact; leftovers are removed at the next start.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from mobilellm.errors import MobileLLMError
from mobilellm.fileio import atomic_dir

STEP_DIR = re.compile(r"^step-(\d{8})$")


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and (p / "trainer_state.pt").is_file() and (p / "model" / "config.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def remove_partial_saves(run_dir: Path) -> None:
    root = run_dir / "checkpoints"
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".") and p.is_dir():  # temporary dirs of an interrupted save
                shutil.rmtree(p, ignore_errors=True)


def resolve_resume(run_dir: Path, resume: str | None) -> Path | None:
    """`auto`: the newest complete checkpoint of this run, if any; a path: that checkpoint; none: fresh."""
    if resume in (None, "", "none", "never"):
        return None
    if resume == "auto":
        found = checkpoints(run_dir)
        return found[-1][1] if found else None
    path = Path(resume)
    if not (path / "trainer_state.pt").is_file():
        raise MobileLLMError(f"--resume {resume}: not a complete checkpoint (no trainer_state.pt)")
    return path


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(run_dir: Path, step: int, write_model, trainer_state: dict, keep_last: int, milestone_every: int) -> Path:
    """Write checkpoint `step` atomically, then prune old ones (keep-last-N plus milestones).

    write_model(directory) writes the model directory into the given folder.
    """
    target = run_dir / "checkpoints" / f"step-{step:08d}"
    with atomic_dir(target) as tmp:
        write_model(tmp / "model")
        torch.save(trainer_state, tmp / "trainer_state.pt")
    found = checkpoints(run_dir)
    recent = {s for s, _ in found[-keep_last:]} if keep_last > 0 else set()
    for s, path in found:
        milestone = milestone_every > 0 and s % milestone_every == 0
        if s not in recent and not milestone:
            shutil.rmtree(path, ignore_errors=True)
    return target


def load_trainer_state(checkpoint: Path) -> dict:
    try:
        return torch.load(checkpoint / "trainer_state.pt", map_location="cpu", weights_only=False)
    except Exception as err:
        raise MobileLLMError(f"checkpoint {checkpoint} is corrupt ({type(err).__name__}: {err})") from None
