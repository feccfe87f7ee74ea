"""The contract between the engine and a backend that runs the network.

A backend owns the weights in its precision and a KV cache of `max_batch` rows (one slot per
logical layer, from model.KVCache). The engine asks for:

  prefill(row, ids)     run a prompt into an empty cache row (positions 0..P-1); logits (V,) of
                        its last position
  decode(rows, tokens)  one new token for each of these rows, at that row's next position;
                        logits (len(rows), V)
  free(row)             the row's sequence is finished

Both return fp32 logits; a row's results never depend on which other rows run beside it.
Backends: native.NativeBackend (one C call per step) and torch_backend.TorchBackend (PyTorch ops,
optionally torch.compile'd); select.py picks one.
"""

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
