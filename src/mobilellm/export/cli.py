"""`mobilellm export <model dir> --format pte|gguf|onnx [--quant ...] --output FILE`."""

from __future__ import annotations

import time
from pathlib import Path

from mobilellm.errors import MobileLLMError
from mobilellm.export import FORMAT_QUANTS, FORMATS

SUFFIXES = {"pte": ".pte", "gguf": ".gguf", "onnx": ".onnx"}


def default_quant(fmt: str, model_quantization: dict | None) -> str:
    """A quantized model directory exports with its own scheme where the format has it."""
    if model_quantization and fmt == "pte" and model_quantization["scheme"] in FORMAT_QUANTS["pte"]:
        return model_quantization["scheme"]
    return FORMAT_QUANTS[fmt][0]


def export(model_dir: str | Path, fmt: str, output: str | Path, *, quant: str | None = None,
           group_size: int = 32, max_len: int | None = None) -> dict:
    """Export a model directory; returns a summary (format, quant, bytes, ...). Raises MobileLLMError."""
    from mobilellm.checkpoint import load_model_dir

    if fmt not in FORMATS:
        raise MobileLLMError(f"unknown --format {fmt!r}; choose from {', '.join(FORMATS)}")
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise MobileLLMError(f"model directory {model_dir} does not exist")
    output = Path(output)
    if output.is_dir():
        raise MobileLLMError(f"--output {output} is a directory; give a file name such as model{SUFFIXES[fmt]}")
    model = load_model_dir(model_dir)
    quantization = getattr(model, "quantization", None)
    quant = quant or default_quant(fmt, quantization)
    if quant not in FORMAT_QUANTS[fmt]:
        raise MobileLLMError(f"--quant {quant!r} is not available for {fmt}; choose from {', '.join(FORMAT_QUANTS[fmt])}")
    if max_len is not None and max_len > model.config.max_seq_len:
        raise MobileLLMError(f"--max-len {max_len} exceeds the model's context ({model.config.max_seq_len})")
    if fmt == "pte":
        from mobilellm.export.executorch import export_pte

        return export_pte(model, output, quant=quant, group_size=group_size, max_len=max_len)
    if fmt == "gguf":
        from mobilellm.export.gguf import export_gguf

        return export_gguf(model, model_dir, output, quant=quant)
    from mobilellm.export.onnx import export_onnx

    return export_onnx(model, output, quant=quant)


def run(args) -> int:
    started = time.perf_counter()
    info = export(args.model, args.format, args.output, quant=args.quant, group_size=args.group_size,
                  max_len=args.max_len)
    extra = ""
    if info.get("unrolled"):
        extra += f"; layer-shared model written unrolled ({info['logical_layers']} llama blocks: llama.cpp cannot repeat blocks)"
    if "tensor_types" in info:
        extra += "; tensors " + ", ".join(f"{k} x{v}" for k, v in info["tensor_types"].items())
    if info.get("max_len"):
        extra += f"; KV cache {info['max_len']} tokens"
    print(f"exported {args.model} -> {args.output} ({info['format']}, {info['quant']}, "
          f"{info['bytes'] / 2**20:.2f} MiB) in {time.perf_counter() - started:.1f} s{extra}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("export", help="export a model directory to ExecuTorch (.pte), llama.cpp (.gguf) or ONNX",
                       description="quant per format: " + "; ".join(f"{f}: {', '.join(q)}" for f, q in FORMAT_QUANTS.items()))
    p.add_argument("model", help="model directory (float, or quantized by `mobilellm quantize`)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--quant", default=None,
                   help="weight format (default: fp32/f32, or the model directory's own scheme for pte)")
    p.add_argument("--group-size", type=int, default=32, help="pte 8da4w group size when quantizing here (default 32)")
    p.add_argument("--max-len", type=int, default=None,
                   help="pte: KV-cache length in tokens (default: the model's context)")
    p.add_argument("--output", required=True, help="output file")
    p.set_defaults(func=run)
