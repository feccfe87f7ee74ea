"""Supervised fine-tuning data: conversations -> token ids with an assistant-only loss -> packed rows.

Inputs are JSONL `{"messages": [...]}` or `{"prompt", "completion"}` lines, rendered with the model
directory's chat template (the one `chat` and `serve` use). Packed examples never see each other:
positions restart at 0 per example and the attention mask is block-diagonal (docs/finetune.md)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mobilellm.chat_template import apply_chat_template, special_text
from mobilellm.errors import MobileLLMError
from mobilellm.train.loss import IGNORE_INDEX

ROLES = ("system", "user", "assistant")


@dataclass
class Tokenized:
    ids: np.ndarray  # (n,) the whole rendered conversation
    loss_mask: np.ndarray  # (n,) True where the token belongs to an assistant turn


def conversation_problem(messages) -> str | None:
    """Why a conversation is malformed, or None. Order: [system], user, assistant, user, assistant, ..."""
    if not isinstance(messages, list) or not messages:
        return "no messages"
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return "a message lacks role or content"
        if m["role"] not in ROLES:
            return f"unknown role {m['role']!r}"
        if not isinstance(m["content"], str) or not m["content"].strip():
            return "empty content"
    roles = [m["role"] for m in messages]
    if roles[0] == "system":
        roles = roles[1:]
    if not roles or roles[-1] != "assistant":
        return "does not end with an assistant turn"
    expected = ["user", "assistant"] * (len(roles) // 2)
    if roles != expected:
        return "roles out of order (expected user/assistant turns alternating after an optional system turn)"
    return None


def read_examples(path: str | Path) -> tuple[list[list[dict]], Counter]:
    """Conversations from a JSONL file, and counts of the lines skipped by reason."""
    path = Path(path)
    if not path.is_file():
        raise MobileLLMError(f"fine-tuning data {path} not found")
    conversations, skipped = [], Counter()
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                skipped["not JSON"] += 1
                continue
            if isinstance(obj, dict) and "messages" in obj:
                messages = obj["messages"]
            elif isinstance(obj, dict) and "prompt" in obj and "completion" in obj:
                messages = [{"role": "user", "content": obj["prompt"]},
                            {"role": "assistant", "content": obj["completion"]}]
            else:
                skipped["neither messages nor prompt/completion"] += 1
                continue
            problem = conversation_problem(messages)
            if problem:
                skipped[problem] += 1
                continue
            conversations.append(messages)
    if not conversations:
        why = ", ".join(f"{k}: {v}" for k, v in skipped.items()) or "the file is empty"
        raise MobileLLMError(f"{path} holds no usable examples ({why})")
    return conversations, skipped


def tokenize_conversation(messages: list[dict], tokenizer) -> Tokenized:
    """Render with the tokenizer's chat template; mark the tokens of each assistant turn.

    The template is rendered for growing prefixes of the conversation: the tokens between
    "everything before this assistant turn + the generation prompt" and "everything up to and
    including this turn" are that turn's (its end-of-turn token included, so the model learns to stop).
    """
    kwargs = {"bos_token": special_text(tokenizer, tokenizer.bos_id), "eos_token": special_text(tokenizer, tokenizer.eos_id)}

    def encode(msgs, gen_prompt):
        return tokenizer.encode(apply_chat_template(msgs, tokenizer.chat_template, gen_prompt, **kwargs))

    ids = encode(messages, False)
    mask = np.zeros(len(ids), dtype=bool)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(encode(messages[:i], True))
        end = len(encode(messages[:i + 1], False))
        if ids[:end] != encode(messages[:i + 1], False):
            raise MobileLLMError("the chat template renders a conversation differently from its prefixes; "
                                 "use a template where each turn is appended after the previous ones")
        mask[start:end] = True
    return Tokenized(np.asarray(ids, dtype=np.int64), mask)


def fit_to_context(examples: list[Tokenized], seq_len: int, overflow: str) -> tuple[list[Tokenized], Counter]:
    """Examples longer than the context (seq_len + 1 tokens, for the shift) are truncated or dropped."""
    if overflow not in ("truncate", "drop"):
        raise MobileLLMError(f"overflow must be truncate or drop, got {overflow!r}")
    kept, counts = [], Counter()
    for ex in examples:
        if len(ex.ids) > seq_len + 1:
            if overflow == "drop":
                counts["dropped (longer than the context)"] += 1
                continue
            ex = Tokenized(ex.ids[:seq_len + 1], ex.loss_mask[:seq_len + 1])
            counts["truncated to the context"] += 1
        if not ex.loss_mask[1:].any():
            counts["dropped (no assistant tokens left)"] += 1
            continue
        kept.append(ex)
    return kept, counts


def pack(examples: list[Tokenized], seq_len: int, pad_id: int, packing: bool) -> list[dict]:
    """Rows of seq_len tokens: inputs, targets (IGNORE_INDEX outside assistant tokens), positions, doc ids.

    Packing fills each row greedily with whole examples (first fit, in order); without packing every
    example gets its own row. Padding has doc id -1 and no loss.
    """
    rows, current, used = [], [], 0
    for ex in examples:
        n = len(ex.ids) - 1  # inputs/targets pairs this example contributes
        if current and (not packing or used + n > seq_len):
            rows.append(current)
            current, used = [], 0
        current.append(ex)
        used += n
    if current:
        rows.append(current)
    out = []
    for row in rows:
        inputs = np.full(seq_len, pad_id, dtype=np.int64)
        targets = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
        positions = np.zeros(seq_len, dtype=np.int64)
        docs = np.full(seq_len, -1, dtype=np.int64)
        at = 0
        for d, ex in enumerate(row):
            n = len(ex.ids) - 1
            inputs[at:at + n] = ex.ids[:-1]
            targets[at:at + n] = np.where(ex.loss_mask[1:], ex.ids[1:], IGNORE_INDEX)
            positions[at:at + n] = np.arange(n)
            docs[at:at + n] = d
            at += n
        out.append({"inputs": inputs, "targets": targets, "positions": positions, "docs": docs})
    return out


def collate(rows: list[dict], row_ids: list[int] | None = None) -> dict:
    """Stack rows; the mask lets a token see earlier tokens of its own example only.

    row_ids: each row's index in the training set, kept as "row_ids" (the distillation cache's key).
    """
    batch = {k: torch.as_tensor(np.stack([r[k] for r in rows])) for k in ("inputs", "targets", "positions")}
    if row_ids is not None:
        batch["row_ids"] = torch.as_tensor(row_ids, dtype=torch.long)
    docs = torch.as_tensor(np.stack([r["docs"] for r in rows]))  # (B, T)
    T = docs.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    same = docs[:, :, None] == docs[:, None, :]  # (B, T, T); padding (-1) sees only padding
    batch["attn_mask"] = (same & causal)[:, None]  # (B, 1, T, T)
    return batch


class SFTStream:
    """Endless micro-batches of packed rows for one rank, reshuffled every epoch with a seed.

    Same contract as the pretraining BatchStream (one next() is one micro-step of all ranks; the state is
    the position in that order). Batches carry "row_ids" (indices into `rows`) for the distillation cache.
    """

    def __init__(self, rows: list[dict], micro_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        self.rows, self.micro_batch, self.rank, self.world_size, self.seed = rows, micro_batch, rank, world_size, seed
        self.global_batch = micro_batch * world_size
        self.position = 0

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        ids = []
        for k in range(self.rank * self.micro_batch, (self.rank + 1) * self.micro_batch):
            p = self.position + k
            ids.append(int(self._order(p // len(self.rows))[p % len(self.rows)]))
        self.position += self.global_batch
        return collate([self.rows[i] for i in ids], row_ids=ids)

    def state_dict(self) -> dict:
        return {"position": self.position, "rows": len(self.rows), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("rows") != len(self.rows) or state.get("seed") != self.seed:
            raise MobileLLMError("cannot resume fine-tuning: the data or seed changed since the checkpoint")
        self.position = int(state["position"])


def validation_batches(rows: list[dict], micro_batch: int, rank: int, world_size: int):
    """Fixed-order batches; every rank yields the same number (a weight-0 dummy where it has no rows)."""
    g = micro_batch * world_size
    for start in range(0, len(rows), g):
        mine = rows[start + rank * micro_batch:start + (rank + 1) * micro_batch]
        if mine:
            yield {**collate(mine), "weight": len(mine)}
        else:
            yield {**collate(rows[:1]), "weight": 0}
