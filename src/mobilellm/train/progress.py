"""The training progress bar: loss and LR from the first step, and an ETA that can be believed: it comes
from the time per step after the first (which carries compilation and warm-up), not tqdm's rate, and
with a time limit it never runs past the limit."""

from __future__ import annotations

import time

BAR_FORMAT = "{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"


class TrainProgress:
    def __init__(self, total_steps: int, start_step: int, deadline: float | None, enabled: bool = True,
                 file=None):
        """deadline: time.perf_counter() value at which the time limit stops training (None: no limit);
        file: where the bar goes (default stderr)."""
        self.total, self.deadline = total_steps, deadline
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, desc="train",
                            bar_format=BAR_FORMAT, file=file)
        self._first: tuple[int, float] | None = None  # (step, time) when the first step of this process ended
        self.rates: dict[str, str] = {}  # tok/s, MFU, ...: refreshed at each log step

    def step(self, step: int, loss: float, lr: float) -> None:
        """After each optimizer step."""
        if self.bar is None:
            return
        now = time.perf_counter()
        if self._first is None:
            self._first = (step, now)
        self.bar.set_postfix({"loss": f"{loss:.3f}", "lr": f"{lr:.2e}", **self.rates, "eta": self.eta(step, now)},
                             refresh=False)
        self.bar.update(1)

    def eta(self, step: int, now: float) -> str:
        left = None
        first_step, first_time = self._first or (step, now)
        if step > first_step:
            left = (self.total - step) * (now - first_time) / (step - first_step)
        if self.deadline is not None:
            until_limit = max(0.0, self.deadline - now)
            if left is None or until_limit < left:
                return f"{clock(until_limit)} (time limit)"
        return clock(left) if left is not None else "?"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
