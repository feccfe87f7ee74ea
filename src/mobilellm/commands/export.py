"""`mobilellm export <model dir> --format pte|gguf|onnx [--precision ...] --output FILE`."""

from __future__ import annotations

import argparse
import contextlib
import logging
import warnings

from mobilellm.commands.options import Deprecated
from mobilellm.export import FORMAT_PRECISIONS, FORMAT_QUANTS, FORMATS

# Packages the exporters drive: their warnings and log lines about features we do not use (CUDA
# kernels, deprecated internals) are noise to a user; --verbose shows them.
THIRD_PARTY = ("torch", "torchao", "executorch", "onnx", "onnxscript", "onnx_ir", "torchvision", "coremltools", "gguf")


@contextlib.contextmanager
def quiet_third_party(verbose: bool):
    if verbose:
        yield
        return
    loggers = [logging.getLogger(name) for name in THIRD_PARTY]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"(%s)(\.|$)" % "|".join(THIRD_PARTY))
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def run(args) -> int:
    from mobilellm.export import export

    with quiet_third_party(args.verbose):
        info = export(args.model, args.format, args.output, precision=args.precision, group_size=args.group_size,
                      embedding=args.embedding, max_len=args.max_len, progress=lambda line: print(line, flush=True))
    extra = ""
    if info.get("unrolled"):
        extra += f"; layer-shared model written unrolled ({info['logical_layers']} llama blocks: llama.cpp cannot repeat blocks)"
    if "tensor_types" in info:
        extra += "; tensors " + ", ".join(f"{k} x{v}" for k, v in info["tensor_types"].items())
    if info.get("max_len"):
        extra += f"; KV cache {info['max_len']} tokens"
    print(f"exported {args.model} -> {args.output} ({info['format']}, {info['quant']}, "
          f"{info['bytes'] / 2**20:.2f} MiB) in {info['seconds']:.1f} s{extra}")
    return 0


def register(sub) -> None:
    from mobilellm.quantize import EMBEDDING_MODES

    p = sub.add_parser("export", help="export a model directory to ExecuTorch (.pte), llama.cpp (.gguf) or ONNX",
                       description="precision per format: " + "; ".join(
                           f"{f}: " + ", ".join(f"{p} ({q})" for p, q in names.items())
                           for f, names in FORMAT_PRECISIONS.items()))
    p.add_argument("model", help="model directory (float, or quantized by `mobilellm quantize`)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--precision", default=None,
                   help="weights (default: fp32, or the model directory's own scheme for pte)")
    p.add_argument("--quant", dest="precision", action=Deprecated, new_flag="--precision",
                   choices=sorted({q for qs in FORMAT_QUANTS.values() for q in qs}), help=argparse.SUPPRESS)
    p.add_argument("--group-size", type=int, default=32, help="pte int4 group size when quantizing here (default 32)")
    p.add_argument("--embedding", default=None, choices=EMBEDDING_MODES,
                   help="pte: the embedding (= tied output) matrix when quantizing here: none (float), int8 or int4 "
                        "(group size --group-size); default int4 with 8da4w (ExecuTorch's recipe), else none")
    p.add_argument("--max-len", type=int, default=None,
                   help="pte: KV-cache length in tokens (default: the model's context)")
    p.add_argument("--output", required=True, help="output file")
    p.add_argument("--verbose", action="store_true", help="also show the export libraries' own warnings")
    p.set_defaults(func=run)
