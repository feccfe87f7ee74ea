"""The contract between the engine and a backend that runs the network.

A backend owns the weights in its precision and a KV cache of `max_batch` rows. prefill(row, ids) runs
a prompt into an empty row and returns the logits (V,) of its last position; decode(rows, tokens) runs
one token per row and returns logits (len(rows), V); free(row) ends a row. Logits are fp32, and a row's
results never depend on which other rows run beside it. select.py picks native or torch."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from mobilellm.errors import MobileLLMError


class Backend(ABC):
    name: str

    def __init__(self, config, precision: str, max_batch: int, max_len: int):
        self.config, self.precision, self.max_batch, self.max_len = config, precision, max_batch, max_len
        self.lengths = [0] * max_batch  # tokens held in each cache row
        self.nbytes = 0  # weights as held (a tied output matrix that is the embedding counts once)
        self.cache = None  # model.KVCache

    def _check(self, rows: list[int], tokens: list[int], ends: list[int]) -> None:
        # the native kernels index the cache and the embedding with these numbers, unchecked
        for r, end in zip(rows, ends):
            if not 0 <= r < self.max_batch:
                raise MobileLLMError(f"cache row {r} does not exist (the cache has {self.max_batch} rows)")
            if end > self.max_len:
                raise MobileLLMError(f"{end} positions in cache row {r} do not fit its {self.max_len}")
        if tokens and not 0 <= min(tokens) <= max(tokens) < self.config.vocab_size:
            raise MobileLLMError(f"token ids must be in 0..{self.config.vocab_size - 1}")

    def prefill(self, row: int, ids: list[int]) -> torch.Tensor:
        if not ids:
            raise MobileLLMError("an empty prompt has no logits")
        self._check([row], ids, [len(ids)])  # a prefill starts the row at position 0
        logits = self._prefill(row, ids)
        self.lengths[row] = len(ids)
        return logits

    def decode(self, rows: list[int], tokens: list[int]) -> torch.Tensor:
        if len(set(rows)) != len(rows) or len(rows) != len(tokens):
            raise MobileLLMError("decode takes one token for each of distinct cache rows")
        self._check(rows, tokens, [self.lengths[r] + 1 if 0 <= r < self.max_batch else 0 for r in rows])
        logits = self._decode(rows, tokens, [self.lengths[r] for r in rows])
        for r in rows:
            self.lengths[r] += 1
        return logits

    def free(self, row: int) -> None:
        """The row's sequence is done: its cache columns are free for the next prefill."""
        self.lengths[row] = 0

    def cache_nbytes(self) -> int:
        return self.cache.nbytes()

    @abstractmethod
    def _prefill(self, row: int, ids: list[int]) -> torch.Tensor: ...

    @abstractmethod
    def _decode(self, rows: list[int], tokens: list[int], positions: list[int]) -> torch.Tensor: ...
