"""The contract between the engine and a backend that runs the network.

A backend owns the weights in its precision and a KV cache of `max_batch` rows. prefill(row, ids) runs
a prompt into an empty row and returns the logits (V,) of its last position; decode(rows, tokens) runs
one token per row and returns logits (len(rows), V); free(row) ends a row. Logits are fp32, and a row's
results never depend on which other rows run beside it. select.py picks native or torch."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class Backend(ABC):
    name: str

    def __init__(self, config, precision: str, max_batch: int, max_len: int):
        self.config, self.precision, self.max_batch, self.max_len = config, precision, max_batch, max_len
        self.lengths = [0] * max_batch  # tokens held in each cache row
        self.nbytes = 0  # weights as held (a tied output matrix that is the embedding counts once)
        self.cache = None  # model.KVCache

    def prefill(self, row: int, ids: list[int]) -> torch.Tensor:
        logits = self._prefill(row, ids)
        self.lengths[row] = len(ids)
        return logits

    def decode(self, rows: list[int], tokens: list[int]) -> torch.Tensor:
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
