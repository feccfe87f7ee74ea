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


CURVE_TRAIN = """
train:
  data: {seq_len: 32}
  batch: {micro_batch: 4}
  optim: {lr: 0.01}
  schedule: {kind: wsd, warmup_steps: 2, decay_fraction: 0.25}
  run: {max_steps: 24, log_every: 1, eval_batches: 2, tensorboard: false, device: cpu}
curve: {tokens: [1024, 2048], samples: 8}
compare:
  - {name: deep minus wide, a: deep-thin, b: shallow-wide}
"""


def curve_spec(tmp_path, corpus) -> str:
    text = open(write_spec(tmp_path, corpus, tmp_path / "tok")).read()
    start = text.index("train:")
    end = text.index("eval:")
    path = tmp_path / "curve.yaml"
    path.write_text(text[:start] + CURVE_TRAIN.lstrip() + text[end:])
    return str(path)


def test_curve_points_are_annealed_branches(tmp_path, corpus):
    """Each curve point is a decay branch: identical to a separate run of that many tokens."""
    spec = curve_spec(tmp_path, corpus)
    out = tmp_path / "study"
    run_study(spec, out, only=["deep-thin"])
    record = json.loads((out / "runs" / "deep-thin" / "eval.json").read_text())
    tokens = [p["tokens"] for p in record["curve"]]
    assert tokens == [1024, 2048, 24 * 4 * 32]
    for point in record["curve"]:
        assert point["val_bpb"] > 0 and point["train_loss"] > 0
        assert point["gap"] == pytest.approx(point["val_loss"] - point["train_loss"])
    # the main run kept the checkpoints the branches started from; weights of branches are gone
    kept = sorted(p.name for p in (out / "runs" / "deep-thin" / "checkpoints").iterdir())
    assert "step-00000006" in kept and "step-00000012" in kept  # 8 steps decay from 6, 16 from 12
    assert not (out / "runs" / "deep-thin" / "branches" / "tokens-1024" / "final").exists()
    # a separate 8-step run with the same recipe scores the same model as the 1024-token branch
    from mobilellm import study as study_mod
    from mobilellm.train.trainer import train

    spec_obj = study_mod.load_spec(spec)
    variant = spec_obj.variants[0]
    cfg = study_mod.variant_config(spec_obj, variant, None, out / "data", tmp_path / "separate")
    cfg.run.max_steps, cfg.run.keep_steps = 8, []
    result = train(cfg, progress=False)
    separate = study_mod.study_curve.score_dir(result.final_dir, out / "data", 32, 8, "cpu")
    assert separate["val_loss"] == pytest.approx(record["curve"][0]["val_loss"], abs=1e-4)


def test_partial_study_folders_merge_into_the_full_table(tmp_path, corpus):
    spec = curve_spec(tmp_path, corpus)
    full = run_study(spec, tmp_path / "full")
    run_study(spec, tmp_path / "job-a", only=["deep-thin"])
    run_study(spec, tmp_path / "job-b", only=["shallow-wide"])
    proc = run_cli("study", spec, "--out", tmp_path / "merged", "--merge", tmp_path / "job-a", tmp_path / "job-b",
                   check=True)
    assert "merged 2 run(s)" in proc.stdout
    merged = json.loads((tmp_path / "merged" / "results.json").read_text())

    def strip(records):  # timings and hardware differ between runs; every result must not
        keep = ("run", "params", "non_embedding_params", "steps", "tokens", "final_train_loss", "results", "curve")
        out = [{k: r[k] for k in keep} for r in records]
        for r in out:
            r["results"] = {t: {k: v for k, v in res.items() if k != "seconds"} for t, res in r["results"].items()}
        return sorted(out, key=lambda r: r["run"])

    assert strip(merged["runs"]) == strip(full["records"])
    assert merged["gaps"][0]["points"] and len(merged["gaps"][0]["points"]) == 3
    assert "deep minus wide" in (tmp_path / "merged" / "results.md").read_text()
    for png in ("loss_vs_tokens.png", "gaps.png"):
        assert (tmp_path / "merged" / png).read_bytes()[:4] == b"\x89PNG"
    # a merge that finds nothing names what is missing instead of training it
    proc = run_cli("study", spec, "--out", tmp_path / "empty", "--merge", tmp_path / "job-a", check=True)
    assert "not in the table (no results yet): shallow-wide" in proc.stdout


def test_curve_point_after_the_main_decay_is_refused(tmp_path, corpus):
    spec = curve_spec(tmp_path, corpus)
    text = open(spec).read().replace("tokens: [1024, 2048]", "tokens: [1024, 3072]")
    open(spec, "w").write(text)
    with pytest.raises(MobileLLMError, match="before the main run's decay"):
        run_study(spec, tmp_path / "bad")
