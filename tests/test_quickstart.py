"""The README's main command, end to end and shortened: tokenizer, data, training, evaluation, sample."""

import json

import pytest

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


def test_word_share_tells_language_from_noise():
    from mobilellm.quickstart import word_share

    words = {"the", "function", "returns", "list", "string"}
    assert word_share("The function returns the list.", words) == 1.0
    assert word_share("Thx fqnction rtrns zhe lst.", words) == 0.0
    assert word_share("   \n\n  ", words) == 0.0  # blank samples score nothing


def test_time_limit_cut_is_said_loudly(tmp_path):
    proc = run_cli("quickstart", "--out", tmp_path / "qs", "--steps", "400", "--time-limit", "0.0001", "--quiet",
                   check=True)
    assert "WARNING: the time limit stopped training after" in proc.stdout
    assert "of 400 steps" in proc.stdout


@pytest.mark.slow  # the README's first command as is: about 4.5 minutes on two cores
def test_default_quickstart_says_something(tmp_path):
    from mobilellm.quickstart import SAMPLE_PROMPT, corpus_words, word_share

    proc = run_cli("quickstart", "--out", tmp_path / "qs", "--quiet", check=True, timeout=3600)
    assert "WARNING" not in proc.stdout
    sample = proc.stdout.split("[5/5] sample", 1)[1].split(SAMPLE_PROMPT, 1)[1].split("\n      ", 1)[0]
    assert len(sample.split()) >= 10, sample  # not blank lines
    assert word_share(sample, corpus_words()) >= 0.6, sample
