"""Loss parity: N processes against one process with gradient accumulation to the same global batch.

Three runs of `mobilellm train` on the same prepared data and recipe: one process with seed 0 and
with seed 1 (their difference is the noise floor of the recipe: another initialisation and data
order), and N processes under torchrun (DDP or FSDP2) with seed 0, whose losses should follow the
seed-0 curve much more closely than the seed-1 curve does. Reported: the mean and largest |loss
difference| per step over the second half of the steps, for N vs 1 and for seed 1 vs seed 0, and
the three curves as a PNG.

    python benchmarks/loss_parity.py --data data/prepared --nproc 8 --preset mobilellm-125m \\
        --steps 200 --micro-batch 16 --seq-len 2048 --out runs/parity

`--device cpu` runs the same with gloo processes (for testing the script, not for numbers).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from train_scaling import launch_training  # noqa: E402 (beside this file)


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def difference(a: dict, b: dict, steps: list[int]) -> dict:
    gaps = [abs(a[s] - b[s]) for s in steps]
    return {"mean_abs": sum(gaps) / len(gaps), "max_abs": max(gaps)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="a prepared dataset folder (mobilellm prepare) of real text")
    p.add_argument("--nproc", type=int, required=True, help="processes (GPUs) of the multi-process run")
    p.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp", "hsdp"])
    p.add_argument("--preset", default="mobilellm-125m")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--micro-batch", type=int, default=16, help="sequences per process per forward")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=None, help="default: the paper's 2e-3 scaled to the global batch")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--out", default="runs/loss-parity")
    p.add_argument("--extra", nargs="*", default=[], metavar="KEY=VALUE", help="more training-config overrides")
    args = p.parse_args()

    out = Path(args.out)
    common = {"model.preset": args.preset, "data.train": f"[{args.data}]", "data.seq_len": args.seq_len,
              "batch.micro_batch": args.micro_batch,
              "batch.global_batch_tokens": args.nproc * args.micro_batch * args.seq_len,
              "run.max_steps": args.steps, "run.log_every": 1, "run.device": args.device, "run.eval_batches": 0,
              "run.tensorboard": False, "schedule.warmup_steps": args.warmup_steps,
              **({"optim.lr": args.lr} if args.lr else {}), **dict(kv.split("=", 1) for kv in args.extra)}
    runs = {"1 process, seed 0": (1, 0), "1 process, seed 1": (1, 1),
            f"{args.nproc} processes ({args.strategy}), seed 0": (args.nproc, 0)}
    curves = {}
    for label, (nproc, seed) in runs.items():
        run_dir = out / label.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
        proc = launch_training(nproc, {**common, "run.seed": seed, "run.out_dir": run_dir,
                                       "run.distributed": args.strategy}, args.device)
        if proc.returncode != 0:
            raise SystemExit(f"{label} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
        curves[label] = losses(run_dir)
        print(f"{label}: final loss {curves[label][args.steps]:.4f}", flush=True)

    (ref, other, multi) = curves.values()
    late = list(range(args.steps // 2 + 1, args.steps + 1))
    result = {"preset": args.preset, "nproc": args.nproc, "strategy": args.strategy, "steps": args.steps,
              "global_batch_seqs": args.nproc * args.micro_batch, "seq_len": args.seq_len,
              "multi_vs_one": difference(multi, ref, late), "seed_vs_seed": difference(other, ref, late)}
    result["within_noise"] = result["multi_vs_one"]["mean_abs"] < result["seed_vs_seed"]["mean_abs"]
    (out / "parity.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    print(f"\n| steps {late[0]}-{late[-1]} | mean abs loss difference | max abs difference |\n|---|---|---|")
    for name, key in ((f"{args.nproc} processes vs 1 (seed 0)", "multi_vs_one"), ("seed 1 vs seed 0 (noise)",
                                                                                  "seed_vs_seed")):
        print(f"| {name} | {result[key]['mean_abs']:.4f} | {result[key]['max_abs']:.4f} |")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, curve in curves.items():
        ax.plot(list(curve), list(curve.values()), label=label, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"{args.preset}: {args.nproc} processes vs 1, global batch {args.nproc * args.micro_batch} x "
                 f"{args.seq_len}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss_parity.png", dpi=120)
    print(f"plot: {out / 'loss_parity.png'}")


if __name__ == "__main__":
    main()
