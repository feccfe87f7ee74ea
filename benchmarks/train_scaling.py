"""Multi-GPU training throughput: `mobilellm train` under torchrun on N = 1, 2, 4, 8 processes.

Weak scaling, as users scale: every process trains the same per-GPU batch (`--global-batch`
sequences per optimizer step, in micro-batches of `--micro-batches[0]`), so the global batch grows
with N. Each configuration is one real training run (`torchrun --standalone -m mobilellm train`,
DDP or FSDP2, random tokens of the preset's vocabulary written once as a prepared dataset); the
first `--warmup` steps (compilation, NCCL set-up) are not timed. Reported per run: tokens/s (all
processes), tokens/s per GPU, MFU, peak memory of rank 0, and scaling efficiency = tok/s(N) /
(N x tok/s(1)), the one-process figure coming from the same invocation. N = 1 is the plain
one-process trainer (no wrapping), the baseline for both strategies.

    python benchmarks/train_throughput.py --nproc 1 2 4 8 --strategies ddp fsdp \\
        --presets mobilellm-125m mobilellm-350m --global-batch 16 --micro-batches 16

`--device cpu` runs the same on CPU processes with gloo (for testing the script, not for numbers).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def add_arguments(p) -> None:
    p.add_argument("--nproc", type=int, nargs="+", default=None,
                   help="scaling mode: process counts to run (e.g. 1 2 4 8), each under torchrun")
    p.add_argument("--strategies", nargs="+", default=["ddp", "fsdp"], choices=["ddp", "fsdp"],
                   help="scaling mode: wrappings to compare (default: ddp fsdp)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="scaling mode: cuda, or cpu with gloo")


def random_dataset(directory: Path, vocab_size: int, tokens: int, seed: int = 0) -> Path:
    """A prepared dataset (manifest + one shard) of uniformly random token ids."""
    import numpy as np

    from mobilellm.data.prepare import FORMAT, FORMAT_VERSION, token_dtype

    directory.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(vocab_size)
    np.random.default_rng(seed).integers(0, vocab_size, tokens, dtype=np.int64).astype(dtype).tofile(
        directory / "train-00000.bin")
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "dtype": dtype,
                "tokenizer": {"vocab_size": vocab_size, "fingerprint": f"random-{vocab_size}-{seed}"},
                "splits": {"train": {"tokens": tokens, "documents": 1,
                                     "shards": [{"file": "train-00000.bin", "tokens": tokens}]}}}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def launch_training(nproc: int, overrides: dict, device: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node N -m mobilellm train --key value ...` with this checkout's code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "mobilellm", "train", "--no-progress", "--overwrite"]
    cmd += [arg for key, value in overrides.items() for arg in (f"--{key}", str(value))]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if device == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


def run_one(preset: str, nproc: int, strategy: str, data: Path, out: Path, args) -> dict:
    micro = args.micro_batches[0]
    accum = max(1, args.global_batch // micro)
    steps = args.warmup + args.steps
    overrides = {
        "model.preset": preset, "data.train": f"[{data}]", "data.seq_len": args.seq_len,
        "batch.micro_batch": micro, "batch.grad_accum": accum, "run.max_steps": steps, "run.log_every": 1,
        "run.out_dir": out, "run.distributed": strategy, "run.device": args.device, "run.eval_batches": 0,
        "run.tensorboard": False, "schedule.warmup_steps": 1, "optim.lr": 1e-4,
    }
    proc = launch_training(nproc, overrides, args.device)
    row = {"preset": preset, "nproc": nproc, "strategy": strategy if nproc > 1 else "one process",
           "micro_batch": micro, "grad_accum": accum, "seq_len": args.seq_len}
    if proc.returncode != 0:
        return {**row, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "tok_per_s" in r and r["step"] > args.warmup]
    tokens_per_step = nproc * accum * micro * args.seq_len
    seconds = sum(tokens_per_step / r["tok_per_s"] for r in timed)
    tok_s = tokens_per_step * len(timed) / seconds
    row.update(tok_s=tok_s, tok_s_per_gpu=tok_s / nproc, step_ms=1000 * seconds / len(timed),
               peak_mem_gib=max(r["peak_mem_gib"] for r in timed), loss=timed[-1]["loss"])
    if "mfu" in timed[-1]:  # the trainer's MFU per step is tok/s times a constant: scale it to the mean
        row["mfu"] = timed[-1]["mfu"] / timed[-1]["tok_per_s"] * tok_s
    return row


def run_scaling(args) -> list[dict]:
    import torch

    from mobilellm.config import get_preset

    if args.device == "cuda" and torch.cuda.device_count() < max(args.nproc):
        raise SystemExit(f"--nproc {max(args.nproc)} needs that many GPUs; this machine has "
                         f"{torch.cuda.device_count()}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="train-scaling-") as tmp:
        for preset in args.presets:
            vocab = get_preset(preset).vocab_size
            per_step = max(args.nproc) * args.global_batch * args.seq_len
            data = random_dataset(Path(tmp) / f"data-{vocab}", vocab, max(4 * per_step, 1 << 20))
            base = None
            for nproc in sorted(set(args.nproc)):
                for strategy in (args.strategies if nproc > 1 else args.strategies[:1]):
                    row = run_one(preset, nproc, strategy, data, Path(tmp) / "run", args)
                    if nproc == 1 and "error" not in row:
                        base = row
                    if base is not None and "error" not in row:
                        row["efficiency"] = row["tok_s"] / (nproc * base["tok_s"])
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    if args.output:
                        with open(args.output, "a") as fh:
                            fh.write(json.dumps(row) + "\n")
    print_table(rows)
    return rows


def print_table(rows: list[dict]) -> None:
    print("\n| model | processes | wrapping | micro x accum | tok/s | tok/s per GPU | MFU | peak mem GiB (rank 0) "
          "| scaling efficiency |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        head = f"| {r['preset']} | {r['nproc']} | {r['strategy']} | {r['micro_batch']}x{r['grad_accum']} |"
        if "error" in r:
            print(f"{head} error: {r['error']} | | | | |")
            continue
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "n/a"
        eff = f"{r['efficiency']:.1%}" if "efficiency" in r else "n/a"
        print(f"{head} {r['tok_s']:,.0f} | {r['tok_s_per_gpu']:,.0f} | {mfu} | {r['peak_mem_gib']:.1f} | {eff} |")
