"""The packed loader: samples, the shuffled order, ranks and workers, exact resume, validation batches."""

import json
import pickle

import numpy as np
import pytest
import torch

from mobilellm.data.loader import (
    BatchStream,
    PackedTokens,
    check_tokenizer_matches,
    permute,
    validation_batches,
)
from mobilellm.errors import MobileLLMError


def make_dataset(directory, tokens, shard_tokens, dtype="uint32", vocab_size=1 << 20, split="train"):
    """Shards + manifest in the layout `mobilellm prepare` writes (the fields the loader reads)."""
    directory.mkdir(parents=True, exist_ok=True)
    tokens = np.asarray(tokens)
    shards = []
    for k, start in enumerate(range(0, len(tokens), shard_tokens)):
        part = tokens[start:start + shard_tokens].astype(dtype)
        part.tofile(directory / f"{split}-{k:05d}.bin")
        shards.append({"file": f"{split}-{k:05d}.bin", "tokens": len(part), "documents": 1, "sha256": ""})
    manifest = {
        "format": "mobilellm-tokens", "format_version": 1, "dtype": dtype,
        "tokenizer": {"fingerprint": "f" * 64, "vocab_size": vocab_size, "bos_id": 1, "eos_id": 2},
        "splits": {split: {"tokens": len(tokens), "documents": len(shards), "shards": shards}},
    }
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


SEQ = 8


@pytest.fixture
def data(tmp_path):
    # Token value == stream position, so a sample is identified by its first token (index * SEQ).
    return PackedTokens(make_dataset(tmp_path / "d", np.arange(SEQ * 50 + 1), shard_tokens=37), "train", SEQ)


def ids(batch):
    inputs, _ = batch
    return (inputs[:, 0] // SEQ).tolist()


def test_samples_cross_shards(data):
    assert len(data) == 50 and data.num_tokens == 401
    for i in (0, 4, 5, 49, -1):
        start = (i % 50) * SEQ
        assert np.array_equal(data[i], np.arange(start, start + SEQ + 1)) and data[i].dtype == np.int64
    with pytest.raises(IndexError):
        data[50]
    # Pickling (DataLoader workers) sends paths, not the mapped data.
    assert len(pickle.dumps(data)) < 2000 and np.array_equal(pickle.loads(pickle.dumps(data))[7], data[7])
    inputs, targets = next(BatchStream(data, micro_batch=3))
    assert inputs.shape == targets.shape == (3, SEQ) and inputs.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1]) and torch.equal(targets[:, -1], inputs[:, -1] + 1)


def test_uint16_and_partial_last_sample(tmp_path):
    d = PackedTokens(make_dataset(tmp_path, np.arange(30) % 7, shard_tokens=4, dtype="uint16"), "train", 10)
    assert len(d) == 2  # 30 tokens: samples [0, 11) and [10, 21); [20, 31) would need one more token
    assert d[1].tolist() == (np.arange(10, 21) % 7).tolist()


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 1000, 4099])
def test_permute_is_a_permutation(n):
    p = permute(np.arange(n), n, seed=3, epoch=0)
    assert sorted(p.tolist()) == list(range(n))
    if n >= 16:
        assert not np.array_equal(p, np.arange(n))
        assert not np.array_equal(p, permute(np.arange(n), n, seed=3, epoch=1))
        assert not np.array_equal(p, permute(np.arange(n), n, seed=4, epoch=0))


def _ref_permute(i, n, seed, epoch):
    """The same Feistel network in plain Python integers, independent of numpy's integer rules."""
    m64 = (1 << 64) - 1

    def mix(x):
        x = (x + 0x9E3779B97F4A7C15) & m64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m64
        return x ^ (x >> 31)

    bits = max(2, (n - 1).bit_length())
    bits += bits & 1
    half, mask = bits // 2, (1 << (bits // 2)) - 1
    base = mix(seed & m64)
    keys = [mix(base ^ (epoch * 4 + r)) for r in range(4)]
    while True:
        left, right = i >> half, i & mask
        for key in keys:
            left, right = right, left ^ (mix(right ^ key) & mask)
        i = (left << half) | right
        if i < n:
            return i


def test_permute_is_pinned():
    # Pure integer arithmetic: the order must never change with numpy versions, or resumed runs would shift.
    assert permute(np.arange(10), 10, seed=0, epoch=0).tolist() == [5, 3, 8, 4, 6, 2, 9, 7, 1, 0]
    for n, seed, epoch in ((10, 0, 0), (100_003, 12345, 7), (2**40 + 3, -1, 2)):
        idx = np.array([0, 1, 2, n // 3, n - 1])
        assert permute(idx, n, seed, epoch).tolist() == [_ref_permute(int(i), n, seed, epoch) for i in idx]


def collect(stream, steps):
    return [ids(next(stream)) for _ in range(steps)]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_every_sample_once_per_epoch_across_ranks(data, world):
    micro = 3  # global batch 3, 6, 12: none divides 50, so batches straddle epochs
    streams = [BatchStream(data, micro, rank=r, world_size=world, seed=7) for r in range(world)]
    steps = -(-2 * len(data) // (micro * world)) + 1
    per_rank = [collect(s, steps) for s in streams]
    order = [i for step in zip(*per_rank) for rank_batch in step for i in rank_batch]
    epoch0, epoch1 = order[:50], order[50:100]
    assert sorted(epoch0) == sorted(epoch1) == list(range(50)) and epoch0 != epoch1
    # The global order does not depend on the world size.
    single = collect(BatchStream(data, micro * world, seed=7), steps)
    assert order == [i for batch in single for i in batch]
    assert streams[0].epoch == (steps * micro * world) // 50


def test_resume_from_two_ranks_to_one(data):
    micro, world, steps = 4, 2, 30  # global batch 8 throughout
    reference = collect(BatchStream(data, micro * world, seed=1), steps)

    ranks = [BatchStream(data, micro, rank=r, world_size=world, seed=1) for r in range(world)]
    seen = []
    for _ in range(9):  # interrupted mid-epoch 2
        seen.append([i for s in ranks for i in ids(next(s))])
    state = ranks[0].state_dict()
    assert state == ranks[1].state_dict() and state["position"] == 72 and state["epoch"] == 1

    # One rank, same global batch by two accumulation steps of micro 4 ...
    one = BatchStream(data, micro, seed=1)
    one.load_state_dict(json.loads(json.dumps(state)))  # the state is plain JSON
    for _ in range(steps - 9):
        seen.append(ids(next(one)) + ids(next(one)))
    assert seen == reference
    # ... or one micro-batch of 8.
    big = BatchStream(data, 8, seed=1)
    big.load_state_dict(state)
    assert collect(big, steps - 9) == reference[9:]


def test_dataloader_workers_keep_order_and_resume(data):
    plain = collect(BatchStream(data, 5, rank=1, world_size=2, seed=2), 12)
    workers = BatchStream(data, 5, rank=1, world_size=2, seed=2, num_workers=2)
    got = collect(workers, 7)
    state = workers.state_dict()  # prefetched batches are not counted as consumed
    workers.close()
    resumed = BatchStream(data, 5, rank=1, world_size=2, seed=2)
    resumed.load_state_dict(state)
    assert got + collect(resumed, 5) == plain


def test_resume_rejects_other_data(data, tmp_path):
    stream = BatchStream(data, 2, seed=0)
    next(stream)
    state = stream.state_dict()
    for other in (BatchStream(data, 2, seed=1),
                  BatchStream(PackedTokens(data.directory, "train", SEQ * 2), 2, seed=0)):
        with pytest.raises(MobileLLMError, match="cannot resume the data stream"):
            other.load_state_dict(state)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_validation_batches_fixed_and_complete(data, world):
    rows = []
    for r in range(world):
        batches = list(validation_batches(data, 3, rank=r, world_size=world))
        assert len(batches) == -(-50 // (3 * world))  # the same count on every rank
        rows.append([ids(b) for b in batches])
    order = [i for step in zip(*rows) for batch in step for i in batch]
    assert order == list(range(50))
    capped = [ids(b) for b in validation_batches(data, 3, max_batches=2, rank=0, world_size=world)]
    assert capped == [list(range(0, 3)), list(range(3 * world, 3 * world + 3))]


def test_check_tokenizer_matches(data):
    check_tokenizer_matches(data.manifest, 1 << 20, "f" * 64)
    check_tokenizer_matches(data.directory, (1 << 20) + 64)  # padded embedding: fine
    with pytest.raises(MobileLLMError, match="vocab_size"):
        check_tokenizer_matches(data.manifest, 32000, "f" * 64)
    with pytest.raises(MobileLLMError, match="tokenizer mismatch"):
        check_tokenizer_matches(data.manifest, 1 << 20, "0" * 64)


def test_bad_data_directories(tmp_path, data):
    with pytest.raises(MobileLLMError, match="no manifest.json"):
        PackedTokens(tmp_path / "nothing", "train", 8)
    with pytest.raises(MobileLLMError, match="split 'val' not in"):
        PackedTokens(data.directory, "val", 8)
    assert len(PackedTokens(data.directory, "train", 400)) == 1  # 401 tokens: exactly one sample
    with pytest.raises(MobileLLMError, match="fewer than one sample"):
        PackedTokens(data.directory, "train", 401)
    (data.directory / "train-00001.bin").write_bytes(b"\0" * 12)  # truncated shard
    with pytest.raises(MobileLLMError, match="damaged"):
        PackedTokens(data.directory, "train", 8)
