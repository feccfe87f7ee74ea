"""Evaluation: perplexity, the paper's zero-shot tasks scored as lm-evaluation-harness does, and an lm-eval
adapter. Kept import-light (the CLI imports every command module): `evaluate` loads on first use."""

from __future__ import annotations


def __getattr__(name: str):
    if name in ("evaluate", "markdown_table"):
        from mobilellm.eval import evaluator

        return getattr(evaluator, name)
    raise AttributeError(f"module 'mobilellm.eval' has no attribute {name!r}")


__all__ = ["evaluate", "markdown_table"]
