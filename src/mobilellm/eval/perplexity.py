"""Perplexity: WikiText-2 the reference code's way, a sliding-window variant, and held-out packed data."""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F

from mobilellm.errors import MobileLLMError
from mobilellm.model import MobileLLM

_LOGIT_CHUNK = 1024  # positions per output-projection chunk: caps the (chunk, vocab) logits in memory


def _token_nll(model: MobileLLM, inputs: torch.Tensor, targets: torch.Tensor, scored_from: int = 0) -> torch.Tensor:
    """Summed next-token NLL per row (B,), for targets[:, scored_from:]; inputs/targets (B, T)."""
    hidden = model.hidden_states(inputs)[:, scored_from:]  # (B, T', dim)
    targets = targets[:, scored_from:]
    total = torch.zeros(inputs.shape[0], dtype=torch.float64, device=inputs.device)
    for s in range(0, hidden.shape[1], _LOGIT_CHUNK):
        logits = F.linear(hidden[:, s:s + _LOGIT_CHUNK], model.output_weight).float()  # (B, t, V)
        nll = F.cross_entropy(logits.transpose(1, 2), targets[:, s:s + _LOGIT_CHUNK], reduction="none")  # (B, t)
        total += nll.sum(1).double()
    return total


def windows_perplexity(model: MobileLLM, ids: list[int], window: int | None = None, stride: int | None = None,
                       batch_size: int = 8, device: str | torch.device | None = None,
                       limit: int | None = None, progress: bool = False) -> dict:
    """Perplexity of one long token stream.

    stride None (the reference method): the mean over non-overlapping full windows of each window's mean
    cross-entropy (a tail shorter than a window is dropped). stride s < window: windows every s tokens,
    each scoring only the tokens no earlier window scored, the last partial window included.
    limit: score only the first `limit` windows.
    """
    window = window or model.config.max_seq_len
    device = torch.device(device) if device is not None else model.output_weight.device
    if window < 2 or window > model.config.max_seq_len:
        raise MobileLLMError(f"window {window} must be between 2 and the model context {model.config.max_seq_len}")
    data = torch.tensor(ids, dtype=torch.long)
    if stride is None:
        n_windows = len(ids) // window
        if n_windows == 0:
            raise MobileLLMError(f"text has {len(ids)} tokens, fewer than one window of {window}")
        spans = [(i * window, (i + 1) * window, 1) for i in range(n_windows)]  # (begin, end, first scored)
    else:
        if not 1 <= stride <= window:
            raise MobileLLMError(f"--stride {stride} must be between 1 and the window length {window}")
        spans, scored_until = [], 1
        for begin in range(0, len(ids) - 1, stride):
            end = min(begin + window, len(ids))
            first = max(scored_until, begin + 1)  # token index of the first target not yet scored
            if first < end:
                spans.append((begin, end, first - begin))
                scored_until = end
            if end == len(ids):
                break
    spans = spans[:limit] if limit is not None else spans
    nll_sum, n_tokens, window_means = 0.0, 0, []
    bar = progress_bar(len(spans), "perplexity", "win", progress)
    with torch.inference_mode():
        # equal-length spans batch together; a sliding window's last span may be shorter
        for group in _batches(spans, batch_size):
            begin, end, first = group[0]
            length = end - begin
            chunk = torch.stack([data[b:e] for b, e, _ in group]).to(device)  # (B, length)
            nll = _token_nll(model, chunk[:, :-1], chunk[:, 1:], scored_from=first - 1)  # (B,)
            count = length - first
            nll_sum += float(nll.sum())
            n_tokens += count * len(group)
            window_means += [float(x) / count for x in nll]
            bar.update(len(group))
    bar.close()
    mean_nll = sum(window_means) / len(window_means) if stride is None else nll_sum / n_tokens
    return {"ppl": math.exp(mean_nll), "loss": mean_nll, "tokens": n_tokens, "windows": len(spans),
            "window": window, "stride": stride}


def packed_loss(model: MobileLLM, samples: Iterable[torch.Tensor], n_samples: int, batch_size: int = 8,
                device: str | torch.device | None = None, limit: int | None = None, progress: bool = False) -> dict:
    """Mean next-token loss over (seq_len+1)-token samples (every target counted once)."""
    device = torch.device(device) if device is not None else model.output_weight.device
    total = n_samples if limit is None else min(limit, n_samples)
    nll_sum, n_tokens, batch, done = 0.0, 0, [], 0
    bar = progress_bar(total, "val", "win", progress)
    with torch.inference_mode():
        for sample in samples:
            if done + len(batch) >= total:
                break
            batch.append(torch.as_tensor(sample, dtype=torch.long))
            if len(batch) == batch_size:
                nll_sum, n_tokens = _add_batch(model, batch, device, nll_sum, n_tokens)
                done += len(batch)
                bar.update(len(batch))
                batch = []
        if batch:
            nll_sum, n_tokens = _add_batch(model, batch, device, nll_sum, n_tokens)
            done += len(batch)
    bar.close()
    if n_tokens == 0:
        raise MobileLLMError("the validation split has no samples; prepare data with a held-out split")
    loss = nll_sum / n_tokens
    return {"loss": loss, "ppl": math.exp(loss), "tokens": n_tokens, "samples": done}


def _add_batch(model, batch, device, nll_sum, n_tokens):
    chunk = torch.stack(batch).to(device)  # (B, seq_len+1)
    if chunk.shape[1] - 1 > model.config.max_seq_len:
        raise MobileLLMError(f"samples of {chunk.shape[1] - 1} tokens exceed the model context "
                             f"{model.config.max_seq_len}; pass a smaller --seq-len")
    nll = _token_nll(model, chunk[:, :-1], chunk[:, 1:])
    return nll_sum + float(nll.sum()), n_tokens + chunk.shape[0] * (chunk.shape[1] - 1)


def _batches(spans: list[tuple[int, int, int]], batch_size: int):
    group: list[tuple[int, int, int]] = []
    for span in spans:
        same_shape = not group or (span[1] - span[0], span[2]) == (group[0][1] - group[0][0], group[0][2])
        if group and (len(group) == batch_size or not same_shape):
            yield group
            group = []
        group.append(span)
    if group:
        yield group


def progress_bar(total: int, desc: str, unit: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False, disable=not enabled)
