"""GGUF export: the file runs in llama.cpp (llama-cpp-python) and matches PyTorch."""

import numpy as np
import pytest
import torch

from conftest import greedy_tokens, llama_greedy, llama_logits, open_llama, run_cli, shared_data
from mobilellm.checkpoint import save_model_dir
from mobilellm.config import get_preset
from mobilellm.errors import MobileLLMError
from mobilellm.model import MobileLLM
from mobilellm.tokenizer import load_tokenizer, train_tokenizer

pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")

from mobilellm.export.gguf import export_gguf  # noqa: E402

TEXT = ("The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst of times; "
        "call me Ishmael. In 1851, 42 whales swam 3.5 miles! Don't stop -- won't stop... naïve café, 東京. ")


@pytest.fixture(scope="module")
def bpe_tokenizer():
    return train_tokenizer([TEXT * 3, TEXT.upper(), TEXT.lower() * 2], vocab_size=400, min_frequency=1)


def tiny(vocab_size, preset="mobilellm-tiny", **changes):
    cfg = get_preset(preset, vocab_size=vocab_size, ffn_dim=192, n_layers=2, **changes)
    return MobileLLM(cfg).eval()


def check_runs_like_torch(model, model_dir, path, text, tokenizer, atol=1e-3):
    llm = open_llama(path)
    try:
        ids = tokenizer.encode(text)
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids  # same tokenizer in llama.cpp
        with torch.no_grad():
            ref = model(torch.tensor([ids]))[0].numpy()
        got = llama_logits(llm, ids)
        assert np.abs(got - ref).max() <= atol
        assert llama_greedy(llm, ids[:8], 32) == greedy_tokens(model, ids[:8], 32)
    finally:
        llm.close()


def test_f32_gguf_with_trained_bpe_tokenizer_matches_torch(tmp_path, bpe_tokenizer):
    torch.manual_seed(0)
    model = tiny(bpe_tokenizer.vocab_size)
    save_model_dir(model, tmp_path / "m", tokenizer=bpe_tokenizer)
    info = export_gguf(model, tmp_path / "m", tmp_path / "m.gguf", quant="f32")
    assert info["tokenizer"] == "gpt2" and info["pre_tokenizer"] == "gpt-2"
    check_runs_like_torch(model, tmp_path / "m", tmp_path / "m.gguf", TEXT, bpe_tokenizer)


def test_layer_shared_model_is_written_unrolled_and_matches(tmp_path, bpe_tokenizer):
    torch.manual_seed(1)
    model = tiny(bpe_tokenizer.vocab_size, "mobilellm-tiny-ls")
    save_model_dir(model, tmp_path / "ls", tokenizer=bpe_tokenizer)
    proc = run_cli("export", tmp_path / "ls", "--format", "gguf", "--output", tmp_path / "ls.gguf", check=True)
    assert "unrolled" in proc.stdout
    from gguf import GGUFReader

    reader = GGUFReader(str(tmp_path / "ls.gguf"))
    names = [t.name for t in reader.tensors]
    assert "output.weight" not in names  # tied: llama.cpp reuses token_embd
    assert len([n for n in names if n.endswith("attn_q.weight")]) == model.config.n_logical_layers
    check_runs_like_torch(model, tmp_path / "ls", tmp_path / "ls.gguf", TEXT, bpe_tokenizer)


def test_llama2_sentencepiece_tokenizer_in_gguf(tmp_path):
    sp_dir = shared_data("tokenizers", "llama2")
    tok = load_tokenizer(sp_dir)
    torch.manual_seed(2)
    model = tiny(32000)
    save_model_dir(model, tmp_path / "sp", tokenizer=tok)
    info = export_gguf(model, tmp_path / "sp", tmp_path / "sp.gguf", quant="f32")
    assert info["tokenizer"] == "llama"
    check_runs_like_torch(model, tmp_path / "sp", tmp_path / "sp.gguf", "Hello world! The cat sat on the mat.", tok)


@pytest.mark.parametrize("quant,rel_tol", [("f16", 0.01), ("q8_0", 0.05), ("q4_0", 0.3)])
def test_quantized_gguf_stays_close(tmp_path, bpe_tokenizer, quant, rel_tol):
    torch.manual_seed(3)
    model = tiny(bpe_tokenizer.vocab_size)
    save_model_dir(model, tmp_path / "m", tokenizer=bpe_tokenizer)
    info = export_gguf(model, tmp_path / "m", tmp_path / "q.gguf", quant=quant)
    f32_bytes = export_gguf(model, tmp_path / "m", tmp_path / "f.gguf", quant="f32")["bytes"]
    assert info["bytes"] < f32_bytes
    if quant == "q4_0":
        assert info["tensor_types"].get("Q4_0") and info["tensor_types"].get("Q8_0") == 1  # embedding at Q8_0
    ids = bpe_tokenizer.encode(TEXT)
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0].numpy()
    llm = open_llama(tmp_path / "q.gguf")
    try:
        got = llama_logits(llm, ids)
    finally:
        llm.close()
    err = np.abs(got - ref).max()
    assert 0 < err <= rel_tol * np.abs(ref).max(), err


def test_gguf_bad_inputs_fail_cleanly(tmp_path, bpe_tokenizer):
    model = tiny(bpe_tokenizer.vocab_size)
    save_model_dir(model, tmp_path / "notok")
    with pytest.raises(MobileLLMError, match="has no tokenizer"):
        export_gguf(model, tmp_path / "notok", tmp_path / "x.gguf")
    from tokenizers import Tokenizer, models, pre_tokenizers

    ws = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    ws.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "ws").mkdir()
    save_model_dir(tiny(3), tmp_path / "ws")
    ws.save(str(tmp_path / "ws" / "tokenizer.json"))
    proc = run_cli("export", tmp_path / "ws", "--format", "gguf", "--output", tmp_path / "ws.gguf")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert not (tmp_path / "ws.gguf").exists() and not (tmp_path / "x.gguf").exists()
    proc = run_cli("export", tmp_path / "notok", "--format", "gguf", "--precision", "8da4w", "--output", tmp_path / "y.gguf")
    assert proc.returncode != 0 and "not available for gguf" in proc.stderr and not (tmp_path / "y.gguf").exists()


def test_bench_runs_the_gguf(tmp_path, bpe_tokenizer):
    import json

    model = tiny(bpe_tokenizer.vocab_size)
    save_model_dir(model, tmp_path / "m", tokenizer=bpe_tokenizer)
    export_gguf(model, tmp_path / "m", tmp_path / "m.gguf", quant="f32")
    run_cli("bench", tmp_path / "m.gguf", "--threads", "1", "--prompt-tokens", "16", "--new-tokens", "8", "--json",
            tmp_path / "r.json", check=True)
    (row,) = json.loads((tmp_path / "r.json").read_text())
    assert row["runtime"] == "llama.cpp" and len(row["output_ids"]) == 8 and row["decode_ms_per_token"] > 0
    assert all(0 <= i < bpe_tokenizer.vocab_size for i in row["output_ids"])
