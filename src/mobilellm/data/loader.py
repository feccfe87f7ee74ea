"""The training loader: fixed-length samples from prepared token shards, exactly resumable.

A split is one memory-mapped token stream; sample i is the `seq_len + 1` tokens starting at i * seq_len.
The order is a seeded pointwise permutation (a Feistel network: no O(n) table, identical on every numpy
version) over one global sequence of positions across epochs, so every sample is seen exactly once per
epoch and resuming with another world size and the same global batch sees the same samples.
docs/data.md describes the sampling, the order and the state in full."""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from mobilellm.data.prepare import FORMAT, FORMAT_VERSION
from mobilellm.errors import MobileLLMError
from mobilellm.fileio import read_json_object

SUPPORTED_VERSIONS = (FORMAT_VERSION,)
STATE_VERSION = 1
_MAX_OPEN_SHARDS = 64  # memory maps hold a file descriptor each; keep a bounded number open


def read_manifest(path: str | os.PathLike) -> tuple[dict, Path]:
    """(manifest, data directory) from a manifest.json path or the directory holding it."""
    path = Path(path)
    file = path / "manifest.json" if path.is_dir() else path
    if not file.is_file():
        raise MobileLLMError(f"no manifest.json at {path}; pass the output directory of `mobilellm prepare` "
                             f"(an interrupted prepare leaves none: run it again)")
    manifest = read_json_object(file, "re-run `mobilellm prepare`")
    if manifest.get("format") != FORMAT:
        raise MobileLLMError(f"{file} is not a `mobilellm prepare` manifest")
    if manifest.get("format_version") not in SUPPORTED_VERSIONS:
        raise MobileLLMError(f"{file} has format version {manifest.get('format_version')}, this mobilellm reads "
                             f"{SUPPORTED_VERSIONS}; re-run `mobilellm prepare` or upgrade mobilellm")
    return manifest, file.parent


def check_tokenizer_matches(manifest: dict | str | os.PathLike, vocab_size: int,
                            fingerprint: str | None = None) -> None:
    """Raise MobileLLMError when a model/tokenizer does not fit data prepared with another tokenizer.

    `vocab_size` is the model's embedding size: it may exceed the tokenizer's (padded vocabularies), never
    fall short. `fingerprint` is the training tokenizer's `Tokenizer.fingerprint()`; None skips that check.
    """
    if not isinstance(manifest, dict):
        manifest, _ = read_manifest(manifest)
    info = manifest["tokenizer"]
    if vocab_size < info["vocab_size"]:
        raise MobileLLMError(f"the data was tokenized with a {info['vocab_size']}-token vocabulary but the model has "
                             f"vocab_size {vocab_size}; set vocab_size >= {info['vocab_size']} or re-run prepare "
                             f"with the model's tokenizer")
    if fingerprint is not None and fingerprint != info["fingerprint"]:
        raise MobileLLMError(f"tokenizer mismatch: the data was prepared with tokenizer {info['fingerprint'][:12]}, "
                             f"training uses {fingerprint[:12]}; use the tokenizer copied into the data directory "
                             f"or re-run prepare with this one")


class PackedTokens:
    """Random access to the samples of one split: `data[i]` is an int64 array of seq_len + 1 tokens."""

    def __init__(self, manifest_path_or_dir: str | os.PathLike, split: str = "train", seq_len: int = 2048):
        self.manifest, self.directory = read_manifest(manifest_path_or_dir)
        if split not in self.manifest["splits"]:
            raise MobileLLMError(f"split {split!r} not in {self.directory}; available: "
                                 f"{', '.join(self.manifest['splits'])}")
        if not isinstance(seq_len, int) or seq_len < 1:
            raise MobileLLMError(f"seq_len must be a positive integer, got {seq_len!r}")
        self.split, self.seq_len = split, seq_len
        self.vocab_size: int = self.manifest["tokenizer"]["vocab_size"]
        self.tokenizer_fingerprint: str = self.manifest["tokenizer"]["fingerprint"]
        self.dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        shards = self.manifest["splits"][split]["shards"]
        self._files = [self.directory / s["file"] for s in shards]
        sizes = [int(s["tokens"]) for s in shards]
        for f, n in zip(self._files, sizes):
            expected = n * self.dtype.itemsize
            actual = f.stat().st_size if f.is_file() else None
            if actual != expected:
                raise MobileLLMError(f"shard {f} is {'missing' if actual is None else f'{actual} bytes'}, the manifest "
                                     f"says {expected} bytes; the data directory is damaged: re-run prepare")
        self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # token offset of each shard
        self.num_tokens = int(self._starts[-1])
        self._len = max(0, (self.num_tokens - 1) // seq_len)
        if self._len == 0:
            raise MobileLLMError(f"split {split!r} of {self.directory} has {self.num_tokens} tokens, fewer than one "
                                 f"sample of seq_len + 1 = {seq_len + 1}; use a shorter seq_len or more data")
        self._maps: OrderedDict[int, np.memmap] = OrderedDict()

    def __len__(self) -> int:
        return self._len

    def _shard(self, k: int) -> np.memmap:
        m = self._maps.get(k)
        if m is None:
            m = np.memmap(self._files[k], dtype=self.dtype, mode="r")
            self._maps[k] = m
            if len(self._maps) > _MAX_OPEN_SHARDS:
                self._maps.popitem(last=False)
        else:
            self._maps.move_to_end(k)
        return m

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the split's stream as int64, across shard boundaries."""
        out = np.empty(stop - start, dtype=np.int64)
        k = int(np.searchsorted(self._starts, start, side="right")) - 1
        pos = start
        while pos < stop:
            shard_start, shard_end = int(self._starts[k]), int(self._starts[k + 1])
            take = min(stop, shard_end) - pos
            out[pos - start:pos - start + take] = self._shard(k)[pos - shard_start:pos - shard_start + take]
            pos += take
            k += 1
        return out

    def __getitem__(self, i: int) -> np.ndarray:
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"sample {i} out of range for {self._len} samples")
        return self.tokens(i * self.seq_len, i * self.seq_len + self.seq_len + 1)

    def batch(self, indices) -> np.ndarray:
        """(len(indices), seq_len + 1) int64."""
        return np.stack([self[int(i)] for i in indices]) if len(indices) else np.zeros((0, self.seq_len + 1), np.int64)

    # Memory maps are per process: pickling (DataLoader workers) sends paths, not data.
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"] = OrderedDict()
        return state


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def permute(index: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
    """perm(index) for a pseudo-random permutation of range(n) chosen by (seed, epoch): a 4-round Feistel
    network on the smallest even number of bits covering n, restricted to [0, n) by "cycle walking"
    (re-applying it to values >= n). Pure integer arithmetic: no n-sized table, no library dependence."""
    bits = max(2, (n - 1).bit_length())
    bits += bits & 1
    half = np.uint64(bits // 2)
    mask = np.uint64((1 << (bits // 2)) - 1)
    base = _splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
    keys = _splitmix64(np.array([base ^ np.uint64(epoch * 4 + r) for r in range(4)], dtype=np.uint64))

    def feistel(x: np.ndarray) -> np.ndarray:
        left, right = x >> half, x & mask
        for key in keys:
            left, right = right, left ^ (_splitmix64(right ^ key) & mask)
        return (left << half) | right

    with np.errstate(over="ignore"):
        out = feistel(np.asarray(index, dtype=np.uint64))
        outside = out >= np.uint64(n)
        while outside.any():
            out[outside] = feistel(out[outside])
            outside = out >= np.uint64(n)
    return out.astype(np.int64)


def sample_indices(positions: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Global stream positions -> sample indices (a batch may straddle two epochs)."""
    positions = np.asarray(positions, dtype=np.int64)
    epochs, offsets = positions // n, positions % n
    out = np.empty_like(positions)
    for e in np.unique(epochs):
        sel = epochs == e
        out[sel] = permute(offsets[sel], n, seed, int(e))
    return out


def _to_batch(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(rows)
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()  # (B, T) inputs, (B, T) targets


class _Steps(torch.utils.data.IterableDataset):
    """This rank's batches from stream position `start`; DataLoader worker w yields steps w, w + W, ..."""

    def __init__(self, data: PackedTokens, micro_batch: int, rank: int, world_size: int, seed: int, start: int):
        self.data, self.micro_batch, self.rank, self.world_size = data, micro_batch, rank, world_size
        self.seed, self.start = seed, start

    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.micro_batch * self.world_size
        first = self.start + step * g + self.rank * self.micro_batch
        positions = np.arange(first, first + self.micro_batch)
        return _to_batch(self.data.batch(sample_indices(positions, len(self.data), self.seed)))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        step, stride = (0, 1) if info is None else (info.id, info.num_workers)
        while True:
            yield self.batch_at(step)
            step += stride


class BatchStream:
    """An endless iterator of (inputs, targets) LongTensors of shape (micro_batch, seq_len) for one rank.

    Every rank builds one with the same seed, micro_batch and world_size; each `next()` is one
    micro-step for all ranks together (global_batch = micro_batch * world_size samples).
    """

    def __init__(self, data: PackedTokens, micro_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 num_workers: int = 0, prefetch_factor: int = 2, pin_memory: bool = False):
        if micro_batch < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise MobileLLMError(f"bad batch layout: micro_batch={micro_batch}, rank={rank}, world_size={world_size}")
        if num_workers < 0:
            raise MobileLLMError(f"num_workers must be >= 0, got {num_workers}")
        self.data, self.micro_batch, self.rank, self.world_size = data, micro_batch, rank, world_size
        self.seed, self.num_workers = seed, num_workers
        self.prefetch_factor, self.pin_memory = prefetch_factor, pin_memory
        self.global_batch = micro_batch * world_size
        self.position = 0  # stream positions consumed by all ranks together
        self._it = None

    @property
    def epoch(self) -> int:
        return self.position // len(self.data)

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._it is None:
            self._it = self._start()
        batch = next(self._it)
        self.position += self.global_batch  # count only what was handed out, never what was prefetched
        return batch

    def _start(self) -> Iterator:
        steps = _Steps(self.data, self.micro_batch, self.rank, self.world_size, self.seed, self.position)
        if self.num_workers == 0:
            return iter(steps)
        loader = torch.utils.data.DataLoader(steps, batch_size=None, num_workers=self.num_workers,
                                             prefetch_factor=self.prefetch_factor, pin_memory=self.pin_memory)
        return iter(loader)

    def close(self) -> None:
        """Stop DataLoader workers (also done by load_state_dict and garbage collection)."""
        self._it = None

    def state_dict(self) -> dict:
        n = len(self.data)
        return {
            "version": STATE_VERSION,
            "position": self.position,
            "epoch": self.position // n,
            "sample_in_epoch": self.position % n,
            "num_samples": n,
            "seq_len": self.data.seq_len,
            "seed": self.seed,
            "global_batch": self.global_batch,
            "tokenizer_fingerprint": self.data.tokenizer_fingerprint,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue right after the last batch the saved stream handed out (any world size)."""
        if state.get("version") != STATE_VERSION:
            raise MobileLLMError(f"data loader state version {state.get('version')} is not {STATE_VERSION}; "
                                 f"it was saved by another mobilellm version")
        same = {"num_samples": len(self.data), "seq_len": self.data.seq_len, "seed": self.seed,
                "tokenizer_fingerprint": self.data.tokenizer_fingerprint}
        for key, value in same.items():
            if state.get(key) != value:
                raise MobileLLMError(f"cannot resume the data stream: it was saved with {key}={state.get(key)!r}, "
                                     f"this run has {value!r}; resume with the same data, seq_len and seed")
        self.position = int(state["position"])
        self._it = None


def validation_batches(data: PackedTokens, micro_batch: int, max_batches: int | None = None, rank: int = 0,
                       world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's validation batches in fixed order (samples 0, 1, 2, ...; no shuffling).

    Global batch b covers samples [b*G, (b+1)*G), G = micro_batch * world_size, rank r the r-th slice.
    The last batch can be short or empty on high ranks: weight losses by row count and sum across ranks,
    and the result is the same for every world size.
    """
    if micro_batch < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise MobileLLMError(f"bad batch layout: micro_batch={micro_batch}, rank={rank}, world_size={world_size}")
    g = micro_batch * world_size
    total = len(data) if max_batches is None else min(len(data), max_batches * g)
    for b in range((total + g - 1) // g):
        first = b * g + rank * micro_batch
        indices = np.arange(min(first, total), min(first + micro_batch, total))
        yield _to_batch(data.batch(indices))
