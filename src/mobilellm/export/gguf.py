"""GGUF export for llama.cpp: the `llama` architecture written with `gguf.GGUFWriter`.

Weights F32, F16, Q8_0 or Q4_0 (gguf's own quantizers); q/k are permuted to llama.cpp's interleaved
RoPE layout; a layer-shared model is written unrolled (llama.cpp cannot repeat blocks); a quantized
model is exported from its dequantized weights. docs/export.md has the details."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from mobilellm.errors import MobileLLMError
from mobilellm.export.stages import Stages
from mobilellm.fileio import atomic_path
from mobilellm.model import MobileLLM

GGUF_QUANTS = ("f32", "f16", "q8_0", "q4_0")

# token types (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _bpe_pre_tokenizer_name(pre: dict | None) -> str:
    """Map a tokenizer.json pre-tokenizer onto a llama.cpp pre-tokenizer name (or fail clearly)."""
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space", False):
        return "gpt-2"  # GPT-2's regex split: what `mobilellm tokenizer train` builds
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # SmolLM/SmolLM2: single digits, then GPT-2's split
    raise MobileLLMError(f"tokenizer.json pre-tokenizer {kinds or 'none'} has no llama.cpp equivalent this exporter "
                         "knows (supported: GPT-2 ByteLevel, SmolLM Digits+ByteLevel); retrain the tokenizer with "
                         "`mobilellm tokenizer train` or use the SentencePiece tokenizer")


def _bpe_metadata(directory: Path, vocab_size: int) -> dict:
    data = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not (data.get("decoder") or {}).get("type") == "ByteLevel":
        raise MobileLLMError("tokenizer.json is not a byte-level BPE; GGUF export supports byte-level BPE "
                             "tokenizer.json and SentencePiece tokenizer.model")
    if data.get("normalizer"):
        raise MobileLLMError("tokenizer.json has a normalizer, which llama.cpp's gpt2 tokenizer does not apply")
    pre = _bpe_pre_tokenizer_name(data.get("pre_tokenizer"))
    tokens: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    types = {i: NORMAL for i in tokens}
    for added in data.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    n = max(tokens) + 1
    if n > vocab_size:
        raise MobileLLMError(f"tokenizer has {n} tokens but the model's vocab_size is {vocab_size}")
    # ids the tokenizer never produces (a padded embedding) get filler names
    token_list = [tokens.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    type_list = [types.get(i, UNUSED) for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges:
        raise MobileLLMError("tokenizer.json has no merges; llama.cpp needs a trained BPE")
    return {"model": "gpt2", "pre": pre, "tokens": token_list, "types": type_list, "merges": merges}


def _sentencepiece_metadata(directory: Path, vocab_size: int) -> dict:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    n = sp.get_piece_size()
    if n > vocab_size:
        raise MobileLLMError(f"tokenizer has {n} pieces but the model's vocab_size is {vocab_size}")
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        if i >= n:
            tokens.append(f"[PAD{i}]"), scores.append(-1000.0), types.append(UNUSED)
            continue
        tokens.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        types.append(UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else BYTE if sp.is_byte(i)
                     else UNUSED if sp.is_unused(i) else NORMAL)
    byte_tokens = {f"<0x{b:02X}>" for b in range(256)}
    if not byte_tokens <= set(tokens):
        raise MobileLLMError("SentencePiece tokenizer lacks some of the 256 <0xXX> byte tokens (byte fallback), "
                             "without which llama.cpp cannot tokenize; train it with byte_fallback=True")
    return {"model": "llama", "pre": "default", "tokens": tokens, "scores": scores, "types": types,
            "unk_id": sp.unk_id() if sp.unk_id() >= 0 else None}


def tokenizer_metadata(directory: Path, vocab_size: int) -> dict:
    if (directory / "tokenizer.json").exists():
        meta = _bpe_metadata(directory, vocab_size)
    elif (directory / "tokenizer.model").exists():
        meta = _sentencepiece_metadata(directory, vocab_size)
    else:
        raise MobileLLMError(f"{directory} has no tokenizer (tokenizer.json or tokenizer.model); a GGUF file must "
                             "carry one: copy the tokenizer files into the model directory")
    from mobilellm.tokenizer import load_tokenizer

    tok = load_tokenizer(directory)
    meta.update(bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id, add_bos=tok.add_bos,
                chat_template=tok.chat_template)
    return meta


def permute_rotate_half(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate-half q/k rows -> llama.cpp's interleaved pairs (llama.cpp's converter does the same)."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


GGUF_BLOCK_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def gguf_tensors(model: MobileLLM) -> list[tuple[str, np.ndarray]]:
    """(gguf name, float32 array) in llama.cpp's layout; blocks unrolled over the logical layers."""
    cfg = model.config
    if cfg.ffn_type != "swiglu":
        raise MobileLLMError("GGUF's llama architecture needs a SwiGLU FFN; this model uses ReLU")
    from mobilellm.quantize import float_modules

    # the values a quantized model computes with (gguf re-quantizes them in its own formats)
    state = {k: v.detach().float().cpu() for k, v in float_modules(model).state_dict().items()}
    out = [("token_embd.weight", state["embed_tokens.weight"].numpy())]
    for logical, physical in enumerate(model.layer_to_block):
        for ours, theirs in GGUF_BLOCK_NAMES.items():
            w = state[f"layers.{physical}.{ours}.weight"].numpy()
            if ours == "self_attn.q_proj":
                w = permute_rotate_half(w, cfg.n_heads)
            elif ours == "self_attn.k_proj":
                w = permute_rotate_half(w, cfg.n_kv_heads)
            out.append((f"blk.{logical}.{theirs}.weight", w))
    out.append(("output_norm.weight", state["norm.weight"].numpy()))
    if not cfg.tie_embeddings:
        out.append(("output.weight", state["lm_head.weight"].numpy()))
    return out


def _encode_tensor(name: str, w: np.ndarray, quant: str):
    """-> (array to write, GGML type or None for plain float arrays, type name)."""
    import gguf

    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim == 1 or quant == "f32":
        return w, None, "F32"
    target = quant
    if quant == "q4_0" and name in ("token_embd.weight", "output.weight"):
        target = "q8_0"  # the output matrix is the most quantization-sensitive tensor
    if target in ("q8_0", "q4_0") and w.shape[-1] % 32 != 0:
        target = "f16"  # Q8_0/Q4_0 blocks hold 32 values of a row
    if target == "f16":
        return w.astype(np.float16), None, "F16"
    qtype = gguf.GGMLQuantizationType.Q8_0 if target == "q8_0" else gguf.GGMLQuantizationType.Q4_0
    return gguf.quants.quantize(w, qtype), qtype, qtype.name


def export_gguf(model: MobileLLM, model_dir: str | Path, output: str | Path, *, quant: str = "f32",
                name: str | None = None, stages: Stages | None = None) -> dict:
    stages = stages or Stages()
    try:
        import gguf
    except ImportError:
        raise MobileLLMError("GGUF export needs the export extra: pip install 'mobilellm[export]'") from None
    if quant not in GGUF_QUANTS:
        raise MobileLLMError(f"--precision {quant!r} is not available for gguf; choose from {', '.join(GGUF_QUANTS)}")
    cfg = model.config
    meta = tokenizer_metadata(Path(model_dir), cfg.vocab_size)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[quant]
    stages(f"convert: {cfg.n_logical_layers} llama blocks to {quant.upper()} tensors")
    tensors = [(n, *_encode_tensor(n, w, quant)) for n, w in gguf_tensors(model)]
    output = Path(output)
    stages(f"write: {sum(t[1].nbytes for t in tensors) / 2**20:.1f} MiB of tensors")
    with atomic_path(output) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        writer.add_name(name or Path(model_dir).resolve().name)
        writer.add_context_length(cfg.max_seq_len)
        writer.add_embedding_length(cfg.dim)
        writer.add_block_count(cfg.n_logical_layers)
        writer.add_feed_forward_length(cfg.ffn_dim)
        writer.add_head_count(cfg.n_heads)
        writer.add_head_count_kv(cfg.n_kv_heads)
        writer.add_key_length(cfg.attn_head_dim)
        writer.add_value_length(cfg.attn_head_dim)
        writer.add_rope_dimension_count(cfg.attn_head_dim)
        writer.add_layer_norm_rms_eps(cfg.norm_eps)
        writer.add_rope_freq_base(cfg.rope_theta)
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_tokenizer_model(meta["model"])
        writer.add_tokenizer_pre(meta["pre"])
        writer.add_token_list(meta["tokens"])
        writer.add_token_types(meta["types"])
        if "scores" in meta:
            writer.add_token_scores(meta["scores"])
        if "merges" in meta:
            writer.add_token_merges(meta["merges"])
        for key, add in (("bos_id", writer.add_bos_token_id), ("eos_id", writer.add_eos_token_id),
                         ("pad_id", writer.add_pad_token_id), ("unk_id", writer.add_unk_token_id)):
            if meta.get(key) is not None:
                add(meta[key])
        writer.add_add_bos_token(bool(meta["add_bos"]))
        writer.add_add_eos_token(False)
        if meta.get("chat_template"):
            writer.add_chat_template(meta["chat_template"])
        for tensor_name, data, qtype, _ in tensors:
            writer.add_tensor(tensor_name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    kinds: dict[str, int] = {}
    for _, _, _, kind in tensors:
        kinds[kind] = kinds.get(kind, 0) + 1
    return {"format": "gguf", "quant": quant, "bytes": output.stat().st_size, "tensor_types": kinds,
            "tokenizer": meta["model"], "pre_tokenizer": meta["pre"],
            "unrolled": cfg.layer_sharing != "none", "logical_layers": cfg.n_logical_layers}
