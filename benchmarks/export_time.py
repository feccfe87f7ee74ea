"""How long `mobilellm export` takes, per format and precision, as a user runs it.

    python benchmarks/export_time.py                          # quickstart size and 125M, every format
    python benchmarks/export_time.py --presets mobilellm-mini-ls --only pte
    python benchmarks/export_time.py --model runs/quickstart/run/final   # a directory of your own

Random-weight model directories (seed 0) are saved once: the quickstart's shape (mobilellm-mini-ls,
vocab 4096) and MobileLLM-125M (vocab 32000, with the LLaMA-2 tokenizer from the shared data when it
is there: a GGUF file must carry one, so gguf rows need it). Each export is one `python -m mobilellm
export` subprocess; the table gives its wall seconds, its CPU seconds (user + sys: the steadier
number on a busy machine), the stage lines the command prints, the file size and the load average
at the start. Export lowering is one Python thread, so the CPU seconds are close to a quiet wall time.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LLAMA2_TOKENIZER = REPO.parent / "shared" / "data" / "tokenizers" / "llama2"
CASES = {"pte": ("fp32", "int8", "int4"), "gguf": ("fp32", "int8", "int4"), "onnx": ("fp32",)}
VOCAB = {"mobilellm-mini-ls": 4096}


def build_model(root: Path, preset: str) -> Path:
    import torch

    from mobilellm.checkpoint import save_model_dir
    from mobilellm.config import get_preset
    from mobilellm.model import MobileLLM

    vocab = VOCAB.get(preset, 32000)
    tokenizer = LLAMA2_TOKENIZER if vocab == 32000 and LLAMA2_TOKENIZER.exists() else None
    torch.manual_seed(0)
    model = MobileLLM(get_preset(preset, vocab_size=vocab, bos_token_id=None, eos_token_id=None))
    return save_model_dir(model, root / preset, tokenizer=tokenizer)


def time_export(model_dir: Path, fmt: str, precision: str, out_dir: Path, max_len: int) -> dict:
    output = out_dir / f"{model_dir.name}-{precision}.{fmt}"
    cmd = [sys.executable, "-m", "mobilellm", "export", str(model_dir), "--format", fmt, "--precision", precision,
           "--output", str(output)] + (["--max-len", str(max_len)] if fmt == "pte" else [])
    load = os.getloadavg()[0]
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1], "load": load}
    stages = re.findall(r"\[\s*([\d.]+) s\] (\w+)", proc.stdout + proc.stderr)
    marks = [(name, float(t)) for t, name in stages]
    spans = ", ".join(f"{name} {nxt - t:.1f}" for (name, t), (_, nxt) in zip(marks, marks[1:]))
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": wall, "cpu": cpu, "stages": spans, "mib": output.stat().st_size / 2**20, "load": load}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="*", default=["mobilellm-mini-ls", "mobilellm-125m"])
    ap.add_argument("--model", nargs="*", default=[], help="model directories to export as well")
    ap.add_argument("--only", choices=sorted(CASES), nargs="*", help="formats to run (default: all)")
    ap.add_argument("--max-len", type=int, default=256, help="pte KV cache length")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dirs = [build_model(root, p) for p in args.presets] + [Path(m) for m in args.model]
        print("| model | format | precision | wall s | CPU s | stages (wall s) | MiB | load avg at start |")
        print("|---|---|---|---|---|---|---|---|")
        for model_dir in dirs:
            for fmt, precisions in CASES.items():
                if args.only and fmt not in args.only:
                    continue
                if fmt == "gguf" and not (model_dir / "tokenizer.json").exists():
                    print(f"| {model_dir.name} | gguf | - | skipped: no tokenizer | | | | |", flush=True)
                    continue
                for precision in precisions:
                    r = time_export(model_dir, fmt, precision, root, args.max_len)
                    if "error" in r:
                        print(f"| {model_dir.name} | {fmt} | {precision} | failed: {r['error']} | | | | "
                              f"{r['load']:.1f} |", flush=True)
                        continue
                    print(f"| {model_dir.name} | {fmt} | {precision} | {r['wall']:.1f} | {r['cpu']:.1f} | "
                          f"{r['stages']} | {r['mib']:.1f} | {r['load']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
