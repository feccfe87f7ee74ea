"""The README's main command, end to end and shortened: tokenizer, data, training, evaluation, sample."""

import json

from conftest import run_cli
from mobilellm.checkpoint import load_model_dir
from mobilellm.inference import SamplingParams, load_engine


def test_quickstart_writes_every_artifact_and_a_model_that_generates(tmp_path):
    out = tmp_path / "qs"
    proc = run_cli("quickstart", "--out", out, "--steps", "3", "--quiet", check=True)
    for line in ("[1/5] tokenizer", "[3/5] train", "[4/5] eval", "[5/5] sample", "perplexity"):
        assert line in proc.stdout, line
    final = out / "run" / "final"
    model = load_model_dir(final)
    assert model.config.layer_sharing == "immediate" and model.config.n_logical_layers == 2 * model.config.n_layers
    assert (out / "data" / "manifest.json").exists() and (out / "tokenizer" / "tokenizer.json").exists()
    metrics = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m][-1] == 3
    engine = load_engine(final)
    text = engine.generate(["The list type"], SamplingParams(max_new_tokens=8, ignore_eos=True))[0]
    assert len(text.token_ids) == 8
    assert str(final) in proc.stdout  # it says where the model is
