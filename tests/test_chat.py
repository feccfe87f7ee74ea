"""Chat templates (HF-compatible rendering, stored vs default template), history fitting, the chat REPL."""

import json

import pytest
import torch

from mobilellm.chat_template import DEFAULT_CHAT_TEMPLATE, ChatFormatter, apply_chat_template
from mobilellm.errors import MobileLLMError
from mobilellm.inference import SamplingParams, load_engine
from mobilellm.tokenizer import load_tokenizer
from test_generate import make_model_dir, one_thread, run_cli  # noqa: F401  (one_thread: autouse fixture)

MESSAGES = [
    {"role": "system", "content": "You are brief."},
    {"role": "user", "content": "Where is the cache?"},
    {"role": "assistant", "content": "In memory."},
    {"role": "user", "content": "And the keys?"},
]


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat") / "tiny"
    make_model_dir(root, init_std=0.1)  # larger weights: replies depend clearly on the prompt
    return root


def test_default_template_renders_turns_closed_by_eos():
    text = apply_chat_template(MESSAGES[:2], eos_token="</s>")
    assert text == "<|system|>\nYou are brief.</s><|user|>\nWhere is the cache?</s><|assistant|>\n"
    no_prompt = apply_chat_template(MESSAGES[:2], add_generation_prompt=False, eos_token="</s>")
    assert not no_prompt.endswith("<|assistant|>\n")


def test_rendering_matches_transformers(chat_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(chat_dir)
    tok = load_tokenizer(chat_dir)
    assert tok.chat_template  # the trained tokenizer stores one in tokenizer_config.json
    ours = apply_chat_template(MESSAGES, tok.chat_template, bos_token="<s>", eos_token="</s>")
    theirs = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert ours == theirs
    # and the ids we feed the model are the ids transformers would produce
    ids = ChatFormatter(tok, 256).encode(MESSAGES)
    assert ids == hf.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1


def test_stored_template_wins_over_default(chat_dir, tmp_path):
    custom = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
              "{% if add_generation_prompt %}[assistant] {% endif %}")
    d = tmp_path / "custom"
    d.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (d / name).write_bytes((chat_dir / name).read_bytes())
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = custom
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(d)
    fmt = ChatFormatter(tok, 256)
    assert fmt.template == custom and fmt.stops == []
    assert tok.decode(fmt.encode(MESSAGES[1:2])) == "[user] Where is the cache?\n[assistant] "
    # no stored template: the default one, with header stop strings
    del cfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    fmt = ChatFormatter(load_tokenizer(d), 256)
    assert fmt.template == DEFAULT_CHAT_TEMPLATE and "<|user|>" in fmt.stops


def test_templates_are_sandboxed_and_errors_are_clear():
    with pytest.raises(MobileLLMError, match="chat template"):
        apply_chat_template(MESSAGES, "{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(MobileLLMError, match="does not compile"):
        apply_chat_template(MESSAGES, "{% for m in messages %}")
    with pytest.raises(MobileLLMError, match="failed"):
        apply_chat_template(MESSAGES, "{{ raise_exception('no system role') }}")
    with pytest.raises(MobileLLMError, match="role"):
        apply_chat_template([{"role": "robot", "content": "hi"}])


def test_history_drops_oldest_turns_to_fit(chat_dir):
    tok = load_tokenizer(chat_dir)
    long_turns = [{"role": "system", "content": "sys"}]
    for i in range(12):
        long_turns += [{"role": "user", "content": f"question {i} " + "the cache keeps keys " * 3},
                       {"role": "assistant", "content": f"answer {i} " + "values for every layer " * 3}]
    long_turns.append({"role": "user", "content": "last question"})
    fmt = ChatFormatter(tok, 200)
    ids, kept = fmt.fit(long_turns, reserve=50)
    assert len(ids) + 50 <= 200 and len(ids) == len(fmt.encode(kept))
    assert kept[0]["role"] == "system" and kept[-1]["content"] == "last question"
    assert kept[1]["role"] == "user" and len(kept) < len(long_turns)
    assert kept == [kept[0]] + long_turns[len(long_turns) - len(kept) + 1:]  # a contiguous, most recent tail
    with pytest.raises(MobileLLMError, match="shorter message"):
        fmt.fit([{"role": "user", "content": "keys " * 300}], reserve=50)


def test_chat_cli_replies_resets_and_keeps_history(chat_dir):
    eng = load_engine(chat_dir)
    fmt = ChatFormatter(eng.tokenizer, eng.max_len)
    # sampled (seeded): greedy decoding of a random tiny model just repeats one token
    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=3, stop=list(fmt.stops))

    def reply(history):
        ids, _ = fmt.fit(history, min(params.max_new_tokens, eng.max_len // 2))
        return eng.generate([ids], params)[0].text

    first = reply([{"role": "user", "content": "hello"}])
    second = reply([{"role": "user", "content": "hello"}, {"role": "assistant", "content": first},
                    {"role": "user", "content": "and then"}])
    after_reset = reply([{"role": "user", "content": "and then"}])
    assert second != after_reset  # history changes the prompt, so the test can tell them apart
    proc = run_cli("chat", chat_dir, "--temperature", "1", "--seed", 3, "--max-new-tokens", 10,
                   input="hello\nand then\n/reset\nand then\n/exit\nnever read\n", check=True)
    assert proc.stdout == f"{first}\n{second}\n{after_reset}\n"
    assert "reset" in proc.stderr


def test_chat_cli_reports_a_message_too_long_and_goes_on(chat_dir):
    eng = load_engine(chat_dir)
    ids = ChatFormatter(eng.tokenizer, eng.max_len).encode([{"role": "user", "content": "hello"}])
    expected = eng.generate([ids], SamplingParams(max_new_tokens=4, temperature=1.0, seed=1))[0].text
    proc = run_cli("chat", chat_dir, "--temperature", "1", "--seed", 1, "--max-new-tokens", 4,
                   input="keys " * 400 + "\nhello\n", check=True)
    assert "error:" in proc.stderr and "shorter message" in proc.stderr
    assert proc.stdout == expected + "\n"  # the second message still got its reply, with no history


def test_a_template_that_loops_for_long_is_stopped_with_one_line():
    import time

    from mobilellm.chat_template import RENDER_SECONDS

    looping = "{% for i in range(10**6) %}{% for j in range(10**6) %}{% endfor %}{% endfor %}"
    started = time.perf_counter()
    with pytest.raises(MobileLLMError, match="chat template"):
        apply_chat_template(MESSAGES, looping)
    assert time.perf_counter() - started < RENDER_SECONDS + 30  # stopped, not run to the end (hours)
    with pytest.raises(MobileLLMError, match="chat template"):
        apply_chat_template(MESSAGES, "{{ 'x' * 10**9 }}")  # output size is bounded too
