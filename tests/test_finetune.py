"""Fine-tuning: assistant-only loss masks, packing without leaks, distillation, bad input, the command."""

import json

import numpy as np
import pytest
import torch

from conftest import run_cli
from mobilellm.checkpoint import save_model_dir
from mobilellm.config import get_preset
from mobilellm.errors import MobileLLMError
from mobilellm.finetune import data as sft
from mobilellm.finetune.distill import Distiller
from mobilellm.model import MobileLLM
from mobilellm.tokenizer import train_tokenizer
from mobilellm.train.trainer import CausalLMLoss

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
