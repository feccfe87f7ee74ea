"""A checkpoint written by N processes resumes on M != N (one CPU process too, for inspection) and
continues exactly as the uninterrupted run; HSDP (sharded within groups, replicated across them)
trains as one process does. CPU processes with gloo; tiny model, few steps."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, run_cli
from mobilellm.checkpoint import load_model_dir
from mobilellm.train import state as run_state
from test_train import cli_args, dataset, logged_losses, overrides, torchrun  # noqa: F401 (dataset is a fixture)

SEQ_LEN = 32
GLOBAL_SEQS = 12  # one global batch for every world size: 1 x 2 x 6, 2 x 2 x 3, 3 x 2 x 2 (processes x micro x accum)


def run_args(dataset, out, **extra) -> list[str]:
    return cli_args(overrides(dataset, out, **{
        "model.preset": "mobilellm-tiny", "batch.micro_batch": 2, "batch.global_batch_tokens": GLOBAL_SEQS * SEQ_LEN,
        "run.max_steps": 6, "run.save_every": 3, "run.keep_last": 5, "run.distributed": "fsdp", **extra}))


def close(a: dict, b: dict, steps) -> None:
    for step in steps:  # same samples per step; only the order of floating-point sums differs
        assert abs(a[step] - b[step]) < 1e-4, (step, a[step], b[step])


def test_checkpoint_of_two_processes_resumes_on_one_and_on_three(dataset, tmp_path):
    reference = tmp_path / "reference"
    run_cli("train", *run_args(dataset, reference), "--no-progress", check=True)
    ref = logged_losses(reference)
    two = tmp_path / "two"
    torchrun(2, run_args(dataset, two))  # FSDP2: every block sharded over the two processes
    close(ref, logged_losses(two), range(1, 7))
    saved = run_state.load_trainer_state(two / "checkpoints" / "step-00000003")
    assert saved["world_size"] == 2 and saved["data"]["position"] == 3 * GLOBAL_SEQS
    assert load_model_dir(two / "checkpoints" / "step-00000003" / "model").config.n_layers > 0  # inspectable

    for world in (1, 3):
        run = tmp_path / f"on-{world}"
        shutil.copytree(two, run)
        shutil.rmtree(run / "checkpoints" / "step-00000006")  # as if the 2-process run had stopped at step 3
        shutil.rmtree(run / "final")
        if world == 1:
            run_cli("train", *run_args(dataset, run), "--no-progress", "--resume", "auto", check=True)
        else:
            torchrun(world, run_args(dataset, run) + ["--resume", "auto"])
        losses = logged_losses(run)
        assert sorted(losses) == list(range(1, 7))
        close(ref, losses, range(4, 7))
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
        assert [r["step"] for r in records] == list(range(1, 7))  # each step logged once
        resumed = run_state.load_trainer_state(run / "checkpoints" / "step-00000006")
        assert resumed["world_size"] == world and resumed["data"]["position"] == 6 * GLOBAL_SEQS
        for (name, p), q in zip(load_model_dir(reference / "final").named_parameters(),
                                load_model_dir(run / "final").parameters()):
            torch.testing.assert_close(q, p, atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("world, shard", [(4, 2)])
def test_hsdp_matches_one_process(dataset, tmp_path, world, shard):
    """Four processes: parameters sharded over pairs, the two pairs replicas of each other."""
    common = {"run.max_steps": 4, "run.save_every": 0, "batch.global_batch_tokens": 8 * SEQ_LEN}
    single = tmp_path / "single"
    run_cli("train", *run_args(dataset, single, **common), "--no-progress", check=True)
    hsdp = tmp_path / "hsdp"
    torchrun(world, run_args(dataset, hsdp, **common, **{"run.distributed": "hsdp", "run.hsdp_shard_size": shard}))
    a, b = logged_losses(single), logged_losses(hsdp)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    close(a, b, a)


@pytest.mark.slow
def test_scaling_benchmark_runs_on_cpu_processes(tmp_path):
    rows_file = tmp_path / "rows.jsonl"
    cmd = [sys.executable, str(REPO / "benchmarks" / "train_throughput.py"), "--nproc", "1", "2", "--strategies",
           "fsdp", "--presets", "mobilellm-tiny", "--device", "cpu", "--seq-len", "32", "--global-batch", "4",
           "--micro-batches", "2", "--steps", "2", "--warmup", "1", "--output", str(rows_file)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert [(r["nproc"], r["strategy"]) for r in rows] == [(1, "one process"), (2, "fsdp")]
    assert all("error" not in r and r["tok_s"] > 0 and r["grad_accum"] == 2 for r in rows), rows
    assert rows[0]["efficiency"] == 1.0
    assert rows[1]["efficiency"] == pytest.approx(rows[1]["tok_s"] / (2 * rows[0]["tok_s"]))
    assert "| mobilellm-tiny | 2 | fsdp | 2x2 |" in proc.stdout


@pytest.mark.slow
def test_loss_parity_benchmark_runs_on_cpu_processes(dataset, tmp_path):
    out = tmp_path / "parity"
    cmd = [sys.executable, str(REPO / "benchmarks" / "loss_parity.py"), "--data", str(dataset), "--nproc", "2",
           "--preset", "mobilellm-tiny", "--steps", "4", "--micro-batch", "2", "--seq-len", str(SEQ_LEN),
           "--device", "cpu", "--lr", "0.01", "--warmup-steps", "2", "--out", str(out),
           "--extra", "model.overrides.vocab_size=320", "model.overrides.n_layers=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "parity.json").read_text())
    assert result["multi_vs_one"]["max_abs"] < 1e-4 < result["seed_vs_seed"]["max_abs"]  # fp32: same sums
    assert result["within_noise"] and (out / "loss_parity.png").stat().st_size > 0
