"""The paper's on-device latency table (docs/paper.md, "Results we compare against") on this CPU, for every runtime we export to.

Models (random weights; latency does not depend on the values): the 125M shape, 125M-LS (the same
30 blocks, each run twice = 60 logical layers) and a 60-layer non-shared model of the same width.
Each is exported to ExecuTorch (.pte, XNNPACK), llama.cpp (.gguf) and ONNX, and every artifact plus
the PyTorch model directory (baseline) is measured by `mobilellm bench` in a fresh subprocess.

Reports load / first-token / per-token decode time, peak RSS and file size, then the layer-sharing
overhead: decode time of 125M-LS and of the 60-layer model relative to 125M in the same runtime
(paper, iPhone 13 ExecuTorch: +2.6% and +86%), and each runtime's decode time relative to PyTorch.

    python benchmarks/device_latency.py --threads 2 --out /tmp/latency [--runtimes pytorch,pte,gguf,onnx]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mobilellm.bench import bench, table
from mobilellm.checkpoint import save_model_dir
from mobilellm.config import get_preset
from mobilellm.model import MobileLLM

MODELS = {
    "125M": dict(preset="mobilellm-125m"),
    "125M-LS": dict(preset="mobilellm-125m-ls"),
    "60-layer": dict(preset="mobilellm-125m", n_layers=60),
}


def build(name: str, spec: dict, out: Path, tokenizer_dir: Path | None) -> Path:
    directory = out / name
    if (directory / "config.json").exists():
        return directory
    torch.manual_seed(0)
    overrides = {k: v for k, v in spec.items() if k != "preset"}
    model = MobileLLM(get_preset(spec["preset"], **overrides)).eval()
    save_model_dir(model, directory, tokenizer=tokenizer_dir)
    return directory


def export_all(directory: Path, runtimes: list[str], max_len: int, gguf_quant: str) -> dict[str, Path]:
    from mobilellm.export import export

    artifacts = {"pytorch": directory}
    for fmt in ("pte", "gguf", "onnx"):
        if fmt not in runtimes:
            continue
        path = directory.with_suffix(f".{fmt}")
        if not path.exists():
            started = time.perf_counter()
            quant = gguf_quant if fmt == "gguf" else None
            export(directory, fmt, path, precision=quant, max_len=max_len if fmt == "pte" else None)
            print(f"  exported {path.name} in {time.perf_counter() - started:.0f} s", flush=True)
        artifacts[fmt] = path
    return artifacts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/tmp/mobilellm-latency", help="work folder for model dirs and artifacts")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runtimes", default="pytorch,pte,gguf,onnx")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--gguf-quant", default="f32", help="f32 keeps every runtime at fp32 weights")
    ap.add_argument("--tokenizer", default=None, help="tokenizer dir for the GGUF files (default: shared LLaMA-2)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    out = Path(args.out)
    runtimes = args.runtimes.split(",")
    tokenizer = Path(args.tokenizer) if args.tokenizer else Path(__file__).resolve().parents[2] / "shared" / "data" / "tokenizers" / "llama2"
    if "gguf" in runtimes and not (tokenizer / "tokenizer.model").exists() and not (tokenizer / "tokenizer.json").exists():
        raise SystemExit(f"GGUF needs a tokenizer: {tokenizer} has none (pass --tokenizer)")
    rows = []
    for name in args.models.split(","):
        print(f"{name}: building and exporting", flush=True)
        directory = build(name, MODELS[name], out, tokenizer)
        artifacts = export_all(directory, runtimes, args.prompt_tokens + args.new_tokens, args.gguf_quant)
        for runtime in runtimes:
            result = bench(artifacts[runtime], threads=args.threads, prompt_tokens=args.prompt_tokens,
                           new_tokens=args.new_tokens)
            result.pop("output_ids")
            rows.append({"model": name, **result})
            print(f"  {runtime}: decode {result['decode_ms_per_token']:.2f} ms/token", flush=True)
    print(f"\nthreads={args.threads}, prompt {args.prompt_tokens} tokens, {args.new_tokens} decoded tokens (greedy)\n")
    print(table(rows, "model"))
    print("\nlayer-sharing overhead (decode ms/token relative to 125M in the same runtime; paper +2.6% / +86%):\n")
    print("| runtime | 125M-LS vs 125M | 60-layer vs 125M | 125M decode vs PyTorch |")
    print("|---|---|---|---|")
    by = {(r["model"], r["runtime"]): r for r in rows}
    for rt in dict.fromkeys(r["runtime"] for r in rows):
        base = by.get(("125M", rt))

        def rel(model, ref=base):
            r = by.get((model, rt))
            return f"{100 * (r['decode_ms_per_token'] / ref['decode_ms_per_token'] - 1):+.1f}%" if r and ref else "-"

        torch_base = by.get(("125M", "pytorch"))
        vs_torch = (f"{base['decode_ms_per_token'] / torch_base['decode_ms_per_token']:.2f}x"
                    if base and torch_base else "-")
        print(f"| {rt} | {rel('125M-LS')} | {rel('60-layer')} | {vs_torch} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
