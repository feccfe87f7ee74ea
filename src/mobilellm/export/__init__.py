"""Export a model directory to on-device runtimes: ExecuTorch (.pte), llama.cpp (.gguf), ONNX (.onnx).

Each exporter reads a float or quantized model directory and writes one file atomically. The
runtime packages are the `[export]` extra and are imported inside functions only.
"""

from __future__ import annotations

FORMATS = ("pte", "gguf", "onnx")
# --quant values each format accepts (first = default for a float model directory)
FORMAT_QUANTS = {
    "pte": ("fp32", "w8a8", "8da4w"),
    "gguf": ("f32", "f16", "q8_0", "q4_0"),
    "onnx": ("fp32",),
}
