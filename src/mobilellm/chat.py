"""Chat templates (Hugging Face convention) and the interactive `mobilellm chat` command.

A model directory may carry a Jinja chat template (`chat_template` in tokenizer_config.json, read
through the Tokenizer); `apply_chat_template` renders it the way transformers does (sandboxed Jinja,
`messages`, `add_generation_prompt`, `bos_token`, `eos_token`), so fine-tuning and serving format
conversations identically. Without a stored template we use DEFAULT_CHAT_TEMPLATE, the same format
`mobilellm.tokenizer` stores in the tokenizers it trains (`<|role|>` + newline + content, each turn
closed by the EOS token so generation stops there).
"""

from __future__ import annotations

import sys
from functools import lru_cache

from mobilellm.errors import MobileLLMError

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
DEFAULT_TEMPLATE_STOPS = ["<|user|>", "<|system|>"]  # in case a model writes the next header instead of EOS
ROLES = ("system", "user", "assistant")


@lru_cache(maxsize=16)
def _compile(template: str):
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except TemplateError as err:
        raise MobileLLMError(f"chat template does not compile: {err}") from None


def apply_chat_template(messages: list[dict], template: str | None = None, add_generation_prompt: bool = True,
                        *, bos_token: str = "", eos_token: str = "", **kwargs) -> str:
    """Render `messages` ([{"role", "content"}, ...]) to the prompt text the model expects."""
    from jinja2 import TemplateError

    check_messages(messages)
    try:
        return _compile(template or DEFAULT_CHAT_TEMPLATE).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos_token,
            eos_token=eos_token, **kwargs)
    except TemplateError as err:
        raise MobileLLMError(f"chat template failed on these messages: {err}") from None


def check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise MobileLLMError("messages must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise MobileLLMError(f"messages[{i}] must have role in {ROLES} and string content")


def special_text(tokenizer, token_id: int | None) -> str:
    if tokenizer is None or token_id is None or token_id < 0:
        return ""
    return tokenizer.decode([token_id], skip_special=False)


class ChatFormatter:
    """Renders conversations for one tokenizer and fits them into the context by dropping old turns."""

    def __init__(self, tokenizer, max_len: int):
        self.tokenizer = tokenizer
        self.max_len = max_len
        stored = getattr(tokenizer, "chat_template", None)
        self.template = stored or DEFAULT_CHAT_TEMPLATE
        self.stops = [] if stored else list(DEFAULT_TEMPLATE_STOPS)
        self.bos = special_text(tokenizer, getattr(tokenizer, "bos_id", None))
        self.eos = special_text(tokenizer, getattr(tokenizer, "eos_id", None))

    def encode(self, messages: list[dict]) -> list[int]:
        text = apply_chat_template(messages, self.template, True, bos_token=self.bos, eos_token=self.eos)
        bos = bool(getattr(self.tokenizer, "add_bos", False))
        if self.bos and text.startswith(self.bos):  # the template wrote BOS as text: encode it as the BOS id
            text, bos = text[len(self.bos):], True
        return list(self.tokenizer.encode(text, bos=bos))

    def fit(self, messages: list[dict], reserve: int) -> tuple[list[int], list[dict]]:
        """Prompt ids for `messages`, dropping the oldest non-system turns until `reserve` new tokens fit."""
        kept = list(messages)
        while True:
            ids = self.encode(kept)
            if len(ids) + reserve <= self.max_len:
                return ids, kept
            first = next((i for i, m in enumerate(kept) if m["role"] != "system"), None)
            if first is None or first == len(kept) - 1:  # only the newest message is left
                raise MobileLLMError(
                    f"the message needs {len(ids)} tokens and {reserve} are kept for the reply, but the context "
                    f"is {self.max_len}: send a shorter message (or lower --max-new-tokens)")
            kept.pop(first)
            if first < len(kept) - 1 and kept[first]["role"] == "assistant":  # drop whole user+assistant pairs
                kept.pop(first)


# ---- REPL ---------------------------------------------------------------------------------------


def run(args) -> int:
    import time

    from mobilellm.generate import load_engine, report, sampling_from_args

    params = sampling_from_args(args)
    engine = load_engine(args.model, weights=args.weights, compile=args.compile, threads=args.threads,
                         backend=args.backend)
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
        except MobileLLMError as err:
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
    from mobilellm.generate import add_runtime_args, add_sampling_args

    p = sub.add_parser("chat", help="talk to a model in the terminal (keeps history within the context)",
                       description="Reads one user message per line from stdin and prints the reply. "
                                   "Commands: /reset (forget the conversation), /exit. Uses the model "
                                   "directory's chat template, or a default one when it has none.")
    p.add_argument("model", help="model directory (with tokenizer files)")
    p.add_argument("--system", default=None, help="system message kept at the start of the conversation")
    add_sampling_args(p, temperature=0.7, max_new_tokens=256)
    add_runtime_args(p)
    p.set_defaults(func=run)
