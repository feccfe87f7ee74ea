"""`mobilellm eval` end to end on a tiny model directory and a small eval data folder built here."""

import json
import math

import pytest
import torch

from conftest import run_cli
from mobilellm.checkpoint import load_model_dir, save_model_dir
from mobilellm.config import get_preset
from mobilellm.errors import MobileLLMError
from mobilellm.eval import evaluate
from mobilellm.model import MobileLLM
from mobilellm.tokenizer import load_tokenizer, train_tokenizer

TEXT = ("The quick brown fox jumps over the lazy dog. A man is sitting on a roof. He starts pulling up roofing. "
        "Question: Which gas do plants absorb? Answer: carbon dioxide. The sun is responsible for plants sprouting. ")

DOCS = {
    "arc_easy/test.jsonl": [{"id": "a1", "question": "Which gas do plants absorb?", "answerKey": "B",
                             "choices": {"text": ["oxygen", "carbon dioxide", "helium"], "label": ["A", "B", "C"]}},
                            {"id": "a2", "question": "What jumps over the dog?", "answerKey": "1",
                             "choices": {"text": ["the fox", "the roof"], "label": ["1", "2"]}}],
    "arc_challenge/test.jsonl": [{"id": "c1", "question": "The sun is responsible for", "answerKey": "A",
                                  "choices": {"text": ["plants sprouting", "dogs"], "label": ["A", "B"]}}],
    "boolq/dev.jsonl": [{"question": "is the fox quick", "title": "Fox", "answer": True, "passage": "The quick fox."},
                        {"question": "is the dog quick", "title": "Dog", "answer": False, "passage": "The lazy dog."}],
    "piqa/validation.jsonl": [{"goal": "Get off a roof", "sol1": "use a ladder", "sol2": "jump", "label": 0}],
    "siqa/socialIQa_v1.4_dev.jsonl": [{"context": "A man sat on a roof.", "question": "What next?",
                                       "answerA": "pull up roofing", "answerB": "sleep", "answerC": "fly",
                                       "correct": "A"}],
    "hellaswag/validation.jsonl": [{"ind": 0, "query": "Roofing: A man is sitting on a roof. he",
                                    "activity_label": "Roofing", "ctx": "A man is sitting on a roof. he",
                                    "endings": ["starts pulling up roofing.", "is a dog.", "jumps.", "sleeps."],
                                    "label": 0}],
    "openbookqa/test.jsonl": [{"id": "o1", "answerKey": "A", "question": {
        "stem": "Plants absorb", "choices": [{"text": "carbon dioxide", "label": "A"}, {"text": "dogs", "label": "B"}]}}],
    "winogrande/validation.jsonl": [{"sentence": "The fox jumped over the dog because _ was quick.",
                                     "option1": "the fox", "option2": "the dog", "answer": "1"}],
    "lambada_openai/lambada_openai_llmfoundry.jsonl": [{"context": "The quick brown fox jumps over the lazy",
                                                        "continuation": "dog"}],
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tok = train_tokenizer([TEXT * 3], vocab_size=400, min_frequency=1, chat_template=None)
    torch.manual_seed(0)
    model = MobileLLM(get_preset("mobilellm-tiny-ls", max_seq_len=64, init_std=0.5)).eval()
    save_model_dir(model, root / "model", tokenizer=tok)
    save_model_dir(model, root / "no-tok")
    data = root / "data"
    for rel, rows in DOCS.items():
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (data / "wikitext2" / "raw").mkdir(parents=True)
    (data / "wikitext2" / "raw" / "wiki.test.raw").write_text((TEXT + "\n") * 6, encoding="utf-8")
    return root


def test_cli_eval_writes_table_and_json(setup):
    out = setup / "results.json"
    proc = run_cli("eval", setup / "model", "--tasks", "paper,lambada,wikitext2", "--data-dir", setup / "data",
                   "--output", out, "--batch-size", "3", "--no-progress", check=True)
    header = "| ARC-e | ARC-c | BoolQ | PIQA | SIQA | HellaSwag | OBQA | WinoGrande | avg |"
    assert header in proc.stdout
    data = json.loads(out.read_text())
    res, settings = data["results"], data["settings"]
    assert res["arc_easy"]["n"] == 2 and res["boolq"]["n"] == 2 and res["piqa"]["n"] == 1
    assert set(res["arc_easy"]) >= {"acc", "acc_norm", "acc_stderr", "acc_norm_stderr"}
    assert "acc_norm" not in res["boolq"] and "ppl" in res["lambada"] and res["wikitext2"]["ppl"] > 1
    tok = load_tokenizer(setup / "model")
    assert settings["tokenizer_fingerprint"] == tok.fingerprint()
    assert settings["prompt_version"] and settings["dtype"] == "float32" and settings["batch_size"] == 3
    assert settings["limit"] is None and settings["mobilellm_version"]
    assert (setup / "results.md").read_text().startswith(header)
    # the CLI reports what the in-process evaluator computes on the same directory
    inproc = evaluate(load_model_dir(setup / "model"), tok, "paper,lambada,wikitext2", data_dir=setup / "data")
    for task, metrics in inproc["results"].items():
        for key in ("acc", "acc_norm", "ppl"):
            if key in metrics:
                assert res[task][key] == pytest.approx(metrics[key], rel=1e-5)
    # the average in the table is the mean of the eight headline numbers (acc_norm where present)
    heads = [res[t].get("acc_norm", res[t]["acc"]) for t in ("arc_easy", "arc_challenge", "boolq", "piqa", "siqa",
                                                              "hellaswag", "openbookqa", "winogrande")]
    assert f"{100 * sum(heads) / 8:.1f} |" in proc.stdout.splitlines()[2]


def test_val_task_on_prepared_data(setup, tmp_path):
    from mobilellm.data.prepare import prepare

    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"Document {i}. " + TEXT * 2}) + "\n" for i in range(16)), encoding="utf-8")
    manifest = tmp_path / "prepared"
    prepare([str(corpus)], setup / "model", manifest, val_fraction=0.5, workers=0, progress=False, log=lambda s: None)
    model, tok = load_model_dir(setup / "model"), load_tokenizer(setup / "model")
    res = evaluate(model, tok, ["val"], manifest=manifest, seq_len=32, batch_size=8)["results"]["val"]
    # reference: mean next-token cross-entropy over every sample of the split
    from mobilellm.data.loader import PackedTokens

    data = PackedTokens(manifest, "val", 32)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(data)):
            s = torch.as_tensor(data[i], dtype=torch.long)[None]
            logits = model(s[:, :-1])
            total += torch.nn.functional.cross_entropy(logits[0].float(), s[0, 1:], reduction="sum").item()
            count += 32
    assert res["tokens"] == count and res["loss"] == pytest.approx(total / count, rel=1e-5)
    assert res["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    other = train_tokenizer([TEXT + " different words here"], vocab_size=300, min_frequency=1, chat_template=None)
    with pytest.raises(MobileLLMError, match="tokenizer mismatch"):
        evaluate(model, other, ["val"], manifest=manifest, seq_len=32)
    with pytest.raises(MobileLLMError, match="--manifest"):
        evaluate(model, tok, ["val"])


@pytest.mark.parametrize("args, message", [
    (["--tasks", "paper"], "--data-dir"),
    (["--tasks", "piqa", "--data-dir", "BAD"], "record 1 is not in the piqa format"),
])  # unknown names and missing files: test_eval_tasks.py, in-process
def test_bad_input_one_line_error_and_earlier_results_survive(setup, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad" / "piqa").mkdir(parents=True)
    (tmp_path / "bad" / "piqa" / "validation.jsonl").write_text('{"goal": "x"}\n')
    paths = {"DATA": str(setup / "data"), "EMPTY": str(tmp_path / "empty"), "BAD": str(tmp_path / "bad")}
    out = tmp_path / "results.json"
    out.write_text('{"earlier": true}')
    proc = run_cli("eval", setup / "model", *[paths.get(a, a) for a in args], "--output", out)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert json.loads(out.read_text()) == {"earlier": True}


def test_model_dir_without_tokenizer_is_refused(setup):
    proc = run_cli("eval", setup / "no-tok", "--tasks", "piqa", "--data-dir", setup / "data")
    assert proc.returncode != 0 and "has no tokenizer" in proc.stderr and "--tokenizer" in proc.stderr
    # an explicit --tokenizer makes it work; default output <model dir>/eval/results.json; --limit
    run_cli("eval", setup / "no-tok", "--tasks", "arc_easy,boolq", "--data-dir", setup / "data", "--tokenizer",
            setup / "model", "--limit", "1", "--no-progress", check=True)
    data = json.loads((setup / "no-tok" / "eval" / "results.json").read_text())
    assert data["results"]["arc_easy"]["n"] == 1 and data["results"]["boolq"]["n"] == 1
    assert data["settings"]["limit"] == 1
