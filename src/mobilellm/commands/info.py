"""`mobilellm info <preset or model dir>`: shape, parameter counts, FLOPs and weight memory."""

from __future__ import annotations

from mobilellm.config import list_presets
from mobilellm.info import describe, resolve_config


def run(args) -> int:
    cfg = resolve_config(args.model)
    print(f"{args.model}")
    print(describe(cfg, args.seq_len))
    return 0


def register(sub) -> None:
    p = sub.add_parser("info", help="shape, parameters, FLOPs and memory of a preset or model directory",
                       description=f"Presets: {', '.join(list_presets())}")
    p.add_argument("model", help="preset name (e.g. mobilellm-125m) or model directory")
    p.add_argument("--seq-len", type=int, default=None, help="context length for the FLOPs count (default: model's)")
    p.set_defaults(func=run)
