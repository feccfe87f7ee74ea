"""`mobilellm bench <model dir | .pte | .gguf | .onnx> ...`: latency, peak memory and size on this CPU."""

from __future__ import annotations

from pathlib import Path

from mobilellm import bench


def run(args) -> int:
    rows = []
    for path in args.artifacts:
        result = bench.bench(path, threads=args.threads, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens)
        rows.append({**result, "artifact": Path(path).name})
    print(f"threads={args.threads} prompt={args.prompt_tokens} tokens, decode={args.new_tokens} tokens (greedy)")
    print(bench.table(rows, "artifact"))
    if args.json:
        from mobilellm.fileio import write_json_atomic

        write_json_atomic(args.json, rows)
    return 0


def register(sub) -> None:
    p = sub.add_parser("bench", help="load / first-token / per-token latency, peak RSS and size on this CPU",
                       description=bench.__doc__.split("\n\n")[1])
    p.add_argument("artifacts", nargs="+", help="model directory, .pte, .gguf or .onnx (several: one table)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--json", default=None, help="also write the results as JSON")
    p.set_defaults(func=run)
