"""`mobilellm <command>`: a thin dispatcher. Each command lives beside the code it drives and
exposes `register(subparsers)`, which adds its parser and sets `func(args) -> int | None`."""

from __future__ import annotations

import argparse
import importlib
import sys

from mobilellm import __version__
from mobilellm.errors import MobileLLMError

# Modules that provide a `register(subparsers)` function, in the order `--help` lists them.
COMMAND_MODULES = [
    "mobilellm.commands.info",
    "mobilellm.commands.tokenizer",
    "mobilellm.commands.prepare",
    "mobilellm.commands.train",
    "mobilellm.commands.convert",
    "mobilellm.commands.convert_state",
    "mobilellm.commands.quickstart",
    "mobilellm.commands.study",
    "mobilellm.commands.finetune",
    "mobilellm.commands.api_data",
    "mobilellm.commands.generate",
    "mobilellm.commands.chat",
    "mobilellm.commands.serve",
    "mobilellm.commands.eval",
    "mobilellm.commands.quantize",
    "mobilellm.commands.export",
    "mobilellm.commands.bench",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mobilellm", description="Train, evaluate, quantize, export and serve "
                                     "MobileLLM-style sub-billion-parameter language models.")
    parser.add_argument("--version", action="version", version=f"mobilellm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        if not getattr(args, "accepts_overrides", False):
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
        args.overrides = extras
    try:
        return int(args.func(args) or 0)
    except MobileLLMError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as err:  # what no command caught: still one line (a full disk, a permission, a lost mount)
        where = f" ({err.filename})" if err.filename else ""
        print(f"error: {err.strerror or err}{where}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
