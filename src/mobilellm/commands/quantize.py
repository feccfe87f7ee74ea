"""`mobilellm quantize <model dir> --precision int8|int4 --output DIR`: post-training quantization."""

from __future__ import annotations

import argparse
from pathlib import Path

from mobilellm.commands.options import Deprecated
from mobilellm.errors import MobileLLMError

# the precision names every command uses -> the quantize.py scheme behind each
PRECISION_SCHEMES = {"int8": "w8a8", "int4": "8da4w", "int8-weight-only": "int8"}


def run(args) -> int:
    from mobilellm.checkpoint import has_tokenizer, is_quantized_dir, load_model_dir, save_model_dir
    from mobilellm.quantize import SCHEMES, quantize_model

    if args.precision is None:
        raise MobileLLMError("give --precision " + "|".join(PRECISION_SCHEMES))
    scheme = PRECISION_SCHEMES.get(args.precision, args.precision)  # --scheme passes a scheme name
    if scheme not in SCHEMES:
        raise MobileLLMError(f"unknown --precision {args.precision!r}; choose from {', '.join(PRECISION_SCHEMES)}")
    src = Path(args.model)
    if not src.is_dir():
        raise MobileLLMError(f"model directory {src} does not exist")
    if is_quantized_dir(src):
        raise MobileLLMError(f"{src} is already quantized; quantize its float model directory instead")
    if Path(args.output).resolve() == src.resolve():
        raise MobileLLMError("--output must differ from the input model directory")
    model = load_model_dir(src)
    quantize_model(model, scheme, group_size=args.group_size, embedding=args.embedding)
    save_model_dir(model, args.output, tokenizer=src if has_tokenizer(src) else None)
    gen = src / "generation_config.json"
    if gen.exists():
        (Path(args.output) / "generation_config.json").write_bytes(gen.read_bytes())
    before = sum(f.stat().st_size for f in src.glob("model*.safetensors")) or 0
    after = (Path(args.output) / "model.safetensors").stat().st_size
    ratio = f" ({after / before:.2f}x of {before / 2**20:.1f} MiB)" if before else ""
    print(f"quantized {src} to {args.precision} ({scheme}"
          + (f", group {args.group_size}" if scheme == "8da4w" else "")
          + f"), embedding {args.embedding} -> {args.output}: weights {after / 2**20:.1f} MiB{ratio}")
    return 0


def register(sub) -> None:
    from mobilellm.quantize import EMBEDDING_MODES, SCHEMES

    p = sub.add_parser("quantize", help="post-training quantization of a model directory (int8, int4)",
                       description="int8: int8 weights, one scale per output row, and int8 activations per token "
                                   "(W8A8, the paper's scheme); int4: int4 weights in groups of --group-size input "
                                   "columns and int8 activations per token (8da4w); int8-weight-only: int8 weights, "
                                   "float activations. The output is a model directory every command reads.")
    p.add_argument("model", help="float model directory")
    p.add_argument("--precision", choices=list(PRECISION_SCHEMES), default=None, help="int8, int4 or int8-weight-only")
    p.add_argument("--scheme", dest="precision", choices=SCHEMES, action=Deprecated,
                   new_flag="--precision (w8a8 = int8, 8da4w = int4, int8 = int8-weight-only)", help=argparse.SUPPRESS)
    p.add_argument("--group-size", type=int, default=32, help="int4 (and int4 embedding) group size (default 32)")
    p.add_argument("--embedding", default="none", choices=EMBEDDING_MODES,
                   help="embedding/output matrix: none (float), int8 (per row) or int4 (group-wise)")
    p.add_argument("--output", required=True, help="output model directory")
    p.set_defaults(func=run)
