"""`mobilellm eval <model dir> --tasks ... --data-dir ...`: metrics table + results.json."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mobilellm.commands.options import Deprecated
from mobilellm.errors import MobileLLMError


def run(args) -> int:
    from mobilellm.checkpoint import load_model_and_tokenizer
    from mobilellm.eval.evaluator import evaluate, markdown_table
    from mobilellm.eval.tasks import resolve_task_names
    from mobilellm.fileio import write_json_atomic, write_text_atomic
    from mobilellm.precision import float_dtype
    from mobilellm.sysinfo import resolve_device

    names = resolve_task_names(args.tasks)  # bad names fail before the model loads
    if args.batch_size < 1:
        raise MobileLLMError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = resolve_device(args.device)
    model, tokenizer = load_model_and_tokenizer(args.model, device=device, dtype=float_dtype(args.precision),
                                                tokenizer=args.tokenizer)
    out = evaluate(model, tokenizer, names, data_dir=args.data_dir, manifest=args.manifest,
                   batch_size=args.batch_size, limit=args.limit, stride=args.stride, seq_len=args.seq_len,
                   device=device, progress=not args.no_progress)
    out["settings"]["model"] = str(Path(args.model).resolve())
    table = markdown_table(out["results"])
    print(table, end="")
    output = Path(args.output) if args.output else Path(args.model) / "eval" / "results.json"
    write_json_atomic(output, out)
    write_text_atomic(output.with_suffix(".md"), table + "\nsettings: " + json.dumps(out["settings"]) + "\n")
    print(f"wrote {output} and {output.with_suffix('.md')}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "eval", help="zero-shot accuracy (paper's eight tasks, LAMBADA) and perplexity (WikiText-2, val)",
        description="Scores tasks from local files exactly as lm-evaluation-harness 0.4 does (docs/eval.md).",
    )
    p.add_argument("model", help="model directory (with tokenizer files)")
    p.add_argument("--tasks", default="paper",
                   help="comma-separated: arc_easy, arc_challenge, boolq, piqa, siqa, hellaswag, openbookqa, "
                        "winogrande, lambada, wikitext2, val; 'paper' = the eight zero-shot tasks (default)")
    p.add_argument("--data-dir", default=None, help="eval data folder with one sub-folder per task (docs/eval.md)")
    p.add_argument("--manifest", default=None, help="prepared-data folder for task val")
    p.add_argument("--tokenizer", default=None, help="tokenizer file or directory (default: the model directory's)")
    p.add_argument("--output", default=None, help="results JSON (default: <model dir>/eval/results.json)")
    p.add_argument("--batch-size", type=int, default=32, help="rows per forward pass (default 32)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N documents of each task")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="weights and activations (default fp32); a quantized directory runs its own integers")
    p.add_argument("--dtype", dest="precision", choices=("float32", "bfloat16", "float16"), action=Deprecated,
                   new_flag="--precision fp32|bf16|fp16", help=argparse.SUPPRESS)
    p.add_argument("--stride", type=int, default=None,
                   help="wikitext2: sliding windows every N tokens (default: non-overlapping windows)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="perplexity window / val sample length (default: model context)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
