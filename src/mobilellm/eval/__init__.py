"""Evaluation: perplexity, the paper's zero-shot tasks scored as lm-evaluation-harness does, and an
lm-eval model adapter. `evaluate(model, tokenizer, tasks, data_dir=..., manifest=...)` runs in-process.

Kept import-light (the CLI imports every command module): the heavy parts load on first use.
"""

from __future__ import annotations


def __getattr__(name: str):
    if name in ("evaluate", "markdown_table"):
        from mobilellm.eval import evaluator

        return getattr(evaluator, name)
    raise AttributeError(f"module 'mobilellm.eval' has no attribute {name!r}")


__all__ = ["evaluate", "markdown_table"]
