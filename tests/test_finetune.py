"""Fine-tuning: assistant-only loss masks, packing without leaks, distillation (and its teacher cache), bad input,
the command."""

import json
import math

import numpy as np
import pytest
import torch

from conftest import run_cli
from mobilellm.checkpoint import save_model_dir
from mobilellm.config import get_preset
from mobilellm.errors import MobileLLMError
from mobilellm.finetune import data as sft
from mobilellm.train.distill import Distiller, TeacherCache
from mobilellm.model import MobileLLM
from mobilellm.tokenizer import train_tokenizer
from mobilellm.train import config as train_config
from mobilellm.train.trainer import CausalLMLoss, TrainData, train

CONVERSATIONS = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Set an alarm for 7 am"},
     {"role": "assistant", "content": "set_alarm(time=\"7:00\")\nDone, alarm at 7."}],
    [{"role": "user", "content": "What is the weather in Paris"},
     {"role": "assistant", "content": "get_weather(city=\"Paris\")\nChecking Paris."},
     {"role": "user", "content": "and tomorrow"}, {"role": "assistant", "content": "Tomorrow too."}],
    [{"role": "user", "content": "Call mom"}, {"role": "assistant", "content": "call_contact(name=\"mom\")"}],
]


@pytest.fixture(scope="module")
def tokenizer():
    texts = [m["content"] for c in CONVERSATIONS for m in c] * 20
    return train_tokenizer(texts, vocab_size=300)


def test_loss_mask_covers_exactly_the_assistant_tokens(tokenizer):
    eos = tokenizer.decode([tokenizer.eos_id], skip_special=False)
    for conv in CONVERSATIONS:
        ex = sft.tokenize_conversation(conv, tokenizer)
        masked = tokenizer.decode(ex.ids[ex.loss_mask].tolist(), skip_special=False)
        assistant = "".join(m["content"] + eos for m in conv if m["role"] == "assistant")
        assert masked == assistant
        unmasked = tokenizer.decode(ex.ids[~ex.loss_mask].tolist(), skip_special=False)
        for m in conv:
            if m["role"] != "assistant":
                assert m["content"] in unmasked


def _loss(model, rows):
    return CausalLMLoss(model, 64, torch.float32)(**{k: v for k, v in sft.collate(rows).items()})


def test_packed_and_unpacked_give_the_same_loss(tokenizer):
    model = MobileLLM(get_preset("mobilellm-tiny-ls", vocab_size=300)).eval()
    examples = [sft.tokenize_conversation(c, tokenizer) for c in CONVERSATIONS * 2]
    packed = sft.pack(examples, 128, tokenizer.pad_id, packing=True)
    unpacked = sft.pack(examples, 128, tokenizer.pad_id, packing=False)
    assert len(packed) < len(unpacked) == len(examples)
    with torch.no_grad():
        a, b = _loss(model, packed), _loss(model, unpacked)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # without the block-diagonal mask the packed examples would see each other: the loss changes
    batch = sft.collate(packed)
    batch["attn_mask"] = None
    batch["positions"] = None
    with torch.no_grad():
        leaky = CausalLMLoss(model, 64, torch.float32)(**batch)
    assert abs(leaky.item() - a.item()) > 1e-4


def test_distillation_from_an_identical_teacher_has_zero_kl(tokenizer):
    model = MobileLLM(get_preset("mobilellm-tiny", vocab_size=300))
    teacher = MobileLLM(get_preset("mobilellm-tiny", vocab_size=300))
    teacher.load_state_dict(model.state_dict())
    rows = sft.pack([sft.tokenize_conversation(c, tokenizer) for c in CONVERSATIONS], 64, 0, packing=True)
    batch = sft.collate(rows)
    distiller = Distiller(teacher, alpha=0.3, temperature=2.0, chunk_tokens=16)
    hidden = model.hidden_states(batch["inputs"], positions=batch["positions"], attn_mask=batch["attn_mask"])
    ce, kl = distiller.losses(hidden, model.output_weight, batch["inputs"], batch["targets"], batch["positions"],
                              batch["attn_mask"])
    assert abs(kl.item()) < 1e-6
    plain = CausalLMLoss(model, 64, torch.float32)(**batch)
    torch.testing.assert_close(ce, 0.7 * plain, atol=1e-5, rtol=1e-5)
    # a different teacher gives a positive KL, and gradients flow to the student
    other = Distiller(MobileLLM(get_preset("mobilellm-tiny", vocab_size=300)), alpha=0.3)
    ce2, kl2 = other.losses(hidden, model.output_weight, batch["inputs"], batch["targets"])
    assert kl2.item() > 1e-4
    (ce2 + kl2).backward()
    assert model.embed_tokens.weight.grad is not None


def test_validation_scores_the_students_own_cross_entropy_when_distilling(tokenizer):
    model = MobileLLM(get_preset("mobilellm-tiny", vocab_size=300))
    rows = sft.pack([sft.tokenize_conversation(c, tokenizer) for c in CONVERSATIONS], 64, 0, packing=True)
    batch = sft.collate(rows)
    loss = CausalLMLoss(model, 64, torch.float32)
    with torch.no_grad():
        plain = loss(**batch)
        loss.distiller = Distiller(MobileLLM(get_preset("mobilellm-tiny", vocab_size=300)), alpha=0.5)
        mixed = loss(**batch)  # training mode: the distillation mix
        loss.eval()
        scored = loss(**batch)
    assert abs(mixed.item() - plain.item()) > 1e-3
    torch.testing.assert_close(scored, plain)


@pytest.fixture(scope="module")
def distill_setup(tmp_path_factory, tokenizer):
    """A student and a different teacher (tiny model directories), and 9 packed rows of 64 tokens."""
    root = tmp_path_factory.mktemp("distill")
    for name in ("student", "teacher"):
        save_model_dir(MobileLLM(get_preset("mobilellm-tiny", vocab_size=300, max_seq_len=64)), root / name,
                       tokenizer=tokenizer)
    rows = sft.pack([sft.tokenize_conversation(c, tokenizer) for c in CONVERSATIONS * 3], 64, 0, packing=True)
    return root, rows


def _finetune(root, rows, out, **distill) -> list[float]:
    """Two epochs of distillation through the trainer; the per-step losses."""
    items = {"model.preset": "none", "model.init_from": root / "student", "data.train": "[unused]",
             "data.seq_len": 64, "batch.micro_batch": 2, "run.epochs": 2, "optim.lr": 1e-3,
             "schedule.kind": "linear", "schedule.warmup_steps": 0, "run.device": "cpu", "run.out_dir": out,
             "run.tensorboard": False, "run.eval_batches": 0, "run.log_every": 100,
             "distill.teacher": root / "teacher", **{f"distill.{k}": v for k, v in distill.items()}}
    cfg = train_config.load(None, [f"{k}={v}" for k, v in items.items()])

    def data_fn(c, m, env):
        stream = sft.SFTStream(rows, 2, seed=1)
        return TrainData(stream=stream, val_batches=None, tokenizer=None, steps_per_epoch=math.ceil(len(rows) / 2))

    return [loss for _, loss in train(cfg, progress=False, data_fn=data_fn).losses]


def _count_teacher_rows(monkeypatch) -> list[int]:
    """Rows each teacher forward sees, for every Distiller built from a directory from now on."""
    calls, build = [], Distiller.from_dir.__func__

    def from_dir(cls, *args, **kwargs):
        distiller = build(cls, *args, **kwargs)
        forward = distiller.teacher.hidden_states
        distiller.teacher.hidden_states = lambda x, **kw: (calls.append(x.shape[0]), forward(x, **kw))[1]
        return distiller

    monkeypatch.setattr(Distiller, "from_dir", classmethod(from_dir))
    return calls


def test_cached_teacher_gives_the_uncached_losses(distill_setup, tmp_path, monkeypatch):
    root, rows = distill_setup
    reference = _finetune(root, rows, tmp_path / "live")
    teacher_rows = _count_teacher_rows(monkeypatch)
    cached = _finetune(root, rows, tmp_path / "cached", cache_dir=tmp_path / "cache")
    # float16 teacher logits are off by <= 2^-11 relative; here that moves the losses by ~1e-7
    np.testing.assert_allclose(cached, reference, rtol=1e-4, atol=1e-5)
    assert len(reference) == 10 and reference[-1] < reference[0]
    # 20 row slots over 2+ epochs, but the teacher saw each of the 9 rows once
    assert sum(teacher_rows) == len(rows)
    assert len(list((tmp_path / "cache").glob("row-*.npy"))) == len(rows)
    # a resumed or repeated run reuses the cache: no teacher forward at all
    teacher_rows.clear()
    again = _finetune(root, rows, tmp_path / "again", cache_dir=tmp_path / "cache")
    assert teacher_rows == [] and again == cached


def test_second_pass_over_cached_rows_skips_the_teacher(distill_setup, tmp_path):
    root, rows = distill_setup
    student = MobileLLM(get_preset("mobilellm-tiny", vocab_size=300))
    teacher = MobileLLM(get_preset("mobilellm-tiny", vocab_size=300))
    calls = []
    forward = teacher.hidden_states
    teacher.hidden_states = lambda x, **kw: (calls.append(x.shape[0]), forward(x, **kw))[1]
    cache = TeacherCache.open(tmp_path / "cache", root / "teacher", rows, 300)
    distiller = Distiller(teacher, chunk_tokens=16, cache=cache)
    stream = sft.SFTStream(rows, 3, seed=0)  # 9 rows: one epoch = 3 batches

    def epoch():
        out = []
        for _ in range(3):
            b = next(stream)
            with torch.no_grad():
                h = student.hidden_states(b["inputs"], positions=b["positions"], attn_mask=b["attn_mask"])
                out.append(distiller.losses(h, student.output_weight, b["inputs"], b["targets"], b["positions"],
                                            b["attn_mask"], b["row_ids"]))
        return out

    epoch()
    assert sum(calls) == len(rows)
    calls.clear()
    second = epoch()  # another order, so other batches
    assert calls == []  # every row came from disk
    assert all(kl.item() > 0 for _, kl in second)
    # a new run over the same folder (a resume) reads it too
    reopened = Distiller(teacher, chunk_tokens=16, cache=TeacherCache.open(tmp_path / "cache", root / "teacher", rows,
                                                                           300))
    b = next(stream)
    with torch.no_grad():
        h = student.hidden_states(b["inputs"], positions=b["positions"], attn_mask=b["attn_mask"])
        reopened.losses(h, student.output_weight, b["inputs"], b["targets"], b["positions"], b["attn_mask"],
                        b["row_ids"])
    assert calls == []
    # validation-style batches (no row_ids) still run the teacher on the fly
    b = sft.collate(rows[:2])
    h = student.hidden_states(b["inputs"], positions=b["positions"], attn_mask=b["attn_mask"])
    distiller.losses(h, student.output_weight, b["inputs"], b["targets"], b["positions"], b["attn_mask"])
    assert calls == [2]


def test_a_cache_for_other_data_or_another_teacher_is_refused(distill_setup, tmp_path, tokenizer):
    root, rows = distill_setup
    cache = tmp_path / "cache"
    TeacherCache.open(cache, root / "teacher", rows, 300)
    TeacherCache.open(cache, root / "teacher", rows, 300)  # the same teacher and rows: reused
    other_rows = [dict(r, inputs=r["inputs"][::-1].copy()) for r in rows]
    with pytest.raises(MobileLLMError, match=r"another data: delete the folder or use another one"):
        TeacherCache.open(cache, root / "teacher", other_rows, 300)
    with pytest.raises(MobileLLMError, match=r"row count: delete the folder"):
        TeacherCache.open(cache, root / "teacher", rows[:-1], 300)
    with pytest.raises(MobileLLMError, match=r"another teacher \(weights\)"):
        TeacherCache.open(cache, root / "student", rows, 300)
    with pytest.raises(MobileLLMError, match=r"another top_k"):
        TeacherCache.open(cache, root / "teacher", rows, 300, top_k=8)
    # the command refuses it before training, in one line
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS))
    proc = run_cli("finetune", root / "student", "--data", data, "--out", tmp_path / "ft", "--teacher",
                   root / "student", "--distill-cache", cache, "--seq-len", "64", "--no-progress")
    assert proc.returncode != 0 and "delete the folder" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    # pretraining sees each row once: a cache is refused before training starts
    cfg = train_config.load(None, ["model.preset=mobilellm-tiny", f"data.train=[{tmp_path / 'prepared'}]",
                                   "data.seq_len=64", "run.max_steps=1", "run.device=cpu",
                                   f"run.out_dir={tmp_path / 'pt'}", f"distill.teacher={root / 'teacher'}",
                                   f"distill.cache_dir={tmp_path / 'c2'}"])
    with pytest.raises(MobileLLMError, match="distill.cache_dir is for fine-tuning"):
        train(cfg, progress=False)
    assert not (tmp_path / "pt").exists() and not (tmp_path / "c2").exists()


def test_top_k_cache_keeps_an_identical_teacher_at_zero_kl(distill_setup, tmp_path):
    root, rows = distill_setup
    model = MobileLLM(get_preset("mobilellm-tiny", vocab_size=300))
    teacher = MobileLLM(get_preset("mobilellm-tiny", vocab_size=300))
    teacher.load_state_dict(model.state_dict())
    cache = TeacherCache.open(tmp_path / "cache", root / "teacher", rows, 300, top_k=8)
    distiller = Distiller(teacher, alpha=0.3, temperature=2.0, chunk_tokens=16, cache=cache)
    batch = sft.collate(rows[:4], row_ids=[0, 1, 2, 3])
    args = (batch["inputs"], batch["targets"], batch["positions"], batch["attn_mask"], batch["row_ids"])
    hidden = model.hidden_states(batch["inputs"], positions=batch["positions"], attn_mask=batch["attn_mask"])
    plain = CausalLMLoss(model, 64, torch.float32)(**{k: v for k, v in batch.items() if k != "row_ids"})
    for _ in range(2):  # fills the cache, then reads it
        ce, kl = distiller.losses(hidden, model.output_weight, *args)
        assert abs(kl.item()) < 1e-5  # float16 rounding of the 8 kept logits only
        torch.testing.assert_close(ce, 0.7 * plain, atol=1e-5, rtol=1e-5)
    values, ids = cache.get(0)
    assert values.shape == ids.shape == (64, 8) and values.dtype == np.float16 and ids.dtype == np.int32
    # a different student gets a positive KL over the teacher's top 8, and gradients
    other = MobileLLM(get_preset("mobilellm-tiny", vocab_size=300))
    h2 = other.hidden_states(batch["inputs"], positions=batch["positions"], attn_mask=batch["attn_mask"])
    ce2, kl2 = distiller.losses(h2, other.output_weight, *args)
    assert kl2.item() > 1e-4
    (ce2 + kl2).backward()
    assert other.embed_tokens.weight.grad is not None


def test_malformed_conversations_are_counted(tmp_path):
    lines = [
        {"messages": CONVERSATIONS[0]},
        {"prompt": "hi", "completion": "hello"},
        {"messages": [{"role": "assistant", "content": "first"}]},  # wrong order
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]},  # empty
        {"messages": [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}]},  # unknown role
        {"messages": [{"content": "x"}]},  # missing role
        {"text": "nope"},
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    conversations, skipped = sft.read_examples(path)
    assert len(conversations) == 2
    assert skipped["empty content"] == 1 and skipped["not JSON"] == 1 and skipped["unknown role 'robot'"] == 1
    assert sum(skipped.values()) == 6
    (tmp_path / "bad.jsonl").write_text(json.dumps({"messages": []}) + "\n")
    with pytest.raises(MobileLLMError, match="no usable examples"):
        sft.read_examples(tmp_path / "bad.jsonl")


def test_long_examples_are_truncated_or_dropped(tokenizer):
    examples = [sft.tokenize_conversation(c, tokenizer) for c in CONVERSATIONS]
    longest = max(len(e.ids) for e in examples)
    kept, counts = sft.fit_to_context(examples, longest - 3, "drop")
    assert len(kept) == 2 and counts["dropped (longer than the context)"] == 1
    kept, counts = sft.fit_to_context(examples, longest - 3, "truncate")
    assert len(kept) == 3 and counts["truncated to the context"] == 1
    assert max(len(e.ids) for e in kept) == longest - 2


def test_finetune_command_end_to_end(tmp_path, tokenizer):
    model = MobileLLM(get_preset("mobilellm-tiny-ls", vocab_size=300, max_seq_len=128))
    save_model_dir(model, tmp_path / "base", tokenizer=tokenizer)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS * 8))
    out = tmp_path / "ft"
    proc = run_cli("finetune", tmp_path / "base", "--data", data, "--val-data", data, "--out", out, "--epochs", "2",
                   "--seq-len", "64", "--micro-batch", "2", "--lr", "1e-3", "--no-progress", check=True)
    assert "fine-tuned" in proc.stdout and "examples in" in proc.stdout
    cfg = json.loads((out / "final" / "tokenizer_config.json").read_text())
    assert cfg.get("chat_template")  # chat/serve use the format the model was tuned on
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in records)
    # a teacher with another vocabulary is refused before training
    save_model_dir(MobileLLM(get_preset("mobilellm-tiny", vocab_size=512)), tmp_path / "teacher")
    bad = run_cli("finetune", tmp_path / "base", "--data", data, "--out", tmp_path / "ft2", "--teacher",
                  tmp_path / "teacher", "--no-progress")
    assert bad.returncode != 0 and "same tokenizer" in bad.stderr


def test_sft_stream_resumes_exactly():
    rows = [{"inputs": np.full(4, i), "targets": np.full(4, i), "positions": np.arange(4), "docs": np.zeros(4, int)}
            for i in range(7)]
    full = sft.SFTStream(rows, 2, seed=3)
    seen = [next(full)["inputs"][:, 0].tolist() for _ in range(6)]
    first = sft.SFTStream(rows, 2, seed=3)
    for _ in range(2):
        next(first)
    resumed = sft.SFTStream(rows, 2, seed=3)
    resumed.load_state_dict(first.state_dict())
    assert [next(resumed)["inputs"][:, 0].tolist() for _ in range(4)] == seen[2:]
    flat = sum(seen[:3], []) + seen[3][:1]
    assert sorted(flat) == list(range(7))  # one epoch = every row once


def test_api_calling_data_is_deterministic_and_disjoint():
    from mobilellm.eval import api_calling as api

    train, test = api.make_splits(300, 50, seed=7)
    assert (train, test) == api.make_splits(300, 50, seed=7)
    assert api.make_splits(300, 50, seed=8)[0] != train
    seen = {c["messages"][-2]["content"] for c in train}
    assert all(c["messages"][-2]["content"] not in seen for c in test)
    assert any(len(c["messages"]) == 5 for c in train)  # multi-turn conversations exist
    for c in train[:50]:
        assert sft.conversation_problem(c["messages"]) is None
        name, args, reply = api.parse_response(c["messages"][-1]["content"])
        assert (name, args, reply) == (c["api"]["name"], c["api"]["args"], c["reply"])


def test_api_calling_metrics_on_hand_made_predictions():
    pytest.importorskip("rouge_score")
    from mobilellm.eval import api_calling as api

    refs = [
        {"api": {"name": "set_alarm", "args": {"time": "7:00", "label": "gym"}}, "reply": "Your gym alarm is set for 7:00."},
        {"api": {"name": "call_contact", "args": {"name": "Anna"}}, "reply": "Calling Anna."},
        {"api": {"name": "get_weather", "args": {"city": "Oslo", "date": "today"}}, "reply": "Checking Oslo today."},
        {"api": {"name": "play_music", "args": {"artist": "Queen"}}, "reply": "Playing Queen."},
    ]
    preds = [
        'set_alarm(time="7:00", label="gym")\nYour gym alarm is set for 7:00.',  # all right
        'call_contact(name="Ben")\nCalling Anna.',  # right intent, wrong argument
        "It is sunny in Oslo.",  # no call at all
        'play_music(artist="Queen")\nNow playing some jazz.',  # right call, different reply
    ]
    m = api.score(preds, refs)
    assert m["em_intent"] == 75.0 and m["em_structure"] == 50.0 and m["n"] == 4
    # ROUGE F1 per reply: 1, 1, rouge1("checking oslo today", "it is sunny in oslo") = 2*(1/3*1/5)/(1/3+1/5)=0.25,
    # rouge1("playing queen", "now playing some jazz") = 2*(1/2*1/4)/(1/2+1/4) = 1/3
    assert m["rouge1"] == pytest.approx(100 * (1 + 1 + 0.25 + 1 / 3) / 4)
    with pytest.raises(MobileLLMError):
        api.score(preds[:2], refs)


def test_api_data_command(tmp_path):
    proc = run_cli("api-data", "--out", tmp_path, "--train", "40", "--test", "10", "--seed", "1", check=True)
    assert "40 training" in proc.stdout
    rows = [json.loads(x) for x in (tmp_path / "test.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and all("api" in r for r in rows)


def test_api_calling_evaluation_runs_the_model(tmp_path, tokenizer):
    pytest.importorskip("rouge_score")
    from mobilellm.eval import api_calling as api

    api.write_splits(tmp_path, 10, 6, seed=0)
    model = MobileLLM(get_preset("mobilellm-tiny", vocab_size=300)).eval()
    result = api.evaluate(model, tokenizer, tmp_path / "test.jsonl", limit=4, max_new_tokens=8)
    assert result["n"] == 4 and 0 <= result["em_intent"] <= 100 and len(result["examples"]) == 4


def test_eval_command_runs_api_calling(tmp_path, tokenizer):
    pytest.importorskip("rouge_score")
    save_model_dir(MobileLLM(get_preset("mobilellm-tiny", vocab_size=300)), tmp_path / "m", tokenizer=tokenizer)
    run_cli("api-data", "--out", tmp_path / "eval" / "api_calling", "--train", "5", "--test", "4", check=True)
    proc = run_cli("eval", tmp_path / "m", "--tasks", "api_calling", "--data-dir", tmp_path / "eval", "--no-progress",
                   check=True)
    assert "em_intent" in proc.stdout and "rougeL" in proc.stdout
    results = json.loads((tmp_path / "m" / "eval" / "results.json").read_text())
    assert results["results"]["api_calling"]["n"] == 4
