"""`mobilellm generate <model dir>`: continuations of prompts, batched or streamed."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from mobilellm.commands.options import add_runtime_args, add_sampling_args, engine_args, report, sampling_from_args
from mobilellm.errors import MobileLLMError


def _read_prompts(args) -> list[str]:
    if args.prompt:
        return list(args.prompt)
    if args.prompt_file:
        try:
            text = Path(args.prompt_file).read_text(encoding="utf-8")
        except OSError as err:
            raise MobileLLMError(f"cannot read prompt file {args.prompt_file}: {err.strerror}") from None
        prompts = [line.replace("\\n", "\n") for line in text.splitlines() if line.strip()]
        if not prompts:
            raise MobileLLMError(f"prompt file {args.prompt_file} has no prompts (one per non-empty line)")
        return prompts
    if sys.stdin.isatty():
        raise MobileLLMError("no prompt: pass --prompt TEXT, --prompt-file FILE, or pipe text on stdin")
    return [sys.stdin.read()]


def run(args) -> int:
    from mobilellm.checkpoint import load_model_and_tokenizer
    from mobilellm.inference import Engine

    params = sampling_from_args(args)
    if args.batch_size < 1:
        raise MobileLLMError(f"--batch-size must be >= 1, got {args.batch_size}")
    prompts = _read_prompts(args)
    model, tokenizer = load_model_and_tokenizer(args.model)
    # a cache just long enough for the longest prompt and its continuation (the engine caps it at the context)
    longest = max(len(ids) for ids in tokenizer.encode_batch(prompts, bos=tokenizer.add_bos))
    engine = Engine(model, tokenizer, max_batch=min(args.batch_size, len(prompts)),
                    max_len=longest + params.max_new_tokens, consume=True, **engine_args(args))
    del model
    t0 = time.perf_counter()
    tokens = 0
    if args.stream:
        for i, prompt in enumerate(prompts):
            if i:
                print(args.separator, end="", flush=True)
            for delta in engine.stream(prompt, params):
                print(delta, end="", flush=True)
            tokens += len(engine.last.token_ids)
        print()
    else:
        results = engine.generate(prompts, params)
        tokens = sum(len(r.token_ids) for r in results)
        if args.json:
            for prompt, r in zip(prompts, results):
                print(json.dumps({"prompt": prompt, "text": r.text, "finish_reason": r.finish_reason,
                                  "prompt_tokens": r.prompt_tokens, "completion_tokens": len(r.token_ids)}))
        else:
            print(args.separator.join(r.text for r in results))
    if args.verbose:
        report(engine, tokens, time.perf_counter() - t0)
    return 0


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a model directory (KV cache, batched, streaming)",
                       description="Prints the continuation of each prompt. Prompts from --prompt (repeatable), "
                                   "--prompt-file (one per line, \\n for newlines) or stdin (all of it, one prompt).")
    p.add_argument("model", help="model directory (with tokenizer files; float or quantized)")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    p.add_argument("--prompt-file", default=None, help="file with one prompt per line")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default 8)")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.add_argument("--separator", default="\n", help="printed between completions (default: newline)")
    add_sampling_args(p)
    add_runtime_args(p)
    p.set_defaults(func=run)
