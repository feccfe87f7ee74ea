"""Tokenizers: training, loading (tokenizer.json and SentencePiece), save/load, parity with transformers."""

import json
import pickle

import pytest
from conftest import run_cli, shared_data

from mobilellm.cli import main
from mobilellm.data.builtin import builtin_documents
from mobilellm.errors import MobileLLMError
from mobilellm.tokenizer import load_tokenizer, train_tokenizer

SAMPLES = [
    "Hello world!",
    " leading space",
    "two  spaces and   three",
    "tabs\tand\nnewlines\n\n\nend",
    "naïve café — 日本語 🤖 ∑",
    "trailing spaces   ",
    "x",
    "",
    "def f(x):\n    return x ** 2  # comment",
    "numbers 1234567 3.14159 and CAPS",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tok = train_tokenizer(builtin_documents("pydoc")[:12], vocab_size=600)
    out = tmp_path_factory.mktemp("tok")
    tok.save(out)
    return tok, out


def test_trained_special_tokens_and_layout(trained):
    tok, _ = trained
    assert tok.kind == "bpe" and tok.vocab_size == 600
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)  # the ids ModelConfig assumes
    assert [tok.token_to_id(t) for t in ("<|system|>", "<|user|>", "<|assistant|>")] == [3, 4, 5]
    assert tok.add_bos and tok.chat_template and tok.unk_id is None
    # GPT-2's byte-level pre-tokenizer, untouched: what llama.cpp's "gpt2" pre-tokenizer reproduces.
    data = json.loads(tok._tk.to_str())
    assert data["normalizer"] is None
    assert data["pre_tokenizer"]["type"] == "ByteLevel"
    assert data["pre_tokenizer"]["use_regex"] is True and data["pre_tokenizer"]["add_prefix_space"] is False
    assert data["decoder"]["type"] == "ByteLevel"


def test_round_trip_and_flags(trained):
    tok, _ = trained
    for text in SAMPLES:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
        assert tok.encode(text, bos=True, eos=True) == [1, *ids, 2]
        assert tok.decode([1, *ids, 2]) == text
        assert tok.decode([1, *ids, 2], skip_special=False) == "<s>" + text + "</s>"
    assert tok.encode_batch(SAMPLES, eos=True) == [tok.encode(t) + [2] for t in SAMPLES]


def test_special_tokens_in_text(trained):
    tok, _ = trained
    text = "<|user|>\nhi</s>"
    assert tok.encode(text)[0] == tok.token_to_id("<|user|>") and tok.encode(text)[-1] == tok.eos_id
    literal = tok.encode(text, parse_special=False)  # data preparation: spelled out as text
    assert tok.eos_id not in literal and tok.token_to_id("<|user|>") not in literal
    assert tok.decode(literal) == text


def test_save_load_pickle_keep_identity(trained):
    tok, out = trained
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    for source in (out, out / "tokenizer.json"):
        again = load_tokenizer(source)
        assert again.fingerprint() == tok.fingerprint()
        assert (again.vocab_size, again.bos_id, again.eos_id, again.pad_id, again.add_bos) == (600, 1, 2, 0, True)
        assert again.chat_template == tok.chat_template
        assert [again.encode(t) for t in SAMPLES] == [tok.encode(t) for t in SAMPLES]
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.fingerprint() == tok.fingerprint() and clone.encode(SAMPLES[4]) == tok.encode(SAMPLES[4])
    other = train_tokenizer(builtin_documents("pydoc")[:12], vocab_size=590)
    assert other.fingerprint() != tok.fingerprint()


def test_transformers_matches_trained_tokenizer(trained):
    transformers = pytest.importorskip("transformers")
    tok, out = trained
    for hf in (transformers.AutoTokenizer.from_pretrained(out),
               transformers.PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))):
        for text in SAMPLES + ["<|user|>\nhi</s>"]:
            assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
            ids = tok.encode(text)
            assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids)
            assert hf.decode(ids, skip_special_tokens=False) == tok.decode(ids, skip_special=False)
    hf = transformers.AutoTokenizer.from_pretrained(out)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 0)
    assert hf.encode("Hello world!") == tok.encode("Hello world!", bos=True)  # add_bos honoured
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rendered = hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered == "<s><|system|>\nBe brief.</s><|user|>\nHi</s><|assistant|>\n"
    assert tok.encode(rendered) == hf.encode(rendered, add_special_tokens=False)


def test_train_errors():
    with pytest.raises(MobileLLMError, match="too small"):
        train_tokenizer(["some text"], vocab_size=100)
    with pytest.raises(MobileLLMError, match="no training text"):
        train_tokenizer([], vocab_size=300)
    with pytest.raises(MobileLLMError, match="distinct"):
        train_tokenizer(["x"], vocab_size=300, roles=("user", "user"))


def test_load_errors(tmp_path):
    with pytest.raises(MobileLLMError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(MobileLLMError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(MobileLLMError, match="cannot load tokenizer"):
        load_tokenizer(bad)
    other = tmp_path / "vocab.txt"
    other.write_text("a\nb\n")
    with pytest.raises(MobileLLMError, match="unsupported tokenizer file"):
        load_tokenizer(other)


# ---- SentencePiece: the LLaMA-2 tokenizer ---------------------------------------------------
@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    model = shared_data("tokenizers", "llama2", "tokenizer.model")
    tok = load_tokenizer(model)
    out = tmp_path_factory.mktemp("llama")
    tok.save(out)
    return tok, out, model


def test_llama_sentencepiece(llama):
    tok, out, model = llama
    assert tok.kind == "sentencepiece"
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id, tok.add_bos) == (32000, 1, 2, None, 0, True)
    assert tok.encode("Hello world!") == [15043, 3186, 29991]  # the ids in shared/data/README.md
    assert tok.encode("Hello world!", bos=True, eos=True) == [1, 15043, 3186, 29991, 2]
    for text in SAMPLES:
        assert tok.decode(tok.encode(text, bos=True)) == text
    assert tok.decode([1, 15043, 2], skip_special=False) == "<s>Hello</s>"
    assert tok.token_to_id("<s>") == 1 and tok.token_to_id("not-a-piece") is None
    assert (out / "tokenizer.model").read_bytes() == model.read_bytes()
    assert load_tokenizer(out).fingerprint() == tok.fingerprint() == load_tokenizer(model.parent).fingerprint()
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_llama_ids_equal_transformers(llama):
    """sentencepiece ids == transformers 5.x AutoTokenizer ids on the saved directory.

    Includes leading and repeated spaces, where transformers' LlamaTokenizer class (not used by our
    saved config) differs. Special-token strings in the text ("</s>" of a rendered chat template)
    become their ids, as in transformers; with parse_special=False they stay text.
    """
    transformers = pytest.importorskip("transformers")
    tok, out, _ = llama
    hf = transformers.AutoTokenizer.from_pretrained(out)
    assert (hf.bos_token_id, hf.eos_token_id) == (1, 2)
    text = "\n\n".join(builtin_documents("pydoc")[:3])[:20000]
    for sample in SAMPLES + [text]:
        assert hf.encode(sample, add_special_tokens=False) == tok.encode(sample), sample[:40]
        assert hf.encode(sample) == tok.encode(sample, bos=True)
    assert hf.decode(tok.encode(text), skip_special_tokens=True) == tok.decode(tok.encode(text)) == text
    for sample in ["a</s>b", "x</s> y<s>z", "<|user|>\nhi</s><|assistant|>\nok</s>", "</s></s>", "<unk> text"]:
        assert tok.encode(sample) == hf.encode(sample, add_special_tokens=False), sample
    assert 2 in tok.encode("hi</s>") and 2 not in tok.encode("hi</s>", parse_special=False)
    assert tok.encode_batch(["a</s>", "plain"]) == [tok.encode("a</s>"), tok.encode("plain")]


def test_smollm2_tokenizer_json():
    """Any tokenizer.json: SmolLM2's (no config beside it) loads, guesses EOS, matches transformers."""
    transformers = pytest.importorskip("transformers")
    path = shared_data("tokenizers", "smollm2", "tokenizer.json")
    tok = load_tokenizer(path)
    assert tok.vocab_size == 49152 and tok.eos_id == 0 and tok.bos_id is None and not tok.add_bos
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    for text in SAMPLES:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
        assert tok.decode(tok.encode(text)) == text


# ---- CLI ------------------------------------------------------------------------------------
def test_cli_train_and_encode(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(builtin_documents("pydoc")[:5]), encoding="utf-8")
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "400", "--output", str(out),
                 "--quiet"]) == 0
    assert "vocab 400" in capsys.readouterr().out
    tok = load_tokenizer(out)
    assert main(["tokenizer", "encode", "--tokenizer", str(out), "--bos", "Hello world"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == " ".join(map(str, tok.encode("Hello world", bos=True)))


def test_cli_errors_are_one_line(tmp_path, capsys):
    proc = run_cli("tokenizer", "train", "--input", tmp_path / "missing.txt", "--vocab-size", 400,
                   "--output", tmp_path / "tok")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: input not found")
    assert main(["tokenizer", "encode", "--tokenizer", str(tmp_path), "hi"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: no tokenizer.json or tokenizer.model in")
    assert main(["tokenizer", "train", "--input", "builtin:pydoc", "--vocab-size", "100", "--output",
                 str(tmp_path / "t")]) == 1
    assert "use at least 262" in capsys.readouterr().err


def test_cli_train_refuses_to_replace_a_models_or_datasets_tokenizer(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(builtin_documents("pydoc")[:3]), encoding="utf-8")
    train = ["tokenizer", "train", "--input", str(corpus), "--vocab-size", "300", "--quiet", "--output"]
    for marker, what in (("config.json", "a model directory"), ("manifest.json", "prepared data")):
        folder = tmp_path / marker.split(".")[0]
        folder.mkdir()
        (folder / marker).write_text("{}")
        (folder / "tokenizer.json").write_text("the original")
        assert main(train + [str(folder)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: output {folder} is {what} ({marker})") and err.count("\n") == 1, err
        assert (folder / "tokenizer.json").read_text() == "the original"
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    assert main(train + [str(tmp_path / "notes")]) == 1
    assert "holds other files (todo.txt)" in capsys.readouterr().err
    assert main(train + [str(tmp_path / "tok")]) == 0  # a new folder, then over its own earlier output
    assert main(train + [str(tmp_path / "tok")]) == 0
