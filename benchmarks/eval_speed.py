"""Speed: examples/s of `mobilellm eval` vs lm-evaluation-harness `--model hf`, same model, tasks, files, run.

Both evaluators get an already-loaded model (lm-eval an `HFLM` object on the exported Llama directory,
ours a MobileLLM on the model directory), the same batch size and the same first N documents of each
task; the clock covers reading the task files, building prompts, tokenizing and scoring.

  python benchmarks/eval_speed.py --limit 50 --tasks paper --batch-size 16
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import eval_parity as P  # noqa: E402  (same model builder and task YAMLs)
import torch  # noqa: E402

from mobilellm.eval import tasks as T  # noqa: E402


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=str(P.REPO.parent / "shared" / "data" / "eval"))
    p.add_argument("--tokenizer", default=str(P.REPO.parent / "shared" / "data" / "tokenizers" / "llama2" / "tokenizer.model"))
    p.add_argument("--model", default=None, help="model directory (default: the parity script's random LS model)")
    p.add_argument("--tasks", default="paper")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="torch threads for both evaluators (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from mobilellm.checkpoint import load_model_and_tokenizer
    from mobilellm.eval.evaluator import evaluate

    names = [n for n in T.resolve_task_names(args.tasks) if n in P.LM_EVAL_TASKS]
    data_dir = Path(args.data_dir)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ours_dir, flat_dir = P.build_models(args, work)
        (work / "tasks").mkdir()
        mapping = P.write_lm_eval_tasks(data_dir, names, args.limit, work / "tasks")
        hf = HFLM(pretrained=str(flat_dir), dtype="float32", batch_size=args.batch_size, device="cpu")
        manager = TaskManager(include_path=str(work / "tasks"))
        model, tokenizer = load_model_and_tokenizer(ours_dir)
        for name in names:
            t0 = time.perf_counter()
            lm_eval.simple_evaluate(model=hf, tasks=[mapping[name]], task_manager=manager, log_samples=False,
                                    bootstrap_iters=0)
            theirs = time.perf_counter() - t0
            t0 = time.perf_counter()
            res = evaluate(model, tokenizer, [name], data_dir=data_dir, limit=args.limit, batch_size=args.batch_size)
            ours = time.perf_counter() - t0
            n = res["results"][name]["n"]
            rows.append((name, n, n / ours, n / theirs))
            print(f"{name}: ours {n / ours:.2f} ex/s, lm-eval hf {n / theirs:.2f} ex/s", flush=True)
    cfg = model.config
    print(f"\nmodel: dim {cfg.dim}, {cfg.n_layers} blocks x{cfg.share_repeats} = {cfg.n_logical_layers} logical layers, "
          f"vocab {cfg.vocab_size}; batch size {args.batch_size}; {args.limit} documents per task; "
          f"{cpu_name()}, {torch.get_num_threads()} torch threads")
    print("\n| task | docs | mobilellm eval (ex/s) | lm-eval hf (ex/s) | speed-up |")
    print("|---|---|---|---|---|")
    for name, n, a, b in rows:
        print(f"| {name} | {n} | {a:.2f} | {b:.2f} | {a / b:.2f}x |")
    total_n = sum(r[1] for r in rows)
    ours_s = sum(r[1] / r[2] for r in rows)
    theirs_s = sum(r[1] / r[3] for r in rows)
    print(f"| all | {total_n} | {total_n / ours_s:.2f} | {total_n / theirs_s:.2f} | {theirs_s / ours_s:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
