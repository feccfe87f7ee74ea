"""`mobilellm chat <model dir>`: talk to a model in the terminal, history kept within the context."""

from __future__ import annotations

import sys
import time

from mobilellm.commands.options import add_runtime_args, add_sampling_args, engine_args, report, sampling_from_args
from mobilellm.errors import MobileLLMError


def run(args) -> int:
    from mobilellm.chat_template import ChatFormatter
    from mobilellm.inference import load_engine

    params = sampling_from_args(args)
    engine = load_engine(args.model, **engine_args(args))
    formatter = ChatFormatter(engine.tokenizer, engine.max_len)
    params.stop = list(params.stop) + formatter.stops
    reserve = min(params.max_new_tokens, engine.max_len // 2)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = list(system)
    interactive = sys.stdin.isatty()
    if interactive:
        print("chat: /reset clears the conversation, /exit quits", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:  # end of input
            break
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.strip() in ("/exit", "/quit"):
            break
        if text.strip() == "/reset":
            history = list(system)
            print("[conversation reset]", file=sys.stderr)
            continue
        try:
            ids, history = formatter.fit(history + [{"role": "user", "content": text}], reserve)
        except MobileLLMError as err:  # one line, and the conversation goes on
            print(f"error: {err}", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        for delta in engine.stream(ids, params):
            print(delta, end="", flush=True)
        print(flush=True)
        reply = engine.last
        history = history + [{"role": "assistant", "content": reply.text}]
        if args.verbose:
            report(engine, len(reply.token_ids), time.perf_counter() - t0)
    return 0


def register(sub) -> None:
    p = sub.add_parser("chat", help="talk to a model in the terminal (keeps history within the context)",
                       description="Reads one user message per line from stdin and prints the reply. "
                                   "Commands: /reset (forget the conversation), /exit. Uses the model "
                                   "directory's chat template, or a default one when it has none.")
    p.add_argument("model", help="model directory (with tokenizer files; float or quantized)")
    p.add_argument("--system", default=None, help="system message kept at the start of the conversation")
    add_sampling_args(p, temperature=0.7, max_new_tokens=256)
    add_runtime_args(p)
    p.set_defaults(func=run)
