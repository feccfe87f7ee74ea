"""`mobilellm quickstart`: raw text to a trained, evaluated, talking layer-shared model on this CPU."""

from __future__ import annotations

from mobilellm import quickstart
from mobilellm.commands.options import Deprecated
from mobilellm.errors import MobileLLMError


def run(args) -> int:
    if args.steps < 1 or args.vocab_size < 300 or (args.time_limit is not None and args.time_limit <= 0):
        raise MobileLLMError("quickstart needs --steps >= 1, --vocab-size >= 300 and --time-limit > 0")
    quickstart.run(args.out, steps=args.steps, vocab_size=args.vocab_size, device=args.device, threads=args.threads,
                   time_limit_minutes=args.time_limit, progress=not args.quiet)
    return 0


def register(sub) -> None:
    p = sub.add_parser("quickstart", help="train, evaluate and sample a small layer-shared model on this CPU",
                       description=(quickstart.__doc__ or "").split("\n")[0])
    p.add_argument("--out", default="runs/quickstart", help="output folder (default: runs/quickstart)")
    p.add_argument("--steps", type=int, default=quickstart.DEFAULT_STEPS,
                   help=f"training steps of {quickstart.BATCH} x {quickstart.SEQ_LEN} tokens "
                        f"(default: {quickstart.DEFAULT_STEPS}, about 4 minutes on two cores)")
    p.add_argument("--time-limit", type=float, default=None, metavar="MINUTES",
                   help="stop training after this many minutes even if steps remain (default: no limit)")
    p.add_argument("--minutes", type=float, dest="time_limit", action=Deprecated, new_flag="--time-limit",
                   help="old name of --time-limit")
    p.add_argument("--vocab-size", type=int, default=4096, help="tokenizer vocabulary (default: 4096)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
