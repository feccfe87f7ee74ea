"""`evaluate(...)`: run tasks on an in-memory model, return metrics plus the settings that made them."""

from __future__ import annotations

import math
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from mobilellm.checkpoint import check_vocab
from mobilellm.errors import MobileLLMError
from mobilellm.eval import tasks as T
from mobilellm.eval.perplexity import packed_loss, windows_perplexity
from mobilellm.eval.scoring import LoglikelihoodScorer
from mobilellm.model import MobileLLM


def sample_stderr(values: list[float]) -> float | None:
    """lm-eval's `mean_stderr`: sample standard deviation (n-1) / sqrt(n); sqrt(p(1-p)/(n-1)) for 0/1."""
    n = len(values)
    if n < 2:
        return None
    return float(np.std(values, ddof=1) / math.sqrt(n))


def score_choice_task(scorer: LoglikelihoodScorer, examples: list[T.Example], metrics: tuple[str, ...],
                      desc: str, per_example: bool = False) -> dict:
    """acc = argmax of summed log-likelihoods; acc_norm divides each by its choice's length first.

    per_example: also return "correct", 0/1 per document for the headline metric (acc_norm where
    the task has it), to compare two models document by document."""
    flat = [req for ex in examples for req in ex.requests]
    scores = scorer.score(flat, desc=desc)
    acc, acc_norm, at = [], [], 0
    for ex in examples:
        lls = np.array([s for s, _ in scores[at:at + len(ex.requests)]])
        at += len(ex.requests)
        acc.append(float(np.argmax(lls) == ex.gold))  # np.argmax: first index wins ties, as in lm-eval
        # lm-eval's acc_norm: len() of each choice string (characters, not tokens)
        lengths = np.array([float(len(c)) for c in ex.choices])
        acc_norm.append(float(np.argmax(lls / lengths) == ex.gold))
    out = {"acc": float(np.mean(acc)), "acc_stderr": sample_stderr(acc), "n": len(examples)}
    if "acc_norm" in metrics:
        out.update(acc_norm=float(np.mean(acc_norm)), acc_norm_stderr=sample_stderr(acc_norm))
    if per_example:
        out["correct"] = [int(c) for c in (acc_norm if "acc_norm" in metrics else acc)]
    return out


def score_lambada(scorer: LoglikelihoodScorer, examples: list[T.Example], desc: str = "lambada") -> dict:
    scores = scorer.score([ex.requests[0] for ex in examples], desc=desc)
    lls = [s for s, _ in scores]
    hits = [float(g) for _, g in scores]
    return {"acc": float(np.mean(hits)), "acc_stderr": sample_stderr(hits),
            "ppl": math.exp(-float(np.mean(lls))), "n": len(examples)}


def evaluate(model: MobileLLM, tokenizer, tasks, data_dir: str | Path | None = None, manifest: str | Path | None = None,
             *, batch_size: int = 32, limit: int | None = None, stride: int | None = None,
             seq_len: int | None = None, device: str | torch.device | None = None, progress: bool = False,
             per_example: bool = False) -> dict:
    """Evaluate `model` on `tasks` ("paper", "arc_easy,wikitext2", ["val"], ...).

    data_dir: folder with the task files (docs/eval.md); manifest: prepared-data folder for task `val`.
    Returns {"results": {task: metrics}, "settings": {...}}.
    """
    names = T.resolve_task_names(tasks)
    for name in names:  # fail on a missing file before spending minutes on the first task
        if name == "val":
            if manifest is None:
                raise MobileLLMError("task val needs --manifest <prepared data folder> "
                                     "(the output of `mobilellm prepare`)")
        else:
            T.task_file(T.TASKS[name], data_dir)
    if limit is not None and limit < 1:
        raise MobileLLMError(f"--limit must be a positive number of documents, got {limit}")
    device = torch.device(device) if device is not None else model.output_weight.device
    check_vocab(tokenizer, model.config)
    model.eval()
    scorer = LoglikelihoodScorer(model, tokenizer, batch_size=batch_size, device=device, progress=progress)
    results: dict[str, dict] = {}
    for name in names:
        task = T.TASKS[name]
        t0 = time.perf_counter()
        if task.kind == "choice":
            res = score_choice_task(scorer, T.load_examples(name, data_dir, limit), task.metrics, desc=name,
                                    per_example=per_example)
        elif task.kind == "lambada":
            res = score_lambada(scorer, T.load_examples(name, data_dir, limit), desc=name)
        elif task.kind == "generation":  # greedy responses scored by exact match and ROUGE
            from mobilellm.eval import api_calling

            res = api_calling.evaluate(model, tokenizer, T.task_file(task, data_dir), limit)
        elif name == "wikitext2":
            ids = tokenizer.encode(T.read_wikitext(data_dir), bos=bool(tokenizer.add_bos))
            res = windows_perplexity(model, ids, window=seq_len, stride=stride, batch_size=max(1, batch_size // 4),
                                     device=device, limit=limit, progress=progress)
        else:
            res = _val_loss(model, tokenizer, manifest, seq_len or model.config.max_seq_len, batch_size, device,
                            limit, progress)
        res["seconds"] = round(time.perf_counter() - t0, 3)
        results[name] = res
    settings = {
        "prompt_version": T.PROMPT_VERSION,
        "metric_notes": {
            "acc": "argmax of summed continuation log-likelihood (lm-eval 0.4 `acc`)",
            "acc_norm": "argmax of log-likelihood / len(choice text) (lm-eval 0.4 `acc_norm`)",
            "ppl": "exp(mean token cross-entropy); wikitext2: non-overlapping windows unless stride is set",
            "stderr": "sample stderr sqrt(p(1-p)/(n-1))",
        },
        "num_fewshot": 0,
        "tokenizer_fingerprint": _fingerprint(tokenizer),
        "add_bos": bool(tokenizer.add_bos),
        "dtype": str(model.output_weight.dtype).removeprefix("torch."),
        "device": str(device),
        "batch_size": batch_size,
        "limit": limit,
        "stride": stride,
        "context_length": model.config.max_seq_len,
        "mobilellm_version": code_version(),
    }
    return {"results": results, "settings": settings}


def _val_loss(model, tokenizer, manifest, seq_len, batch_size, device, limit, progress) -> dict:
    from mobilellm.data.loader import PackedTokens, check_tokenizer_matches

    data = PackedTokens(manifest, "val", seq_len)
    # a loss on tokens from another vocabulary is meaningless: refuse instead of reporting it
    check_tokenizer_matches(data.manifest, model.config.vocab_size, _fingerprint(tokenizer))
    n = len(data)
    return packed_loss(model, (data[i] for i in range(n)), n, batch_size=max(1, batch_size // 4), device=device,
                       limit=limit, progress=progress)


def _fingerprint(tokenizer) -> str | None:
    fn = getattr(tokenizer, "fingerprint", None)
    return fn() if callable(fn) else None


def code_version() -> str:
    """`git rev-parse --short HEAD` of the source tree when it is a checkout, else the package version."""
    from mobilellm import __version__

    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return f"{__version__}+git.{out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    return __version__


def headline(name: str, res: dict) -> float | None:
    """The number the paper reports for a task: acc_norm where lm-eval has it (ARC, PIQA, HS, OBQA), else acc."""
    return res["acc_norm"] if "acc_norm" in res else res.get("acc")


def markdown_table(results: dict[str, dict]) -> str:
    """Paper column order for the zero-shot tasks (+ avg when all eight ran), then the other tasks."""
    lines = []
    zs = [n for n in T.ZERO_SHOT if n in results]
    if zs:
        cols = [T.TASKS[n].title for n in zs]
        vals = [f"{100 * headline(n, results[n]):.1f}" for n in zs]
        if len(zs) == len(T.ZERO_SHOT):
            cols.append("avg")
            vals.append(f"{100 * float(np.mean([headline(n, results[n]) for n in zs])):.1f}")
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols), "| " + " | ".join(vals) + " |", ""]
    lines += ["| task | metric | value | ± stderr | n |", "|---|---|---|---|---|"]
    for name, res in results.items():
        for metric in ("acc", "acc_norm", "ppl", "loss", "em_intent", "em_structure", "rouge1", "rougeL"):
            if metric not in res:
                continue
            value = res[metric]
            err = res.get(f"{metric}_stderr")
            if metric.startswith(("em_", "rouge")):  # already in percent
                lines.append(f"| {name} | {metric} | {value:.2f} | | {res.get('n', '')} |")
                continue
            pct = metric.startswith("acc")
            shown = f"{100 * value:.2f}" if pct else f"{value:.4f}"
            shown_err = "" if err is None else (f"{100 * err:.2f}" if pct else f"{err:.4f}")
            n = res.get("n", res.get("tokens", res.get("samples", "")))
            lines.append(f"| {name} | {metric} | {shown} | {shown_err} | {n} |")
    return "\n".join(lines) + "\n"
