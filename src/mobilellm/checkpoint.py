"""Model directories: the one currency every stage reads and writes (docs/model.md).

Layouts we write:
  * non-shared SwiGLU models: a plain `LlamaForCausalLM` directory (`config.json` with
    `model_type: llama`, `model.safetensors`, tokenizer files) that transformers, llama.cpp's
    converter and ExecuTorch tooling read unchanged; tied embeddings store no `lm_head.weight`.
  * layer-shared (or ReLU-FFN) models: `model_type: mobilellm`, each physical block stored once,
    with the official MobileLLM fields (`share_embedding`, `layer_sharing`) plus our full config
    under the `mobilellm` key; `unroll=True` writes the equivalent plain Llama instead.

  * quantized models (`mobilellm quantize`): `model_type: mobilellm` with a "quantization" section,
    integer weights + scales (the format is described in quantize.py).

Layouts we read: our own, the official MobileLLM checkpoints (`model_type: mobilellm`, fp16
`pytorch_model.bin`, no output matrix) and Llama checkpoints (e.g. SmolLM2-135M).
`load_model_and_tokenizer` is what every command uses to open a model directory.
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import weakref
from pathlib import Path

import torch

from mobilellm.config import ModelConfig
from mobilellm.errors import MobileLLMError
from mobilellm.fileio import atomic_dir, read_json_object, write_json_atomic
from mobilellm.model import MobileLLM
from mobilellm import quantize as Q
from mobilellm.tokenizer import TOKENIZER_FILES

CONFIG_KEY = "mobilellm"  # our full ModelConfig inside config.json
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")

# ---- config.json <-> ModelConfig ---------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        return read_json_object(path, "not a model's config")
    except FileNotFoundError:
        raise MobileLLMError(f"{path} not found: not a model directory") from None


def config_from_hf(hf: dict) -> ModelConfig:
    """Map a Llama or official MobileLLM config.json onto ModelConfig."""
    if CONFIG_KEY in hf:
        return ModelConfig.from_dict(hf[CONFIG_KEY])
    model_type = hf.get("model_type")
    if model_type not in ("llama", "mobilellm"):
        raise MobileLLMError(f"unsupported model_type {model_type!r}: expected 'llama' or 'mobilellm'")
    if hf.get("hidden_act", "silu") != "silu":
        raise MobileLLMError(f"unsupported hidden_act {hf['hidden_act']!r}: only SwiGLU (silu) Llama models load")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise MobileLLMError("unsupported checkpoint: attention/MLP biases (MobileLLM has none)")
    rope_theta = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    try:
        n_heads = hf["num_attention_heads"]
        shared = model_type == "mobilellm" and bool(hf.get("layer_sharing", False))
        if model_type == "mobilellm":
            tied = bool(hf.get("share_embedding", True))  # official flag; tie_word_embeddings is False there
        else:
            tied = bool(hf.get("tie_word_embeddings", True))
        return ModelConfig(
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            ffn_dim=hf["intermediate_size"],
            head_dim=hf.get("head_dim") if hf.get("head_dim") not in (None, hf["hidden_size"] // n_heads) else None,
            tie_embeddings=tied,
            layer_sharing="immediate" if shared else "none",  # official LS = each block twice in a row
            share_repeats=2 if shared else 1,
            norm_eps=hf.get("rms_norm_eps", 1e-5),
            rope_theta=float(rope_theta),
            max_seq_len=hf.get("max_position_embeddings", 2048),
            init_std=hf.get("initializer_range", 0.02),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=_first(hf.get("eos_token_id")),
            pad_token_id=hf.get("pad_token_id"),
        )
    except KeyError as err:
        raise MobileLLMError(f"config.json lacks the field {err.args[0]!r}") from None


def _first(value):
    return value[0] if isinstance(value, list) and value else value


def is_plain_llama(cfg: ModelConfig) -> bool:
    return cfg.layer_sharing == "none" and cfg.ffn_type == "swiglu"


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    hf = {
        "architectures": ["LlamaForCausalLM"] if is_plain_llama(cfg) else ["MobileLLMForCausalLM"],
        "model_type": "llama" if is_plain_llama(cfg) else "mobilellm",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.attn_head_dim,
        "hidden_act": "silu" if cfg.ffn_type == "swiglu" else "relu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if not is_plain_llama(cfg):  # the official MobileLLM fields
        hf["share_embedding"] = cfg.tie_embeddings
        hf["layer_sharing"] = cfg.layer_sharing != "none"
        hf["tie_word_embeddings"] = False
    hf[CONFIG_KEY] = cfg.to_dict()
    return hf


def load_config(path: str | Path) -> ModelConfig:
    return config_from_hf(_read_json(Path(path) / "config.json"))


# ---- weights -------------------------------------------------------------------------------


def _weights_file(directory: Path, hf: dict) -> Path:
    present = [directory / f for f in WEIGHT_FILES if (directory / f).exists()]
    if not present:
        raise MobileLLMError(f"{directory} has no weights ({', '.join(WEIGHT_FILES)})")
    official = hf.get("model_type") == "mobilellm" and CONFIG_KEY not in hf
    if official and (directory / "pytorch_model.bin").exists():
        # Some auto-converted official safetensors are wrong (perplexity ~39k): trust the .bin.
        return directory / "pytorch_model.bin"
    return present[0]


def _load_state_dict(file: Path) -> dict[str, torch.Tensor]:
    try:
        if file.name.endswith(".index.json"):
            index = _read_json(file)
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(index.get("weight_map", {}).values())):
                state.update(_load_state_dict(file.parent / shard))
            return state
        if file.suffix == ".safetensors":
            return _read_safetensors(file)
        return torch.load(file, map_location="cpu", weights_only=True)
    except MobileLLMError:
        raise
    except FileNotFoundError:
        raise MobileLLMError(f"weights file {file} not found") from None
    except Exception as err:  # safetensors / pickle errors on truncated or corrupt files
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MobileLLMError(f"weights file {file} is truncated or corrupt ({first_line})") from None


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """A .safetensors file as one tensor per entry, each entry memory-mapped on its own (see _map_entry).

    Nothing is read until a tensor is used, and every tensor owns its mapping: a caller that converts
    a model and drops it block by block (the generation engine) gives each block's pages back as it
    goes, so loading holds the converted weights and about one block of the file, not both copies.
    """
    size = file.stat().st_size
    with open(file, "rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise ValueError("no header")
        header = json.loads(fh.read(int.from_bytes(head, "little")))
        base = fh.tell()
        state = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            begin, end = entry["data_offsets"]
            dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
            shape = [int(n) for n in entry["shape"]]
            nbytes = math.prod(shape) * dtype.itemsize
            if end - begin != nbytes:
                raise ValueError(f"entry {name} holds {end - begin} bytes for {nbytes}")
            if base + end > size:  # checked here: touching a mapped page past the end would be SIGBUS
                raise ValueError(f"file ends inside entry {name}")
            state[name] = _map_entry(fh, base + begin, shape, dtype)
    return state


def _map_entry(fh, offset: int, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    """One entry as a private (copy-on-write: writes never reach the file) mapping of its own pages,
    unmapped when the last tensor viewing it is freed. Read into memory where mmap is not at hand."""
    nbytes = math.prod(shape) * dtype.itemsize
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    length = offset - start + nbytes
    addr = _mmap_private(fh.fileno(), start, length) if nbytes and (offset - start) % dtype.itemsize == 0 else None
    if addr is None:
        tensor = torch.empty(shape, dtype=dtype)
        fh.seek(offset)
        if nbytes and fh.readinto(memoryview(tensor.view(-1).view(torch.uint8).numpy())) != nbytes:
            raise ValueError("file ends inside an entry")
        return tensor
    owner = (ctypes.c_char * length).from_address(addr)  # the tensor keeps it alive (buffer protocol)
    weakref.finalize(owner, _LIBC.munmap, ctypes.c_void_p(addr), ctypes.c_size_t(length)).atexit = False
    return torch.frombuffer(owner, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset - start).view(shape)


def _libc():
    if os.name != "posix":
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int64]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


def _mmap_private(fd: int, offset: int, length: int) -> int | None:
    # libc's mmap, not Python's: a mmap.mmap keeps a duplicate descriptor open per mapping (hundreds of entries)
    if _LIBC is None:
        return None
    addr = _LIBC.mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE, fd, offset)
    return None if addr in (None, ctypes.c_void_p(-1).value) else addr


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF keys (`model.layers.0...`, `lm_head.weight`) -> our module names (`layers.0...`)."""
    return {k.removeprefix("model."): v for k, v in state.items()}


def load_model_dir(path: str | Path, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32) -> MobileLLM:
    """Build the model described by a model directory and load its weights (strict)."""
    directory = Path(path)
    if not directory.is_dir():
        raise MobileLLMError(f"model directory {directory} does not exist")
    hf = _read_json(directory / "config.json")
    if "quantization" in hf:  # integer weights + scales
        return _load_quantized(directory, hf, _load_state_dict(_weights_file(directory, hf)), device, dtype)
    cfg = config_from_hf(hf)
    state = _strip_prefix(_load_state_dict(_weights_file(directory, hf)))
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)  # some tied checkpoints store a copy; ours is the embedding
    with torch.device("meta"):
        model = MobileLLM(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise MobileLLMError(f"weights in {directory} do not match its config: missing {missing[:3]}"
                             f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                             f"{'...' if len(unexpected) > 3 else ''}")
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise MobileLLMError(f"weight {key} in {directory} has shape {tuple(state[key].shape)}, config expects "
                                 f"{tuple(tensor.shape)}")
    # assign=True: the loaded tensors become the parameters (no second copy of the weights in memory)
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, strict=True, assign=True)
    return model.eval()


# ---- saving ----------------------------------------------------------------------------------


def unrolled(model: MobileLLM) -> MobileLLM:
    """The equivalent non-shared model: logical layer i gets a copy of block layer_to_block[i]."""
    cfg = model.config
    flat = cfg.replace(n_layers=cfg.n_logical_layers, layer_sharing="none", share_repeats=1,
                       source=(cfg.source + " (unrolled)").strip())
    with torch.device("meta"):
        out = MobileLLM(flat)
    out = out.to_empty(device=model.output_weight.device)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("layers.")}
    for logical, physical in enumerate(model.layer_to_block):
        for key, value in model.layers[physical].state_dict().items():
            state[f"layers.{logical}.{key}"] = value.clone()
    out.load_state_dict(state, strict=True)
    return out.to(model.output_weight.dtype).eval()


def save_model_dir(model: MobileLLM, path: str | Path, tokenizer=None, *, unroll: bool = False,
                   dtype: torch.dtype | None = None, generation_config: dict | None = None) -> Path:
    """Write a complete model directory atomically (an existing one survives until the new one is whole).

    tokenizer: a mobilellm.tokenizer.Tokenizer (its files are written) or a directory to copy
    tokenizer files from. unroll: write a layer-shared model as a plain Llama with duplicated blocks.
    A quantized model (quantize.quantize_model) is written in the quantized format.
    """
    from safetensors.torch import save_file

    quantization = getattr(model, "quantization", None)
    if unroll and model.config.layer_sharing != "none":
        if quantization:
            raise MobileLLMError("unroll the float model before quantizing it")
        model = unrolled(model)
    cfg = model.config
    if quantization:
        state, hf = quantized_state_dict(model), config_to_hf(cfg, torch.float32)
        hf["model_type"] = "mobilellm"  # transformers must not mistake it for a float Llama
        hf["architectures"] = ["MobileLLMForCausalLM"]
        hf["quantization"] = dict(quantization)
    else:
        dtype = dtype or model.output_weight.dtype
        state = {(k if k == "lm_head.weight" else f"model.{k}"): v.detach().to("cpu", dtype).contiguous()
                 for k, v in model.state_dict().items()}
        hf = config_to_hf(cfg, dtype)
    path = Path(path)
    with atomic_dir(path) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_json_atomic(tmp / "config.json", hf)
        gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id}
        gen.update(generation_config or {})
        write_json_atomic(tmp / "generation_config.json", gen)
        _write_tokenizer(tokenizer, tmp)
    return path


def _write_tokenizer(tokenizer, directory: Path) -> None:
    if tokenizer is None:
        return
    if isinstance(tokenizer, (str, Path)):
        src = Path(tokenizer)
        for name in TOKENIZER_FILES:
            if (src / name).exists():
                (directory / name).write_bytes((src / name).read_bytes())
        return
    tokenizer.save(directory)


def has_tokenizer(path: str | Path) -> bool:
    p = Path(path)
    return (p / "tokenizer.json").exists() or (p / "tokenizer.model").exists()


def check_vocab(tokenizer, cfg: ModelConfig, source: str | Path = "the tokenizer") -> None:
    """A tokenizer whose ids reach past the model's embedding fails now, not at the first large id."""
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise MobileLLMError(f"{source} has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                             f"{cfg.vocab_size}: wrong tokenizer for this model")


def load_model_and_tokenizer(path: str | Path, *, device: str | torch.device = "cpu",
                             dtype: torch.dtype = torch.float32, tokenizer: str | Path | None = None,
                             need_tokenizer: bool = True):
    """(model, tokenizer) from a model directory: what every command opens a model with.

    tokenizer: a tokenizer file or directory to use instead of the model directory's own. Without
    one, need_tokenizer=False gives (model, None); otherwise a missing tokenizer is an error.
    """
    from mobilellm.tokenizer import load_tokenizer

    directory = Path(path)
    if not directory.is_dir():
        raise MobileLLMError(f"model directory {directory} does not exist")
    source = Path(tokenizer) if tokenizer else directory
    tok = None
    if tokenizer or has_tokenizer(directory):
        tok = load_tokenizer(source)
    elif need_tokenizer:
        raise MobileLLMError(f"{directory} has no tokenizer files (tokenizer.json or tokenizer.model); "
                             "pass --tokenizer <file or dir> where the command takes it, or save the model with its tokenizer")
    check_vocab(tok, load_config(directory), source)  # before the weights load
    return load_model_dir(directory, device=device, dtype=dtype), tok


# ---- quantized models -------------------------------------------------------------------------


def quantized_state_dict(model: MobileLLM) -> dict[str, torch.Tensor]:
    """HF-style keys; int4 weights packed two per byte."""
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        key = name if name.startswith("lm_head.") else f"model.{name}"
        if name.endswith(".weight_q"):
            module = model.get_submodule(name.removesuffix(".weight_q"))
            key = key.removesuffix("_q")
            tensor = Q.pack_int4(tensor) if module.bits == 4 else tensor
        state[key] = tensor.detach().cpu().contiguous()
    return state


def _load_quantized(directory: Path, hf: dict, state: dict[str, torch.Tensor], device="cpu",
                   dtype: torch.dtype = torch.float32) -> MobileLLM:
    """Build the quantized model a directory describes (load_model_dir dispatches here)."""
    quant = hf["quantization"]
    if not isinstance(quant, dict) or quant.get("format_version") != Q.FORMAT_VERSION:
        raise MobileLLMError(f"{directory}/config.json: unsupported quantization section {quant!r} "
                             f"(this version reads format_version {Q.FORMAT_VERSION}); re-run mobilellm quantize")
    cfg = config_from_hf(hf)
    spec = Q.scheme_from_name(quant.get("scheme", "?"), quant.get("group_size") or 32)
    emb = Q.embedding_quant(quant.get("embedding", "none"), quant.get("embedding_group_size") or 32)
    state = _strip_prefix(state)
    with torch.device("meta"):
        model = MobileLLM(cfg)
    model = model.to_empty(device="cpu")

    def take(key: str) -> torch.Tensor:
        try:
            return state.pop(key)
        except KeyError:
            raise MobileLLMError(f"weights in {directory} lack {key!r}: the file does not match its config") from None

    def take_quantized(prefix: str, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        q, scale = take(prefix + ".weight"), take(prefix + ".weight_scale")
        q = Q.unpack_int4(q) if bits == 4 else q
        if q.dtype != torch.int8 or q.dim() != 2 or scale.dim() != 2 or scale.shape[0] != q.shape[0]:
            raise MobileLLMError(f"weights in {directory}: {prefix} is not a valid int{bits} matrix with scales")
        return q, scale

    with torch.no_grad():
        for name in Q.linear_names(model):
            linear = model.get_submodule(name)
            q, scale = take_quantized(name, spec.weight_bits)
            if tuple(q.shape) != (linear.out_features, linear.in_features):
                raise MobileLLMError(f"weight {name} in {directory} has shape {tuple(q.shape)}, config expects "
                                     f"{(linear.out_features, linear.in_features)}")
            Q.set_module(model, name, Q.QuantizedLinear(q, scale, spec.weight_bits, spec.dynamic_activations))
        if emb is not None:
            bits, _ = emb
            model.embed_tokens = Q.QuantizedEmbedding(*take_quantized("embed_tokens", bits), bits)
            if model.lm_head is not None:
                model.lm_head = Q.QuantizedLinear(*take_quantized("lm_head", bits), bits, dynamic_activations=False)
        rest = model.state_dict()
        floats = {k: state[k] for k in rest if k in state}
        missing = [k for k in rest if k not in state and not k.endswith(("weight_q", "weight_scale"))]
        if missing or set(state) - set(floats):
            raise MobileLLMError(f"weights in {directory} do not match its config: missing {missing[:3]}, "
                                 f"unexpected {sorted(set(state) - set(floats))[:3]}")
        model.load_state_dict({k: v.to(dtype) for k, v in floats.items()}, strict=False)
    model.quantization = dict(quant)
    return model.to(device).eval()


def is_quantized_dir(path: str | Path) -> bool:
    try:
        return "quantization" in json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
