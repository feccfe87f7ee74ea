"""Trainer tests on CPU: learning, exact resume after SIGKILL, DDP/FSDP2 parity with one process,
non-finite losses, and bad configs failing before training starts."""

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from mobilellm.checkpoint import load_model_dir
from mobilellm.data.prepare import prepare
from mobilellm.errors import MobileLLMError
from mobilellm.tokenizer import train_tokenizer
from mobilellm.train import config as train_config
from mobilellm.train.trainer import CausalLMLoss, train

WORDS = ("the cat dog sat on a mat and ran to house big small red blue green fast slow tree bird "
         "sings in morning evening river flows under old bridge near quiet town").split()


def synthetic_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))).capitalize() + "."
                     for _ in range(rng.randint(3, 8))]
        docs.append(" ".join(sentences))
    return docs


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    docs = synthetic_docs(400)
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tok = train_tokenizer(docs, vocab_size=320)
    prepare([str(root / "corpus.jsonl")], tok, root / "prepared", val_fraction=0.1, workers=0, progress=False,
            log=lambda line: None)
    return root / "prepared"


def overrides(dataset: Path, out: Path, **extra) -> list[str]:
    base = {
        "model.preset": "mobilellm-tiny-ls", "model.overrides.vocab_size": 320, "model.overrides.n_layers": 2,
        "data.train": f"[{dataset}]", "data.seq_len": 32, "batch.micro_batch": 4, "run.max_steps": 8,
        "run.out_dir": str(out), "schedule.warmup_steps": 2, "optim.lr": 0.01, "run.log_every": 1,
        "run.tensorboard": False, "run.eval_batches": 2,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def cli_args(items: list[str]) -> list[str]:
    out = []
    for item in items:
        key, _, value = item.partition("=")
        out += [f"--{key}", value]
    return out


def logged_losses(run_dir: Path) -> dict[int, float]:
    """Per-step training loss, the last record of each step winning (a resumed run rewrites some)."""
    losses = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            losses[rec["step"]] = rec["loss"]
    return losses


def test_loss_decreases_and_run_dir_is_complete(dataset, tmp_path):
    cfg = train_config.load(None, overrides(dataset, tmp_path / "run", **{"run.max_steps": 30}))
    result = train(cfg, progress=False)
    first, last = result.losses[0][1], result.losses[-1][1]
    assert last < first - 1.0, (first, last)
    assert result.val_loss is not None and math.isfinite(result.val_loss)
    run = tmp_path / "run"
    assert (run / "config.yaml").exists() and (run / "metrics.jsonl").exists()
    model = load_model_dir(run / "final")  # a complete model dir, tokenizer included
    assert model.config.layer_sharing == "immediate"
    assert (run / "final" / "tokenizer.json").exists()
    resolved = (run / "config.yaml").read_text()
    assert "peak_lr" in resolved and "tokens_per_step" in resolved


def test_kill_and_resume_reproduces_uninterrupted_losses(dataset, tmp_path):
    steps = 10
    args = cli_args(overrides(dataset, tmp_path / "full", **{"run.max_steps": steps, "run.save_every": 2}))
    run_cli("train", *args, "--no-progress", check=True)
    reference = logged_losses(tmp_path / "full")
    assert sorted(reference) == list(range(1, steps + 1))

    killed = tmp_path / "killed"
    args = cli_args(overrides(dataset, killed, **{"run.max_steps": steps, "run.save_every": 2}))
    proc = subprocess.Popen([sys.executable, "-m", "mobilellm", "train", *args, "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step-00000004").exists():
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # a save interrupted by SIGKILL leaves only a temporary directory behind; plant one to be sure
    partial = killed / "checkpoints" / ".step-00000099.abc.tmp"
    partial.mkdir(exist_ok=True)
    (partial / "trainer_state.pt").write_bytes(b"half")
    resumed = run_cli("train", *args, "--no-progress", "--resume", "auto", check=True)
    assert "trained 10 steps" in resumed.stdout
    assert not partial.exists()
    losses = logged_losses(killed)
    for step in range(1, steps + 1):
        assert abs(losses[step] - reference[step]) < 1e-6, (step, losses[step], reference[step])


def torchrun(nproc: int, args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(29500 + random.randint(0, 2000)), "-m", "mobilellm", "train", *args, "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("preset", ["mobilellm-tiny-ls", "mobilellm-tiny"])
def test_two_process_training_matches_one_process(dataset, tmp_path, strategy, preset):
    """Also shows shared weights survive DDP/FSDP2 wrapping: the trainer checks them after wrapping
    (check_shared_parameters), and a duplicated block would train differently from one process."""
    steps = 5
    common = {"run.max_steps": steps, "model.preset": preset, "run.distributed": strategy}
    single = tmp_path / "single"
    run_cli("train", *cli_args(overrides(dataset, single, **common, **{"batch.grad_accum": 2})), "--no-progress",
            check=True)
    double = tmp_path / "double"
    torchrun(2, cli_args(overrides(dataset, double, **common, **{"batch.grad_accum": 1})))
    a, b = logged_losses(single), logged_losses(double)
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    for step in a:  # same samples per step; only the order of floating-point sums differs
        assert abs(a[step] - b[step]) < 1e-4, (step, a[step], b[step])
    ref, dist_model = load_model_dir(single / "final"), load_model_dir(double / "final")
    for (name, p), q in zip(ref.named_parameters(), dist_model.parameters()):
        torch.testing.assert_close(q, p, atol=1e-4, rtol=1e-3, msg=name)


def test_non_finite_losses_are_skipped_then_stop(dataset, tmp_path, monkeypatch):
    real_forward = CausalLMLoss.forward
    calls = {"n": 0}

    def flaky(self, inputs, targets):
        calls["n"] += 1
        loss = real_forward(self, inputs, targets)
        return loss * float("nan") if calls["n"] in (3, 4) or calls["n"] >= 9 else loss

    monkeypatch.setattr(CausalLMLoss, "forward", flaky)
    cfg = train_config.load(None, overrides(dataset, tmp_path / "run", **{
        "run.max_steps": 20, "run.save_every": 2, "run.max_bad_steps": 3, "run.eval_batches": 0}))
    with pytest.raises(MobileLLMError, match="not finite for 4 consecutive steps") as err:
        train(cfg, progress=False)
    assert "step-00000008" in str(err.value)  # the last good checkpoint is named and kept
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["step"] for r in records if r.get("skipped")]
    assert skipped[:2] == [3, 4]  # two bad steps were skipped and training went on
    assert (tmp_path / "run" / "checkpoints" / "step-00000008").is_dir()


@pytest.mark.parametrize("extra, message", [
    ({"optim.lrr": 1}, "unknown config key 'optim.lrr'"),
    ({"batch.global_batch_tokens": 100}, "not a multiple of"),
    ({"data.train": "[/nonexistent/prepared]"}, "nonexistent"),
    ({"model.overrides.vocab_size": 100}, "vocab"),
    ({"schedule.kind": "exponential"}, "schedule.kind"),
])
def test_bad_configs_fail_before_training(dataset, tmp_path, extra, message):
    proc = run_cli("train", *cli_args(overrides(dataset, tmp_path / "run", **extra)), "--no-progress")
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and message in last, proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_yaml_config_and_missing_file(tmp_path, dataset):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(f"model:\n  preset: mobilellm-tiny\n  overrides: {{vocab_size: 320}}\n"
                         f"data:\n  train: [{dataset}]\n  seq_len: 32\nrun:\n  max_steps: 2\n")
    cfg = train_config.load(yaml_file, ["optim.lr=3e-3", "run.out_dir=" + str(tmp_path / "r")])
    assert cfg.optim.lr == 3e-3 and cfg.run.max_steps == 2 and cfg.model.overrides == {"vocab_size": 320}
    with pytest.raises(MobileLLMError, match="not found"):
        train_config.load(tmp_path / "missing.yaml")


def test_lr_schedule_follows_paper():
    from mobilellm.train.optim import lr_at

    cfg = train_config.TrainConfig()
    cfg.schedule.warmup_steps = 10
    lrs = [lr_at(s, 100, 1.0, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1) and all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    cfg.schedule.kind = "wsd"
    wsd = [lr_at(s, 100, 1.0, cfg) for s in range(100)]
    assert wsd[50] == 1.0 and wsd[-1] == pytest.approx(0.1)
    # paper: 2e-3 at 1024 x 2048 tokens, linear in the global batch
    assert train_config.TrainConfig().peak_lr(256 * 2048) == pytest.approx(5e-4)


def test_fused_loss_matches_cross_entropy():
    from mobilellm.train.loss import linear_cross_entropy

    h = torch.randn(2, 37, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    t = torch.randint(0, 50, (2, 37))
    t[0, :3] = -100
    loss = linear_cross_entropy(h, w, t, chunk_tokens=16)
    loss.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = torch.nn.functional.cross_entropy((h @ w.T).reshape(-1, 50), t.reshape(-1), ignore_index=-100)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(gh, h.grad)
    torch.testing.assert_close(gw, w.grad)


@pytest.mark.parametrize("name", ["mobilellm-125m", "mobilellm-125m-ls", "mobilellm-350m", "cpu-tiny"])
def test_shipped_configs_load(name):
    from conftest import REPO

    cfg = train_config.load(REPO / "configs" / f"{name}.yaml", ["data.train=[somewhere]"])
    cfg.validate()
    cfg.model_config()
    if name != "cpu-tiny":  # the paper's global batch and LR on 32 GPUs
        assert cfg.batch_plan(32) == (2, 1024) and cfg.peak_lr(1024 * 2048) == pytest.approx(2e-3)


def test_shared_parameter_check_catches_a_duplicated_embedding():
    from mobilellm.config import get_preset
    from mobilellm.model import MobileLLM
    from mobilellm.train.distributed import check_shared_parameters

    model = MobileLLM(get_preset("mobilellm-tiny-ls"))
    check_shared_parameters(model)
    model.lm_head = torch.nn.Linear(model.config.dim, model.config.vocab_size, bias=False)  # an untied copy
    with pytest.raises(MobileLLMError, match="no longer shares"):
        check_shared_parameters(model)
    model = MobileLLM(get_preset("mobilellm-tiny-ls"))
    model.layers.append(torch.nn.Linear(4, 4))  # a stray extra copy of weights
    with pytest.raises(MobileLLMError, match="duplicated"):
        check_shared_parameters(model)
