"""Chat templates (Hugging Face convention): rendering conversations to prompt text, safely.

`apply_chat_template` renders a model directory's Jinja template the way transformers does, so
fine-tuning, chat and serving format conversations identically; without one, `default_chat_template()`
(the one `mobilellm tokenizer train` stores) is used. A template may come from a stranger: it renders
in Jinja's immutable sandbox, within RENDER_SECONDS and with bounded output, so a hostile template costs
one error, not a hung process."""

from __future__ import annotations

import sys
import time
from functools import lru_cache

from mobilellm.errors import MobileLLMError

ROLES = ("system", "user", "assistant")  # role r has the special token "<|r|>" in tokenizers we train
DEFAULT_TEMPLATE_STOPS = ["<|user|>", "<|system|>"]  # in case a model writes the next header instead of EOS
RENDER_SECONDS = 1.0  # a real template renders in well under a millisecond
MAX_RENDERED_CHARS = 4_000_000


def role_token(role: str) -> str:
    return f"<|{role}|>"


def default_chat_template(add_bos: bool = False) -> str:
    """`<|role|>\\ncontent</s>` per message, then `<|assistant|>\\n` when a generation prompt is asked for."""
    return (
        ("{{ bos_token }}" if add_bos else "")
        + "{% for message in messages %}"
        + "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token }}"
        + "{% endfor %}"
        + "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    )


DEFAULT_CHAT_TEMPLATE = default_chat_template()


class _TemplateTooCostly(Exception):
    pass


def _environment():
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        """The sandbox, plus a bound on `*` and `**`: one operation could otherwise build a huge string."""

        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
                raise _TemplateTooCostly(f"exponent {right} in the template")
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_RENDERED_CHARS:
                        raise _TemplateTooCostly("the template repeats a value too many times")
            return super().call_binop(context, operator, left, right)

    return BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])


@lru_cache(maxsize=16)
def _compile(template: str):
    from jinja2 import TemplateError

    def raise_exception(message):
        raise TemplateError(message)

    env = _environment()
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except TemplateError as err:
        raise MobileLLMError(f"chat template does not compile: {err}") from None


def _render_bounded(compiled, variables: dict) -> str:
    """Render with a deadline: a trace function on the template's own frames stops a runaway loop."""
    deadline = time.perf_counter() + RENDER_SECONDS

    def on_line(frame, event, arg):
        if time.perf_counter() > deadline:
            raise _TemplateTooCostly(f"rendering took longer than {RENDER_SECONDS:g} s")
        return on_line

    def on_call(frame, event, arg):  # only Jinja's compiled template code is traced
        return on_line if frame.f_code.co_filename == "<template>" else None

    parts, size = [], 0
    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        for chunk in compiled.generate(**variables):
            size += len(chunk)
            if size > MAX_RENDERED_CHARS:
                raise _TemplateTooCostly(f"its output exceeds {MAX_RENDERED_CHARS:,} characters")
            parts.append(chunk)
    finally:
        sys.settrace(previous)
    return "".join(parts)


def apply_chat_template(messages: list[dict], template: str | None = None, add_generation_prompt: bool = True,
                        *, bos_token: str = "", eos_token: str = "", **kwargs) -> str:
    """Render `messages` ([{"role", "content"}, ...]) to the prompt text the model expects."""
    from jinja2 import TemplateError

    check_messages(messages)
    compiled = _compile(template or DEFAULT_CHAT_TEMPLATE)
    variables = dict(messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos_token,
                     eos_token=eos_token, **kwargs)
    try:
        return _render_bounded(compiled, variables)
    except _TemplateTooCostly as err:
        raise MobileLLMError(f"chat template refused: {err}") from None
    except (TemplateError, OverflowError, TypeError, ValueError, RecursionError) as err:
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

    def render(self, messages: list[dict]) -> str:
        return apply_chat_template(messages, self.template, True, bos_token=self.bos, eos_token=self.eos)

    def encode(self, messages: list[dict]) -> list[int]:
        text = self.render(messages)
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
