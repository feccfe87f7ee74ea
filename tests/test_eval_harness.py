"""The lm-evaluation-harness adapter (`--model mobilellm`); runs where the `[eval]` extra is installed."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from mobilellm.checkpoint import save_model_dir  # noqa: E402
from mobilellm.config import get_preset  # noqa: E402
from mobilellm.model import MobileLLM  # noqa: E402
from mobilellm.tokenizer import train_tokenizer  # noqa: E402

TEXT = "The quick brown fox jumps over the lazy dog. A man is sitting on a roof. He starts pulling up roofing. "


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    tok = train_tokenizer([TEXT * 3], vocab_size=350, min_frequency=1, chat_template=None)
    torch.manual_seed(0)
    model = MobileLLM(get_preset("mobilellm-tiny-ls", max_seq_len=32, init_std=0.5)).eval()
    save_model_dir(model, root / "model", tokenizer=tok)
    return root / "model"


def instance(kind, args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_adapter_requests_match_full_forwards(model_dir):
    from mobilellm.eval.harness import MobileLLMHarnessLM

    lm = MobileLLMHarnessLM(pretrained=str(model_dir), batch_size="auto")
    model, tok = lm.model, lm.tokenizer
    # loglikelihood, including lm-eval's empty-context rule (BOS as the context)
    got = lm.loglikelihood([instance("loglikelihood", ("A man is", " sitting on a roof")),
                            instance("loglikelihood", ("", "The lazy dog"))])
    ctx, whole = tok.encode("A man is", bos=True), tok.encode("A man is sitting on a roof", bos=True)
    cases = [(whole, len(whole) - len(ctx)), ([tok.bos_id] + tok.encode("The lazy dog"), len(tok.encode("The lazy dog")))]
    with torch.no_grad():
        for (ll, greedy), (ids, n) in zip(got, cases):
            logp = F.log_softmax(model(torch.tensor([ids[:-1]])).float(), -1)[0, -n:]
            target = torch.tensor(ids[-n:])
            assert ll == pytest.approx(logp.gather(1, target[:, None]).sum().item(), abs=1e-3)
            assert greedy == bool((logp.argmax(-1) == target).all())
    # rolling: every token of a text longer than the context is scored exactly once
    text = TEXT * 2
    (rolling,) = lm.loglikelihood_rolling([instance("loglikelihood_rolling", (text,))])
    ids = tok.encode(text, bos=True)
    assert len(ids) > 32
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    total = 0.0
    with torch.no_grad():  # lm-eval's windows, each scored with a plain forward
        for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(ids, tok.bos_id, 32, 1)):
            full = list(ctx) + list(cont)
            logp = F.log_softmax(model(torch.tensor([full[:-1]])).float(), -1)[0, -len(cont):]
            total += logp.gather(1, torch.tensor(cont)[:, None]).sum().item()
    assert rolling == pytest.approx(total, abs=5e-3)
    # generate_until: greedy, cut at the stop string
    (text_out,) = lm.generate_until([instance("generate_until", ("The quick", {"until": ["\n"], "max_gen_toks": 8}))])
    ids = tok.encode("The quick", bos=True)
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    expected = tok.decode(ids[len(tok.encode("The quick", bos=True)):]).split("\n")[0]
    assert text_out == expected


@pytest.mark.slow  # imports lm-eval in a subprocess: ~30 s of CPU
def test_lm_eval_command_line_runs_a_local_task(model_dir, tmp_path):
    data = tmp_path / "piqa.jsonl"
    rows = [{"goal": "Get off a roof", "sol1": "use a ladder", "sol2": "jump", "label": 0},
            {"goal": "Wake a dog", "sol1": "say its name", "sol2": "fly a roof", "label": 0}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_piqa.yaml").write_text(
        "task: tiny_piqa\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    validation: {data}\n"
        "output_type: multiple_choice\nvalidation_split: validation\n"
        'doc_to_text: "Question: {{goal}}\\nAnswer:"\ndoc_to_target: label\ndoc_to_choice: "{{[sol1, sol2]}}"\n'
        "metric_list:\n  - metric: acc\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mobilellm.eval.harness", "--model", "mobilellm", "--model_args",
         f"pretrained={model_dir}", "--tasks", "tiny_piqa", "--include_path", str(tmp_path / "tasks"),
         "--output_path", str(tmp_path / "out"), "--batch_size", "4"],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = list((tmp_path / "out").rglob("results*.json"))
    assert results, proc.stdout[-2000:]
    acc = json.loads(results[0].read_text())["results"]["tiny_piqa"]["acc,none"]
    assert acc in (0.0, 0.5, 1.0)
