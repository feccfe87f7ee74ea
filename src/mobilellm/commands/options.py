"""What several commands share: sampling and inference-runtime arguments, deprecated flag names, the
training summary."""

from __future__ import annotations

import argparse
import os
import sys

from mobilellm.errors import MobileLLMError
from mobilellm.inference import BACKENDS, PRECISIONS, SamplingParams


class Deprecated(argparse.Action):
    """An old flag name kept as an alias: stores into the new destination and says so once."""

    def __init__(self, option_strings, dest, new_flag: str, **kwargs):
        self.new_flag = new_flag
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"note: {option_string} is deprecated; use {self.new_flag}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def print_training_summary(result, headline: str) -> None:
    """After train(): on rank 0 only (one summary per run, not per process), `headline` plus the
    validation loss, the final model's folder and the run's warnings (stderr)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    val = f", validation loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    print(f"{headline}{val}\nfinal model: {result.final_dir}")
    for line in result.warnings():
        print(line, file=sys.stderr)


def add_sampling_args(p, *, temperature: float = 0.0, max_new_tokens: int = 128) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"default {max_new_tokens}")
    g.add_argument("--temperature", type=float, default=temperature, help=f"0 = greedy (default {temperature})")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 = off)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible output)")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable); not printed")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating after the end-of-sequence token")


def sampling_from_args(args) -> SamplingParams:
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                            stop=list(args.stop), ignore_eos=args.ignore_eos)
    params.validate()
    return params


def add_precision_arg(g, choices=PRECISIONS, help_text: str | None = None) -> None:
    g.add_argument("--precision", choices=choices, default=None,
                   help=help_text or "weights at run time: fp32, bf16, fp16, int8 (one scale per output row) or "
                                     "int4 (groups of 32); int8/int4 run on integer dot products with int8 "
                                     "activations per token. Default: fp32, or a quantized directory's own "
                                     "int8 weights")
    g.add_argument("--weights", dest="precision", choices=choices, action=Deprecated, new_flag="--precision",
                   help=argparse.SUPPRESS)


def add_runtime_args(p) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    add_precision_arg(g)
    g.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="native: one compiled C call per step (needs a C compiler; built once); torch: "
                        "PyTorch ops; auto (default): native where it builds")
    g.add_argument("--compile", action="store_true", help="torch.compile the torch backend's decode step")
    g.add_argument("--verbose", action="store_true", help="print speed and memory to stderr")


def engine_args(args) -> dict:
    """load_engine keyword arguments from the runtime group."""
    return {"precision": args.precision, "compile": args.compile, "threads": args.threads, "backend": args.backend}


def report(engine, tokens: int, seconds: float) -> None:
    from mobilellm.sysinfo import peak_rss_bytes

    print(f"[{tokens} tokens in {seconds:.2f} s, {tokens / max(seconds, 1e-9):.1f} tok/s; weights "
          f"{engine.weight_bytes() / 2**20:.1f} MiB ({engine.precision}, {engine.backend.name} backend), "
          f"KV cache {engine.cache_bytes() / 2**20:.1f} MiB, "
          f"peak RSS {peak_rss_bytes() / 2**20:.1f} MiB]", file=sys.stderr)
    blocks = getattr(engine.backend, "block_nbytes", None)
    if blocks:  # the native backend: how a layer block's weights sit in this CPU's caches
        import torch

        from mobilellm.sysinfo import block_cache_note

        print(f"[{block_cache_note(max(blocks), torch.get_num_threads(), engine.backend.block_repeats)}]",
              file=sys.stderr)


def parse_overrides(extras: list[str]) -> list[str]:
    """`--optim.lr 1e-3` / `--optim.lr=1e-3` -> ["optim.lr=1e-3"]."""
    out, i = [], 0
    while i < len(extras):
        item = extras[i]
        if not item.startswith("--") or "." not in item:
            raise MobileLLMError(f"unexpected argument {item!r}: overrides look like --section.key value")
        key = item[2:]
        if "=" in key:
            out.append(key)
            i += 1
            continue
        if i + 1 >= len(extras):
            raise MobileLLMError(f"override {item} needs a value")
        out.append(f"{key}={extras[i + 1]}")
        i += 2
    return out
