"""A 2-variant micro study end to end on CPU: prepare, train, evaluate, table, plots, resume."""

import json

import pytest

from conftest import REPO, run_cli
from mobilellm.errors import MobileLLMError
from mobilellm.study import load_spec, run_study
from mobilellm.tokenizer import train_tokenizer

pytest.importorskip("matplotlib")


def write_spec(tmp_path, corpus, tok_dir, extra: str = "") -> str:
    spec = tmp_path / "micro.yaml"
    spec.write_text(f"""
name: micro
description: deep-thin vs shallow-wide at a tiny budget
prepare:
  inputs: [{corpus}]
  tokenizer: {tok_dir}
  val_fraction: 0.1
  workers: 0
  progress: false
train:
  data: {{seq_len: 32}}
  batch: {{micro_batch: 4}}
  optim: {{lr: 0.01}}
  schedule: {{warmup_steps: 2}}
  run: {{max_steps: 6, log_every: 1, eval_batches: 2, tensorboard: false, device: cpu}}
eval:
  tasks: [val]
param_budget: {{target: 60000, tolerance: 0.5}}
variants:
  - name: deep-thin
    model: {{preset: mobilellm-tiny, overrides: {{vocab_size: 300, dim: 32, n_layers: 4, n_heads: 2, n_kv_heads: 1, ffn_dim: 96}}}}
  - name: shallow-wide
    model: {{preset: mobilellm-tiny, overrides: {{vocab_size: 300, dim: 64, n_layers: 1, n_heads: 2, n_kv_heads: 1, ffn_dim: 128}}}}
{extra}""")
    return str(spec)


@pytest.fixture()
def corpus(tmp_path):
    from test_train import synthetic_docs

    docs = synthetic_docs(150)
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    train_tokenizer(docs, vocab_size=300).save(tmp_path / "tok")
    return path


def test_micro_study_end_to_end(tmp_path, corpus):
    spec = write_spec(tmp_path, corpus, tmp_path / "tok")
    out = tmp_path / "study"
    result = run_study(spec, out)
    rows = [line for line in (out / "results.md").read_text().splitlines() if line.startswith("| deep")
            or line.startswith("| shallow")]
    assert len(rows) == 2
    csv_lines = (out / "results.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 3 and "val_loss" in csv_lines[0]
    records = json.loads((out / "results.json").read_text())["runs"]
    assert {r["variant"] for r in records} == {"deep-thin", "shallow-wide"}
    assert records[0]["logical_layers"] == 4 and records[1]["logical_layers"] == 1
    for r in records:
        assert r["results"]["val"]["loss"] > 0 and r["steps"] == 6
    for png in ("loss_curves.png", "loss_vs_depth.png", "accuracy_vs_params.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(result["plots"]) == 3
    # resumable: a second run reuses every finished variant instead of training again
    before = (out / "runs" / "deep-thin" / "eval.json").stat().st_mtime_ns
    proc = run_cli("study", spec, "--out", out, check=True)
    assert "deep-thin: done, reusing" in proc.stdout and "shallow-wide: done, reusing" in proc.stdout
    assert (out / "runs" / "deep-thin" / "eval.json").stat().st_mtime_ns == before


def test_budget_and_spec_errors(tmp_path, corpus):
    spec = write_spec(tmp_path, corpus, tmp_path / "tok", extra="""  - name: huge
    model: {preset: mobilellm-tiny, overrides: {vocab_size: 300, dim: 256, n_layers: 4}}
""")
    with pytest.raises(MobileLLMError, match="outside the budget"):
        run_study(spec, tmp_path / "s")
    assert not (tmp_path / "s" / "runs").exists()  # nothing trained before the check
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nvariants: []\n")
    with pytest.raises(MobileLLMError, match="no variants"):
        load_spec(bad)
    proc = run_cli("study", tmp_path / "missing.yaml")
    assert proc.returncode != 0 and "not found" in proc.stderr


@pytest.mark.parametrize("spec", sorted((REPO / "configs" / "studies").glob("*.yaml")) or [None])
def test_shipped_study_specs_are_valid(spec):
    if spec is None:
        pytest.skip("no shipped study specs")
    from mobilellm.study import variant_config
    from pathlib import Path

    s = load_spec(spec)
    configs = {n: (v, variant_config(s, v, seed, Path("data"), Path("runs") / n)) for v in s.variants
               for n, seed in v.runs()}
    from mobilellm.study import check_budget

    check_budget(s, configs)
    assert len(configs) >= 2


def test_several_specs_share_data_and_duplicate_runs_in_workers(tmp_path, corpus):
    first = write_spec(tmp_path, corpus, tmp_path / "tok")
    second = tmp_path / "second.yaml"
    text = open(first).read().replace("name: micro", "name: micro2")
    text = text.replace("  - name: shallow-wide\n", "  - name: wide-2\n").replace("dim: 64, n_layers: 1,", "dim: 48, n_layers: 2,")
    second.write_text(text)  # deep-thin is the same run in both specs; wide-2 is new
    out = tmp_path / "studies"
    proc = run_cli("study", first, second, "--out", out, "--jobs", "2", check=True)
    assert "same run as" in proc.stdout
    assert not (out / "micro2" / "data").exists()  # identical prepare sections: prepared once
    a = json.loads((out / "micro" / "runs" / "deep-thin" / "eval.json").read_text())
    b = json.loads((out / "micro2" / "runs" / "deep-thin" / "eval.json").read_text())
    assert b["same_as"].endswith("deep-thin") and b["results"] == a["results"]
    assert not (out / "micro2" / "runs" / "deep-thin" / "final").exists()  # not trained twice
    wide = json.loads((out / "micro2" / "runs" / "wide-2" / "eval.json").read_text())
    assert wide["logical_layers"] == 2 and wide["hardware"] and wide["results"]["val"]["loss"] > 0
    assert "training" in (out / "micro2" / "runs" / "wide-2" / "study.log").read_text()
    for name in ("micro", "micro2"):
        assert len(json.loads((out / name / "results.json").read_text())["runs"]) == 2
    rerun = run_cli("study", first, second, "--out", out, "--jobs", "2", check=True)
    assert "started" not in rerun.stdout  # everything finished is reused


def test_per_task_eval_limits(tmp_path, corpus):
    spec = write_spec(tmp_path, corpus, tmp_path / "tok")
    text = open(spec).read().replace("  tasks: [val]\n", "  tasks: [val]\n  limit: {val: 3}\n")
    open(spec, "w").write(text)
    result = run_study(spec, tmp_path / "s", only=["deep-thin"])
    assert result["records"][0]["results"]["val"]["samples"] == 3
    bad = open(spec).read().replace("limit: {val: 3}", "limit: {lambada: 3}")
    open(spec, "w").write(bad)
    with pytest.raises(MobileLLMError, match="does not list"):
        load_spec(spec)
