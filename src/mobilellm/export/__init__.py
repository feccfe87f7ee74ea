"""Export a model directory to on-device runtimes: ExecuTorch (.pte), llama.cpp (.gguf), ONNX (.onnx).

Each exporter writes one file atomically, reporting each stage with the time elapsed; the runtime
packages (the `[export]` extra) are imported inside functions only."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from mobilellm.errors import MobileLLMError
from mobilellm.export.stages import Stages

FORMATS = ("pte", "gguf", "onnx")
SUFFIXES = {"pte": ".pte", "gguf": ".gguf", "onnx": ".onnx"}
# the precision names every command uses -> each format's own name for it (first = a float model's default)
FORMAT_PRECISIONS = {
    "pte": {"fp32": "fp32", "int8": "w8a8", "int4": "8da4w"},
    "gguf": {"fp32": "f32", "fp16": "f16", "int8": "q8_0", "int4": "q4_0"},
    "onnx": {"fp32": "fp32"},
}
FORMAT_QUANTS = {fmt: tuple(names.values()) for fmt, names in FORMAT_PRECISIONS.items()}  # the formats' own names


def format_quant(fmt: str, precision: str | None, model_quantization: dict | None) -> str:
    """The format's own name for `precision` (its old name is accepted too). None: a quantized model
    directory exports with its own scheme where the format has it, anything else as floats."""
    names = FORMAT_PRECISIONS[fmt]
    if precision is None:
        scheme = (model_quantization or {}).get("scheme")
        return scheme if fmt == "pte" and scheme in names.values() else next(iter(names.values()))
    if precision in names.values():
        return precision
    if precision not in names:
        raise MobileLLMError(f"--precision {precision!r} is not available for {fmt}; choose from {', '.join(names)}")
    return names[precision]


def export(model_dir: str | Path, fmt: str, output: str | Path, *, precision: str | None = None,
           group_size: int = 32, embedding: str | None = None, max_len: int | None = None, progress: Callable[[str], None] | None = None) -> dict:
    """Export a model directory; returns a summary (format, quant, bytes, seconds, ...). Raises MobileLLMError.
    progress(line) receives one line per stage. embedding: pte only (see executorch.pte_embedding)."""
    from mobilellm.checkpoint import load_model_dir

    if fmt not in FORMATS:
        raise MobileLLMError(f"unknown --format {fmt!r}; choose from {', '.join(FORMATS)}")
    model_dir, output = Path(model_dir), Path(output)
    if not model_dir.is_dir():
        raise MobileLLMError(f"model directory {model_dir} does not exist")
    if output.is_dir():
        raise MobileLLMError(f"--output {output} is a directory; give a file name such as model{SUFFIXES[fmt]}")
    stages = Stages(progress)
    stages(f"load: {model_dir}")
    model = load_model_dir(model_dir)
    quant = format_quant(fmt, precision, getattr(model, "quantization", None))
    if max_len is not None and max_len > model.config.max_seq_len:
        raise MobileLLMError(f"--max-len {max_len} exceeds the model's context ({model.config.max_seq_len})")
    if embedding is not None and fmt != "pte":
        raise MobileLLMError("--embedding is for --format pte; quantize the directory first for the others")
    if fmt == "pte":
        from mobilellm.export.executorch import export_pte

        info = export_pte(model, output, quant=quant, group_size=group_size, embedding=embedding, max_len=max_len,
                          stages=stages)
    elif fmt == "gguf":
        from mobilellm.export.gguf import export_gguf

        info = export_gguf(model, model_dir, output, quant=quant, stages=stages)
    else:
        from mobilellm.export.onnx import export_onnx

        info = export_onnx(model, output, quant=quant, stages=stages)
    info["seconds"] = stages.elapsed()
    stages(f"done: {output} ({info['bytes'] / 2**20:.2f} MiB)")
    return info
