"""The summary train and finetune print after training: one per run (rank 0), warnings on stderr."""

from pathlib import Path

from mobilellm.commands.options import print_training_summary
from mobilellm.train.trainer import TrainResult


def result(**kw):
    return TrainResult(run_dir=Path("runs/x"), final_dir=Path("runs/x/final"), steps=7, tokens=100, **kw)


def test_rank_zero_prints_headline_validation_loss_final_dir_and_warnings(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    print_training_summary(result(val_loss=1.23456, skipped_steps=2), "trained 7 steps")
    out, err = capsys.readouterr()
    assert out.splitlines() == ["trained 7 steps, validation loss 1.2346", f"final model: {Path('runs/x/final')}"]
    assert "2 of the 7 steps were skipped" in err and "final model" not in err


def test_no_validation_loss_and_no_warnings(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    print_training_summary(result(), "fine-tuned 7 steps")
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == "fine-tuned 7 steps" and err == ""


def test_other_ranks_print_nothing(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    print_training_summary(result(val_loss=1.0, skipped_steps=1), "trained 7 steps")
    assert capsys.readouterr() == ("", "")
