"""Accuracy of the native backend's precisions (fp32, int8, int4) on a trained model: held-out
perplexity and zero-shot predictions flipped against fp32, computed from the logits the native C
kernels return (the ones `generate`, `chat` and `serve` decode with), not from PyTorch fake-quant.

    python benchmarks/native_accuracy.py --model runs/smollm2 --tasks arc_easy,piqa,hellaswag,winogrande --limit 40

Perplexity: held-out Gutenberg text (the shared corpus, as quant_accuracy.py) in windows of --window
tokens, each run as one prefill of its first token and one decode step per following token. Zero-shot:
the tasks of `mobilellm eval` (same documents, same lm-eval scoring), each request as a prefill of
its context and decode steps over its continuation.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from quant_accuracy import SHARED, gutenberg_texts
from mobilellm.checkpoint import load_model_and_tokenizer
from mobilellm.eval import tasks as T
from mobilellm.eval.evaluator import score_choice_task
from mobilellm.eval.scoring import LoglikelihoodScorer
from mobilellm.inference.select import build_backend


def next_token_logits(backend, prefix: list[int], targets: list[int]) -> torch.Tensor:
    """(len(targets), V) fp32 logits predicting each target: one prefill of prefix, then one decode
    step per target but the last, in cache row 0 (freed afterwards)."""
    logits = [backend.prefill(0, prefix)]
    for tok in targets[:-1]:
        logits.append(backend.decode([0], [tok])[0])
    backend.free(0)
    return torch.stack(logits).float()


class NativeScorer(LoglikelihoodScorer):
    """lm-eval log-likelihoods from a generation backend: prefill the context, decode the continuation."""

    def __init__(self, model, tokenizer, backend):
        super().__init__(model, tokenizer, batch_size=1)
        self.backend = backend

    def score_tokens(self, pairs, desc="loglikelihood"):
        return [self._one(ctx, cont) for ctx, cont in pairs]

    def _one(self, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
        logp = F.log_softmax(next_token_logits(self.backend, ctx, cont), dim=-1)
        target = torch.tensor(cont)
        return float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


def window_nll(backend, ids: list[int], window: int) -> tuple[float, int]:
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window + 1]
        if len(chunk) < 2:
            break
        logits = next_token_logits(backend, chunk[:1], chunk[1:])
        total += float(F.cross_entropy(logits, torch.tensor(chunk[1:]), reduction="sum"))
        count += len(chunk) - 1
    return total, count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--precisions", default="fp32,int8,int4")
    p.add_argument("--eval-chars", type=int, default=20000, help="held-out characters for perplexity")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--tasks", default="arc_easy,piqa,hellaswag,winogrande")
    p.add_argument("--limit", type=int, default=40, help="documents per task")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-len", type=int, default=1024,
                   help="KV cache length (the model's context caps it; a window of --window tokens always fits)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model_and_tokenizer(args.model)
    window = min(args.window, model.config.max_seq_len - 1)  # a window and its target within the context
    ids = [t for text in gutenberg_texts("valid", args.eval_chars) for t in tokenizer.encode(text, bos=False)]
    names = T.resolve_task_names(args.tasks)
    examples = {n: T.load_examples(n, SHARED / "eval", args.limit) for n in names}
    rows, reference = [], None
    for precision in args.precisions.split(","):
        start = time.time()
        max_len = min(model.config.max_seq_len, max(window + 1, args.max_len))
        backend = build_backend(model, precision, backend="native", max_batch=1, max_len=max_len)
        nll, n = window_nll(backend, ids, window)
        scorer = NativeScorer(model, tokenizer, backend)
        res = {t: score_choice_task(scorer, examples[t], T.TASKS[t].metrics, t, per_example=True) for t in names}
        correct = [c for t in names for c in res[t]["correct"]]
        reference = reference or correct
        flipped = sum(a != b for a, b in zip(correct, reference))
        accs = [100 * sum(res[t]["correct"]) / len(res[t]["correct"]) for t in names]
        rows.append((precision, nll / n, accs, flipped, len(correct), backend.nbytes, time.time() - start))
        del backend
    base = rows[0][1]
    print(f"{len(ids)} held-out tokens in windows of {window}; {args.limit} documents per task\n")
    print("| precision | loss (nats) | perplexity | Δ perplexity | weights MiB | " + " | ".join(names)
          + " | avg | flipped | wall s |")
    print("|---" * (8 + len(names)) + "|")
    for precision, loss, accs, flipped, total, nbytes, wall in rows:
        print(f"| {precision} | {loss:.4f} | {math.exp(loss):.2f} | {100 * (math.exp(loss - base) - 1):+.2f}% | "
              f"{nbytes / 2**20:.1f} | " + " | ".join(f"{a:.1f}" for a in accs)
              + f" | {sum(accs) / len(accs):.2f} | {flipped}/{total} | {wall:.0f} |")


if __name__ == "__main__":
    main()
