"""Knowledge distillation: loss = (1 - alpha) * cross-entropy + alpha * T^2 * KL(teacher_T || student_T).

The teacher (same vocabulary) runs without gradients on each micro-batch, logits formed chunk by chunk
under activation checkpointing so neither model's full logits stay in memory. Fine-tuning sees the same
rows every epoch, so TeacherCache (`distill.cache_dir`) can store the teacher's logits on disk."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mobilellm.errors import MobileLLMError
from mobilellm.fileio import atomic_path, write_json_atomic
from mobilellm.train.loss import IGNORE_INDEX

CACHE_FORMAT = "mobilellm-teacher-cache-1"
# header fields that must match, and how an error names them
CACHE_KEYS = {"format": "cache format", "teacher_sha256": "teacher (weights)", "data_sha256": "data",
              "rows": "row count", "seq_len": "seq_len", "vocab_size": "vocabulary", "top_k": "top_k"}


def teacher_fingerprint(directory: str | Path) -> str:
    """sha256 of the teacher's config.json and weight files (their bytes: about a second per GB, once per run)."""
    directory = Path(directory)
    weights = sorted(f for f in directory.iterdir() if f.suffix in (".safetensors", ".bin", ".json")
                     and f.name.startswith(("model", "pytorch_model")))  # shards and their index too
    files = [directory / "config.json"] + weights
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while block := fh.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()


def rows_fingerprint(rows: list[dict]) -> str:
    """sha256 of what the teacher sees of each row (tokens, positions, example boundaries), in order."""
    digest = hashlib.sha256()
    for row in rows:
        for key in ("inputs", "positions", "docs"):
            digest.update(np.ascontiguousarray(row[key], dtype=np.int64).tobytes())
    return digest.hexdigest()


class TeacherCache:
    """The teacher's raw logits per training row, one float16 .npy file per row (row-00000042.npy).

    Raw logits, so the temperature can change between runs (float16: relative error <= 2^-11). With
    top_k > 0 a row is an .npz of the k largest logits and their token ids per position. Files are written
    atomically: a killed run leaves only a missing row, which is recomputed.
    """

    def __init__(self, directory: Path, seq_len: int, vocab_size: int, top_k: int):
        self.directory, self.seq_len, self.vocab_size, self.top_k = directory, seq_len, vocab_size, top_k

    @classmethod
    def open(cls, directory: str | Path, teacher_dir: str | Path, rows: list[dict], vocab_size: int,
             top_k: int = 0) -> "TeacherCache":
        """Create the folder, or reuse it when its header matches this teacher, these rows and top_k."""
        if not 0 <= top_k <= vocab_size:
            raise MobileLLMError(f"distill.cache_top_k must be within [0, {vocab_size}] (0: the whole vocabulary), "
                                 f"got {top_k}")
        directory = Path(directory)
        seq_len = len(rows[0]["inputs"])
        header = {"format": CACHE_FORMAT, "teacher_sha256": teacher_fingerprint(teacher_dir),
                  "data_sha256": rows_fingerprint(rows), "rows": len(rows), "seq_len": seq_len,
                  "vocab_size": vocab_size, "top_k": top_k, "dtype": "float16"}
        path = directory / "header.json"
        if path.is_file():
            cls._check(directory, path, header)
        elif directory.is_dir() and any(directory.glob("row-*")):
            raise MobileLLMError(f"teacher cache {directory} has rows but no header.json: "
                                 "delete the folder or use another one")
        else:  # ranks racing here write the same bytes
            write_json_atomic(path, header)
        return cls(directory, seq_len, vocab_size, top_k)

    @staticmethod
    def _check(directory: Path, path: Path, header: dict) -> None:
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            stored = {}
        if not isinstance(stored, dict):
            stored = {}
        differ = [name for key, name in CACHE_KEYS.items() if stored.get(key) != header[key]]
        if differ:
            raise MobileLLMError(f"teacher cache {directory} was made for another {', '.join(differ)}: "
                                 "delete the folder or use another one")

    def path(self, row: int) -> Path:
        return self.directory / f"row-{row:08d}.{'npz' if self.top_k else 'npy'}"

    def has(self, row: int) -> bool:
        return self.path(row).is_file()

    def get(self, row: int) -> tuple[np.ndarray, ...]:
        """(logits,) of shape (seq_len, vocab), or (values, indices) of shape (seq_len, top_k)."""
        path = self.path(row)
        try:
            if self.top_k:
                with np.load(path, allow_pickle=False) as z:  # data only, never pickled objects
                    entry = (z["values"], z["indices"])
            else:
                entry = (np.load(path, allow_pickle=False),)
        except (OSError, ValueError, KeyError) as err:
            raise MobileLLMError(f"teacher cache file {path} is unreadable ({type(err).__name__}): "
                                 "delete the folder or use another one") from None
        width = self.top_k or self.vocab_size
        if any(a.shape != (self.seq_len, width) for a in entry):
            raise MobileLLMError(f"teacher cache file {path} has the wrong shape: delete the folder or use another one")
        return entry

    def put(self, row: int, entry: tuple[np.ndarray, ...]) -> None:
        with atomic_path(self.path(row)) as tmp, open(tmp, "wb") as fh:  # a file object: numpy adds no suffix
            if self.top_k:
                np.savez(fh, values=entry[0], indices=entry[1])
            else:
                np.save(fh, entry[0])


def _pick(x: torch.Tensor | None, rows: list[int]) -> torch.Tensor | None:
    """The given rows of a per-row tensor; None and tensors shared by all rows stay as they are."""
    if x is None or x.dim() < 2 or x.shape[0] == 1:
        return x
    return x[rows]


class Distiller:
    """Not an nn.Module on purpose: the teacher's weights stay out of the student's optimizer,
    gradient sync and checkpoints."""

    def __init__(self, teacher, alpha: float = 0.5, temperature: float = 2.0, chunk_tokens: int = 4096,
                 cache: TeacherCache | None = None):
        if not 0.0 <= alpha <= 1.0:
            raise MobileLLMError(f"distill.alpha must be within [0, 1], got {alpha}")
        if temperature <= 0:
            raise MobileLLMError(f"distill.temperature must be positive, got {temperature}")
        self.teacher = teacher.eval().requires_grad_(False)
        self.alpha, self.temperature, self.chunk_tokens = alpha, temperature, chunk_tokens
        self.cache = cache

    @classmethod
    def from_dir(cls, path: str, student_vocab: int, device, cache_dir: str | None = None, cache_top_k: int = 0,
                 rows: list[dict] | None = None, **kwargs) -> "Distiller":
        """rows: the finite training set (needed for a cache, whose row ids index it)."""
        from mobilellm.checkpoint import load_model_dir

        if cache_dir and rows is None:
            raise MobileLLMError("distill.cache_dir needs a finite set of rows seen for several epochs (fine-tuning); "
                                 "this data streams each row once: unset it")
        teacher = load_model_dir(path, device=device)
        if teacher.config.vocab_size != student_vocab:
            raise MobileLLMError(f"teacher {path} has a {teacher.config.vocab_size}-token vocabulary, the student "
                                 f"{student_vocab}: distillation needs the same tokenizer")
        cache = TeacherCache.open(cache_dir, path, rows, student_vocab, cache_top_k) if cache_dir else None
        return cls(teacher, cache=cache, **kwargs)

    def _chunk(self, h, w, teacher_logits, t, teacher_ids=None):
        logits = (h @ w.T).float()  # (c, V)
        valid = (t != IGNORE_INDEX).float()
        ce = F.cross_entropy(logits, t, ignore_index=IGNORE_INDEX, reduction="sum")
        T = self.temperature
        if teacher_ids is not None:  # top-k: both distributions renormalised over the teacher's k tokens
            logits = logits.gather(1, teacher_ids)
        student = F.log_softmax(logits / T, dim=-1)
        teacher = F.log_softmax(teacher_logits.float() / T, dim=-1)
        kl = (teacher.exp() * (teacher - student)).sum(-1)  # (c,)
        return (1 - self.alpha) * ce, self.alpha * T * T * (kl * valid).sum()

    def _live_chunks(self, inputs, positions, attn_mask):
        """(offset, (teacher logits,)) per chunk of the flattened tokens, from the teacher now."""
        with torch.no_grad():
            th = self.teacher.hidden_states(inputs, positions=positions, attn_mask=attn_mask)
        th = th.reshape(-1, th.shape[-1])
        for s in range(0, th.shape[0], self.chunk_tokens):
            with torch.no_grad():  # closed before the yield: the student's chunk needs gradients
                t_logits = th[s:s + self.chunk_tokens] @ self.teacher.output_weight.T
            yield s, (t_logits,)

    @torch.no_grad()
    def _teacher_row(self, th_row: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One row's cache entry from its teacher hidden states (T, dim): float16 logits or top-k."""
        parts = []
        for s in range(0, th_row.shape[0], self.chunk_tokens):
            logits = (th_row[s:s + self.chunk_tokens] @ self.teacher.output_weight.T).float()
            if self.cache.top_k:
                values, ids = logits.topk(self.cache.top_k, dim=-1)
                parts.append((values.half(), ids.int()))
            else:
                parts.append((logits.half(),))
        return tuple(torch.cat(p) for p in zip(*parts))

    def _cached_chunks(self, inputs, positions, attn_mask, row_ids):
        """Like _live_chunks, row by row from the cache; the teacher runs only on rows not cached yet.

        Fresh rows use the float16 entry they store, so every epoch sees the same teacher.
        """
        ids = row_ids.tolist()
        missing = [b for b, r in enumerate(ids) if not self.cache.has(r)]
        fresh = {}
        if missing:
            with torch.no_grad():
                th = self.teacher.hidden_states(_pick(inputs, missing), positions=_pick(positions, missing),
                                                attn_mask=_pick(attn_mask, missing))
            fresh = dict(zip(missing, th))
        seq_len = inputs.shape[1]
        for b, r in enumerate(ids):
            if b in fresh:
                entry = self._teacher_row(fresh.pop(b))
                self.cache.put(r, tuple(a.cpu().numpy() for a in entry))
            else:
                entry = tuple(torch.from_numpy(a).to(inputs.device) for a in self.cache.get(r))
            if len(entry) == 2:
                entry = (entry[0], entry[1].long())  # gather wants int64 ids
            for s in range(0, seq_len, self.chunk_tokens):
                yield b * seq_len + s, tuple(a[s:s + self.chunk_tokens] for a in entry)

    def losses(self, hidden, weight, inputs, targets, positions=None, attn_mask=None, row_ids=None):
        """(cross-entropy, KL) terms, each summed over non-ignored targets / their count.

        row_ids (B,): each row's index in the training set, for the cache (None: teacher on the fly).
        """
        if self.cache is not None and row_ids is not None:
            chunks = self._cached_chunks(inputs, positions, attn_mask, row_ids)
        else:
            chunks = self._live_chunks(inputs, positions, attn_mask)
        h = hidden.reshape(-1, hidden.shape[-1])
        t = targets.reshape(-1)
        n = (t != IGNORE_INDEX).sum().clamp(min=1)
        ce_sum = kl_sum = 0.0
        for s, teacher in chunks:
            e = s + teacher[0].shape[0]
            ce, kl = checkpoint(self._chunk, h[s:e], weight, teacher[0], t[s:e], *teacher[1:], use_reentrant=False)
            ce_sum, kl_sum = ce_sum + ce, kl_sum + kl
        return ce_sum / n, kl_sum / n

    def __call__(self, hidden, weight, inputs, targets, positions=None, attn_mask=None, row_ids=None):
        ce, kl = self.losses(hidden, weight, inputs, targets, positions, attn_mask, row_ids)
        return ce + kl
