"""Batched log-likelihood of continuations given contexts, tokenized the way lm-eval's HF model does.

Faster than lm-eval's `--model hf` with the same numbers: requests that share a context are packed into
one row (context once, each continuation a branch under a tree attention mask, RoPE positions restarting
after the context), the output projection runs only at scored positions, and rows are sorted longest
first and padded per batch."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mobilellm.errors import MobileLLMError
from mobilellm.eval.perplexity import progress_bar
from mobilellm.model import MobileLLM


@dataclass
class _Row:
    context: list[int]  # shared prefix tokens, positions 0..len-1
    branches: list[list[int]] = field(default_factory=list)  # continuation tokens (all but the last are input)
    targets: list[list[int]] = field(default_factory=list)  # scored tokens per branch
    request_ids: list[int] = field(default_factory=list)

    def length(self) -> int:
        return len(self.context) + sum(len(b) for b in self.branches)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair`: trailing spaces of the context move to the continuation, the whole
    string is encoded once and split at the context's token length (BOS as the tokenizer adds it)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    bos = bool(tokenizer.add_bos)
    whole = tokenizer.encode(context + continuation, bos=bos)
    context_ids = tokenizer.encode(context, bos=bos)
    return context_ids, whole[len(context_ids):]


class LoglikelihoodScorer:
    def __init__(self, model: MobileLLM, tokenizer, *, batch_size: int = 32, device: str | torch.device | None = None,
                 max_length: int | None = None, progress: bool = False):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = max(1, int(batch_size))
        self.device = torch.device(device) if device is not None else model.output_weight.device
        self.max_length = max_length or model.config.max_seq_len
        self.progress = progress

    def prefix_token(self) -> int:
        """Context for an empty context string (lm-eval uses the EOT/BOS token)."""
        for tid in (self.tokenizer.bos_id, self.tokenizer.eos_id):
            if tid is not None and tid >= 0:
                return int(tid)
        return 0

    def encode(self, requests: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        out = []
        for context, continuation in requests:
            if context == "":
                out.append(([self.prefix_token()], self.tokenizer.encode(continuation, bos=False)))
            else:
                out.append(encode_pair(self.tokenizer, context, continuation))
        return out

    def score(self, requests: list[tuple[str, str]], desc: str = "loglikelihood") -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), whether greedy decoding reproduces it) per request."""
        return self.score_tokens(self.encode(requests), desc=desc)

    def score_tokens(self, pairs: list[tuple[list[int], list[int]]],
                     desc: str = "loglikelihood") -> list[tuple[float, bool]]:
        rows = self._pack(pairs)
        rows.sort(key=lambda r: -r.length())  # longest first: an out-of-memory shows up at once
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        bar = progress_bar(len(pairs), desc, "req", self.progress)
        with torch.inference_mode():
            for start in range(0, len(rows), self.batch_size):
                batch = rows[start:start + self.batch_size]
                for rid, value in zip((i for r in batch for i in r.request_ids), self._run(batch)):
                    results[rid] = value
                bar.update(sum(len(r.request_ids) for r in batch))
        bar.close()
        return results  # type: ignore[return-value]

    def _pack(self, pairs: list[tuple[list[int], list[int]]]) -> list[_Row]:
        """Group requests by identical context tokens; split a group that would not fit the context."""
        groups: dict[tuple[int, ...], _Row] = {}
        rows: list[_Row] = []
        for rid, (ctx, cont) in enumerate(pairs):
            if not cont:
                raise MobileLLMError(f"request {rid} has an empty continuation after tokenization; "
                                     "check the task file for empty answer texts")
            if len(ctx) + len(cont) - 1 > self.max_length:
                rows.append(self._truncated_row(rid, ctx, cont))
                continue
            row = groups.get(tuple(ctx))
            if row is None or row.length() + len(cont) - 1 > self.max_length:
                row = _Row(context=list(ctx))
                groups[tuple(ctx)] = row
                rows.append(row)
            row.branches.append(cont[:-1])  # the last continuation token is only predicted, never input
            row.targets.append(cont)
            row.request_ids.append(rid)
        return rows

    def _truncated_row(self, rid: int, ctx: list[int], cont: list[int]) -> _Row:
        """lm-eval's left truncation: keep the last max_length+1 tokens, score what is left of the continuation."""
        full = (ctx + cont)[-(self.max_length + 1):]
        n_cont = min(len(cont), len(full) - 1)
        kept = full[-n_cont:]
        return _Row(context=full[:-n_cont], branches=[kept[:-1]], targets=[kept], request_ids=[rid])

    def _run(self, batch: list[_Row]) -> list[tuple[float, bool]]:
        L = max(r.length() for r in batch)
        B = len(batch)
        tokens = torch.zeros(B, L, dtype=torch.long)
        positions = torch.zeros(B, L, dtype=torch.long)
        branch_of = torch.full((B, L), -1, dtype=torch.long)  # 0 = context, k = branch k, -1 = padding
        pred_rows, pred_cols, target_ids, owner = [], [], [], []
        for b, row in enumerate(batch):
            c = len(row.context)
            tokens[b, :c] = torch.tensor(row.context)
            positions[b, :c] = torch.arange(c)
            branch_of[b, :c] = 0
            at = c
            for k, (branch, target) in enumerate(zip(row.branches, row.targets), 1):
                n = len(branch)
                if n:
                    tokens[b, at:at + n] = torch.tensor(branch)
                    positions[b, at:at + n] = torch.arange(c, c + n)
                    branch_of[b, at:at + n] = k
                # target j is predicted by the last context token (j = 0) or by branch token j-1
                predictors = [c - 1] + list(range(at, at + n))
                pred_rows += [b] * len(target)
                pred_cols += predictors
                target_ids += target
                owner += [(b, k - 1)] * len(target)
                at += n
        same_branch = branch_of[:, None, :] == branch_of[:, :, None]  # (B, L, L): [q, k]
        visible = (branch_of[:, None, :] == 0) | same_branch
        causal = torch.ones(L, L, dtype=torch.bool).tril()
        mask = (visible & causal)[:, None]  # (B, 1, L, L); padding queries still see token 0
        dev = self.device
        hidden = self.model.hidden_states(tokens.to(dev), positions=positions.to(dev), attn_mask=mask.to(dev))
        picked = hidden[torch.tensor(pred_rows, device=dev), torch.tensor(pred_cols, device=dev)]  # (N, dim)
        logprobs = F.log_softmax(F.linear(picked, self.model.output_weight).float(), dim=-1)  # (N, V)
        targets = torch.tensor(target_ids, device=dev)
        token_lp = logprobs.gather(1, targets[:, None])[:, 0].cpu()  # (N,)
        greedy = (logprobs.argmax(-1) == targets).cpu()  # (N,)
        out: dict[tuple[int, int], list] = {}
        for i, key in enumerate(owner):
            acc = out.setdefault(key, [0.0, True])
            acc[0] += float(token_lp[i])
            acc[1] = acc[1] and bool(greedy[i])
        return [(out[(b, k)][0], out[(b, k)][1]) for b, row in enumerate(batch) for k in range(len(row.request_ids))]
