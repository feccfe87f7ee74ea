"""What a run folder from someone else, a second training, a full disk or a bad number cannot do:
run code, mix two runs, lose checkpoints, or end in a traceback."""

import errno
import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import run_cli
from mobilellm import cli
from mobilellm.checkpoint import load_model_dir, save_model_dir
from mobilellm.errors import MobileLLMError
from mobilellm.fileio import WriteError, atomic_dir, write_text_atomic
from mobilellm.train import config as train_config
from mobilellm.train import state as run_state
from mobilellm.train.progress import TrainProgress
from mobilellm.train.rundir import RunLock
from mobilellm.train.trainer import CausalLMLoss, train
from test_train import cli_args, dataset, logged_losses, overrides  # noqa: F401 (dataset is a fixture)


def train_args(dataset: Path, out: Path, **extra) -> list[str]:
    return ["train", *cli_args(overrides(dataset, out, **extra)), "--no-progress"]


def one_line_error(proc) -> str:
    """The last stderr line, which must be the CLI's one-line error (no traceback above it)."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr
    return last


def main_in_process(args: list[str], capsys) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def mobilellm(capsys, *args, check: bool = False) -> SimpleNamespace:
    """`mobilellm ...` in this process (no interpreter start-up): returncode, stdout, stderr like run_cli."""
    rc, out, err = main_in_process(list(args), capsys)
    if check:
        assert rc == 0, (out, err)
    return SimpleNamespace(returncode=rc, stdout=out, stderr=err)


# ---- 1. nothing in a checkpoint runs code -----------------------------------------------------------


class _WritesMarker:
    """Unpickling this calls os.system: what a hostile trainer_state.pt would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def as_old_format(checkpoint: Path, payload) -> None:
    """Turn a checkpoint into an older version's layout: trainer_state.pt (a pickle) and nothing else."""
    (checkpoint / run_state.STATE_FILE).unlink()
    (checkpoint / run_state.TENSORS_FILE).unlink()
    torch.save(payload, checkpoint / run_state.LEGACY_FILE)


def test_crafted_pickle_in_a_checkpoint_does_not_run(capsys, dataset, tmp_path):
    run = tmp_path / "run"
    mobilellm(capsys, *train_args(dataset, run, **{"run.max_steps": 2}), check=True)
    checkpoint = run / "checkpoints" / "step-00000002"
    marker = tmp_path / "code-ran"
    as_old_format(checkpoint, {"step": 2, "evil": _WritesMarker(marker)})
    pickle.loads(pickle.dumps(_WritesMarker(tmp_path / "control")))  # the payload works when unpickled
    assert (tmp_path / "control").exists()

    for resume in ("auto", str(checkpoint)):
        proc = mobilellm(capsys, *train_args(dataset, run, **{"run.max_steps": 4}), "--resume", resume)
        line = one_line_error(proc)
        assert "pickle" in line and f"mobilellm convert-state {checkpoint}" in line, line
        assert not marker.exists()
    proc = mobilellm(capsys, "convert-state", checkpoint)  # the suggested conversion refuses it, running nothing
    line = one_line_error(proc)
    assert "refers to posix.system" in line and "not converted" in line, line
    assert not marker.exists() and (checkpoint / run_state.LEGACY_FILE).exists()


def test_old_format_checkpoint_converts_and_resumes_exactly(capsys, dataset, tmp_path):
    steps = 6
    reference = tmp_path / "reference"
    mobilellm(capsys, *train_args(dataset, reference, **{"run.max_steps": steps}), check=True)
    run = tmp_path / "run"
    mobilellm(capsys, *train_args(dataset, run, **{"run.max_steps": steps, "run.save_every": 3}), check=True)
    checkpoint = run / "checkpoints" / "step-00000003"
    saved = run_state.load_trainer_state(checkpoint)
    assert isinstance(saved["rng"]["numpy"][1], type(torch.zeros(1).numpy()))  # numpy arrays, as old files held
    del saved["run_id"], saved["skipped_steps"]  # old files had neither
    as_old_format(checkpoint, saved)
    for later in (run / "checkpoints" / "step-00000006", run / "final"):
        shutil.rmtree(later)

    assert "1 checkpoint(s) converted" in mobilellm(capsys, "convert-state", run, check=True).stdout
    assert not (checkpoint / run_state.LEGACY_FILE).exists()
    again = run_state.load_trainer_state(checkpoint)
    torch.testing.assert_close(again["optimizer"]["state"][0]["exp_avg"], saved["optimizer"]["state"][0]["exp_avg"],
                               rtol=0, atol=0)
    mobilellm(capsys, *train_args(dataset, run, **{"run.max_steps": steps}), check=True)
    a, b = logged_losses(reference), logged_losses(run)
    assert sorted(b) == list(range(1, steps + 1))
    assert all(abs(a[s] - b[s]) < 1e-6 for s in a), (a, b)


def test_trainer_state_round_trips_every_type_exactly(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(3)
    np.random.seed(4)
    random.seed(5)
    state = {"step": 7, "optimizer": {"state": {0: {"step": torch.tensor(7.0), "exp_avg": torch.randn(3, 4)}},
                                      "param_groups": [{"betas": (0.9, 0.95), "lr": 1e-3, "params": [0],
                                                        "foreach": None, "fused": False}]},
             "data": {"position": 12, "seed": 0}, "tiny": float("inf"),
             "bf16": torch.randn(5).to(torch.bfloat16), "view": torch.arange(10)[2:5], "__odd_key": 1}
    state["rng"] = run_state.rng_state()
    run_state.write_trainer_state(tmp_path, state)
    back = run_state._decode(json.loads((tmp_path / run_state.STATE_FILE).read_text())["state"],
                             __import__("safetensors.torch").torch.load_file(tmp_path / run_state.TENSORS_FILE))
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    assert list(back["optimizer"]["state"]) == [0] and back["tiny"] == float("inf") and back["__odd_key"] == 1
    for key in ("bf16", "view"):
        assert back[key].dtype == state[key].dtype and torch.equal(back[key], state[key])
    expected = (torch.rand(3), np.random.rand(3), random.random())
    run_state.set_rng_state(back["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and (expected[1] == again[1]).all() and expected[2] == again[2]


# ---- 2. one run per folder ----------------------------------------------------------------------------


def test_second_training_on_a_folder_refuses_and_a_dead_ones_lock_is_taken_over(capsys, dataset, tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "mobilellm", *train_args(dataset, run, **{
        "run.max_steps": 100000})], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text():
            assert first.poll() is None and time.time() < deadline, "the first training did not start"
            time.sleep(0.05)
        line = one_line_error(mobilellm(capsys, *train_args(dataset, run)))
        assert f"in use by another training (pid {first.pid} on host" in line, line
        assert first.poll() is None  # the first one goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    proc = mobilellm(capsys, *train_args(dataset, run, **{"run.max_steps": 2}), check=True)
    assert f"took over the lock of {run} left by pid {first.pid}" in proc.stderr
    assert "saved no checkpoint; this run replaces them" in proc.stderr
    assert sorted(logged_losses(run)) == [1, 2]  # the killed run's records are gone


def test_lock_is_released_after_a_run_and_names_its_holder(tmp_path):
    lock = RunLock(tmp_path)
    assert lock.acquire() == []
    with pytest.raises(MobileLLMError, match=f"pid {os.getpid()}"):
        RunLock(tmp_path).acquire()
    lock.release()
    other = RunLock(tmp_path)
    assert other.acquire() == []  # released cleanly: no takeover note
    other.release()


def test_resume_none_or_an_earlier_checkpoint_never_mixes_or_deletes_another_run(capsys, dataset, tmp_path):
    run = tmp_path / "run"
    mobilellm(capsys, *train_args(dataset, run, **{"run.max_steps": 6, "run.save_every": 2, "run.keep_last": 3}),
              check=True)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert before == ["step-00000002", "step-00000004", "step-00000006"]

    line = one_line_error(mobilellm(capsys, *train_args(dataset, run, **{"run.max_steps": 6}), "--resume", "none"))
    assert "holds another run (checkpoints up to step 6 and a final model)" in line and "--overwrite" in line
    line = one_line_error(mobilellm(capsys, *train_args(dataset, run, **{"run.max_steps": 6}), "--resume",
                                  run / "checkpoints" / "step-00000002"))
    assert "later checkpoints (step-00000004, step-00000006)" in line
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # nothing was deleted

    # a checkpoint from elsewhere into a folder that holds a run: refused too
    elsewhere = tmp_path / "elsewhere" / "step-00000002"
    shutil.copytree(run / "checkpoints" / "step-00000002", elsewhere)
    line = one_line_error(mobilellm(capsys, *train_args(dataset, run), "--resume", elsewhere))
    assert f"--resume {elsewhere} comes from elsewhere" in line, line

    # --overwrite from step 4: later checkpoints go, metrics are cut back to step 4 and continue once each
    proc = mobilellm(capsys, *train_args(dataset, run, **{"run.max_steps": 6}), "--resume", run / "checkpoints" /
                   "step-00000004", "--overwrite", check=True)
    assert "deleted 1 later checkpoint(s)" in proc.stderr
    train_steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert train_steps == [1, 2, 3, 4, 5, 6]

    # --overwrite with a fresh start deletes the previous run and starts from step 1
    proc = mobilellm(capsys, *train_args(dataset, run, **{"run.max_steps": 2}), "--overwrite", check=True)
    assert "deleted the previous run" in proc.stderr and "trained 2 steps" in proc.stdout
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002"]
    assert sorted(logged_losses(run)) == [1, 2]


def test_metrics_after_resume_hold_each_step_once(capsys, dataset, tmp_path):
    run = tmp_path / "run"
    args = train_args(dataset, run, **{"run.max_steps": 6, "run.save_every": 2, "run.keep_last": 5})
    mobilellm(capsys, *args, check=True)
    # as after a crash between the log of step 6 and its checkpoint: the newest checkpoint is step 4
    shutil.rmtree(run / "checkpoints" / "step-00000006")
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 7, "loss": 1.0')  # a line cut short by the crash
    mobilellm(capsys, *args, check=True)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "val_loss" in r] == [6]


# ---- 3. skipped steps and time limits are said out loud ----------------------------------------------


def test_skipped_steps_are_counted_and_a_run_with_no_update_fails(dataset, tmp_path, monkeypatch, capsys):
    real_forward = CausalLMLoss.forward
    bad = {"steps": set()}

    def flaky(self, inputs, targets):
        flaky.calls += 1
        loss = real_forward(self, inputs, targets)
        return loss * float("nan") if flaky.calls in bad["steps"] else loss

    monkeypatch.setattr(CausalLMLoss, "forward", flaky)
    flaky.calls, bad["steps"] = 0, {2, 3}
    rc, out, err = main_in_process(train_args(dataset, tmp_path / "some", **{"run.max_steps": 6,
                                                                                "run.eval_batches": 0}), capsys)
    assert rc == 0 and "warning: 2 of the 6 steps were skipped" in err, err
    records = [json.loads(x) for x in (tmp_path / "some" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["skipped_steps"] == 2

    flaky.calls, bad["steps"] = 0, set(range(1, 100))
    rc, out, err = main_in_process(train_args(dataset, tmp_path / "none", **{
        "run.max_steps": 4, "run.max_bad_steps": 10, "run.eval_batches": 0}), capsys)
    assert rc == 1 and err.strip().splitlines()[-1].startswith("error: no step trained: all 4 steps"), err
    assert not (tmp_path / "none" / "final").exists()


def test_time_limit_cutting_training_short_is_reported(dataset, tmp_path, capsys):
    rc, out, err = main_in_process(train_args(dataset, tmp_path / "run", **{
        "run.max_steps": 50, "run.time_limit_minutes": 1e-4}), capsys)
    assert rc == 0, err
    assert "warning: run.time_limit_minutes=0.0001 stopped training at step 1 of 50" in err, err
    cfg = train_config.load(None, overrides(dataset, tmp_path / "run2", **{"run.max_steps": 50,
                                                                          "run.time_limit_minutes": 1e-4}))
    result = train(cfg, progress=False)
    assert result.stopped_early and result.steps < result.total_steps == 50


def test_progress_bar_shows_loss_from_step_one_and_an_eta_within_the_time_limit(monkeypatch):
    import io

    clock = {"now": 1000.0}
    monkeypatch.setattr(time, "perf_counter", lambda: clock["now"])
    buffer = io.StringIO()
    bar = TrainProgress(total_steps=100, start_step=0, deadline=1000.0 + 60, file=buffer)
    clock["now"] += 30  # the first step carries the start-up (compilation): not counted in the ETA
    bar.step(1, 2.5, 1e-3)
    bar.bar.refresh()
    assert "loss=2.500" in buffer.getvalue() and "lr=1.00e-03" in buffer.getvalue()
    assert "eta=0:30 (time limit)" in buffer.getvalue()  # no step time measured yet: the limit is all we know
    assert TrainProgress(100, 0, None, enabled=False).eta(1, 0.0) == "?"
    clock["now"] += 0.1
    assert bar.eta(2, clock["now"]) == "0:10"  # 98 steps left at 0.1 s each
    clock["now"] += 10 * 1.0  # steps slow down to ~1 s: 88 s left by the rate, 20 s by the limit
    assert bar.eta(12, clock["now"]) == "0:20 (time limit)"
    bar.close()


def test_train_without_arguments_says_what_is_missing(capsys):
    line = one_line_error(mobilellm(capsys, "train"))
    assert "--config" in line and "mobilellm prepare" in line and "configs/cpu-tiny.yaml" in line


# ---- 4. numbers and files that do not fit ---------------------------------------------------------------


@pytest.mark.parametrize("extra, message", [
    ({"optim.lr": -1}, "optim.lr must be positive, got -1.0"),
    ({"optim.lr": "nan"}, "optim.lr must be positive"),
    ({"optim.betas": "[0.9,1.0]"}, "optim.betas must be two numbers within [0, 1)"),
    ({"schedule.warmup_steps": -3}, "schedule.warmup_steps must be >= 0"),
    ({"batch.micro_batch": 0}, "batch.micro_batch must be positive"),
    ({"run.keep_last": 0}, "run.keep_last must be >= 1"),
    ({"optim.weight_decay": -0.1}, "optim.weight_decay must be >= 0"),
    ({"distill.alpha": 2}, "distill.alpha must be within [0, 1]"),
])
def test_out_of_range_numbers_are_one_line_errors(capsys, dataset, tmp_path, extra, message):
    line = one_line_error(mobilellm(capsys, *train_args(dataset, tmp_path / "run", **extra)))
    assert message in line, line
    assert not (tmp_path / "run").exists()


def test_config_json_that_is_not_an_object_is_one_line(capsys, tmp_path):
    (tmp_path / "config.json").write_text("[1, 2, 3]")
    with pytest.raises(MobileLLMError, match="holds a JSON list, not an object"):
        load_model_dir(tmp_path)
    assert "holds a JSON list" in one_line_error(mobilellm(capsys, "info", tmp_path))


def test_tokenizer_larger_than_the_model_fails_at_load(capsys, dataset, tmp_path):
    from mobilellm.config import get_preset
    from mobilellm.model import MobileLLM
    from mobilellm.tokenizer import load_tokenizer

    small = tmp_path / "small-vocab"
    save_model_dir(MobileLLM(get_preset("mobilellm-tiny", vocab_size=300)), small, tokenizer=load_tokenizer(dataset))
    # fine-tuning reads the model's own tokenizer (320 ids for 300 embeddings)
    (tmp_path / "sft.jsonl").write_text(json.dumps({"prompt": "the cat", "completion": " sat on a mat"}) + "\n")
    line = one_line_error(mobilellm(capsys, "finetune", small, "--data", tmp_path / "sft.jsonl",
                                    "--out", tmp_path / "ft", "--seq-len", 32, "--no-progress"))
    assert "the training tokenizer has 320 tokens but the model's vocab_size is 300" in line, line
    # pretraining from it on data of that tokenizer
    line = one_line_error(mobilellm(capsys, *train_args(dataset, tmp_path / "run", **{"model.init_from": small})))
    assert "320" in line and "300" in line, line


# ---- 5. full disks and read-only folders ------------------------------------------------------------------


def test_no_space_left_while_saving_a_checkpoint_keeps_the_earlier_ones(dataset, tmp_path, monkeypatch, capsys):
    real = run_state.write_trainer_state
    calls = {"n": 0}

    def full_disk(directory, state):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / run_state.TENSORS_FILE))
        real(directory, state)

    monkeypatch.setattr(run_state, "write_trainer_state", full_disk)
    run = tmp_path / "run"
    args = train_args(dataset, run, **{"run.max_steps": 6, "run.save_every": 2})
    rc, out, err = main_in_process(args, capsys)
    assert rc == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"error: no space left on device writing {run}/checkpoints/step-00000004; "
                                            f"earlier checkpoints are intact")
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000002"]  # no half-written leftovers
    monkeypatch.setattr(run_state, "write_trainer_state", real)
    rc, out, err = main_in_process(args, capsys)  # space again: the run continues from step 2
    assert rc == 0 and "trained 6 steps" in out


def test_a_file_size_limit_mid_save_is_one_line(dataset, tmp_path):
    """A real write failure from the OS inside safetensors (Rust): EFBIG from RLIMIT_FSIZE."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # the model file is ~450 kB

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "mobilellm", *train_args(dataset, run, **{"run.max_steps": 2})]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, preexec_fn=limit,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    line = one_line_error(proc)
    assert line == f"error: file too large writing {run}/checkpoints/step-00000002; no checkpoint was saved yet", line
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_run_folder_is_one_line(dataset, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o555)
    try:
        line = one_line_error(run_cli(*train_args(dataset, run)))
        assert "permission denied writing" in line.lower() and str(run) in line, line
    finally:
        run.chmod(0o755)


def test_read_only_file_system_is_one_line(dataset, tmp_path, monkeypatch, capsys):
    """The same as root (where permissions do not stop writes): the run folder's first write fails with EROFS."""
    real_open = os.open

    def read_only(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path / "run")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    rc, out, err = main_in_process(train_args(dataset, tmp_path / "run"), capsys)
    assert rc == 1 and err == f"error: read-only file system writing {tmp_path / 'run' / '.lock'}\n", err


def test_atomic_writes_report_the_target_and_keep_the_previous_version(tmp_path, monkeypatch):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("old")
    real_write_text = Path.write_text

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(WriteError) as err:
        with atomic_dir(target) as tmp:
            write_text_atomic(tmp / "config.json", "{}")  # a nested atomic write names the outer target
    assert str(err.value) == f"no space left on device writing {target}; the previous model is intact"
    monkeypatch.setattr(Path, "write_text", real_write_text)
    assert (target / "a.txt").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    with pytest.raises(FileNotFoundError):  # not a write failure: the error is kept as it is
        with atomic_dir(tmp_path / "x"):
            open(tmp_path / "missing" / "input.txt")
