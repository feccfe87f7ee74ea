"""Progress of a long export: one line per stage with the time elapsed so far."""

from __future__ import annotations

import time
from typing import Callable


class Stages:
    """Reports the stages of a long job, each with the time elapsed so far: `[  12.3 s] lower: ...`."""

    def __init__(self, report: Callable[[str], None] | None = None):
        self.report = report or (lambda line: None)
        self.started = time.perf_counter()

    def __call__(self, what: str) -> None:
        self.report(f"[{self.elapsed():7.1f} s] {what}")

    def elapsed(self) -> float:
        return time.perf_counter() - self.started
