"""What a caller asks of generation (SamplingParams) and how one token is picked from logits."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from mobilellm.errors import MobileLLMError

MAX_STOP_STRINGS = 16


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off; CTRL/HF style, over prompt and generated tokens
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings: not included in the text
    stop_token_ids: list[int] = field(default_factory=list)  # in addition to the tokenizer's EOS
    ignore_eos: bool = False

    def validate(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise MobileLLMError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise MobileLLMError(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise MobileLLMError(f"top_k must be a non-negative integer, got {self.top_k!r}")
        if not (0 < self.top_p <= 1):
            raise MobileLLMError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise MobileLLMError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**64):
            raise MobileLLMError(f"seed must be an integer in [0, 2**64), got {self.seed!r}")
        if not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
            raise MobileLLMError("stop_token_ids must be non-negative integers")
        if len(self.stop) > MAX_STOP_STRINGS or any(not isinstance(s, str) or not s for s in self.stop):
            raise MobileLLMError(f"stop must be at most {MAX_STOP_STRINGS} non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def next_token(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> int:
    """Pick a token from one row of logits (V,): repetition penalty -> temperature -> top-k -> top-p."""
    logits = logits.float()
    if params.repetition_penalty != 1.0 and seen is not None:
        penalised = torch.where(logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if params.greedy:
        return int(logits.argmax())
    logits = logits / params.temperature
    if 0 < params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= params.top_p  # keep the smallest set reaching top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, -math.inf))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))
