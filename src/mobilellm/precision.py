"""The precision names every command uses (fp32, bf16, fp16, int8, int4), and the torch dtypes behind the
float ones. Older spellings (float32, bfloat16, float16) are accepted where a dtype is asked for."""

from __future__ import annotations

import torch

from mobilellm.errors import MobileLLMError

FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
INFERENCE = ("fp32", "bf16", "fp16", "int8", "int4")  # what generate / chat / serve / bench run in
INT4_GROUP = 32  # int4 inference: input columns per weight scale (8da4w's group, llama.cpp Q4_0's block)
ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "f32": "fp32", "f16": "fp16"}


def float_dtype(name: str) -> torch.dtype:
    """fp32 / bf16 / fp16 (or float32 / bfloat16 / float16) -> the torch dtype."""
    key = ALIASES.get(name, name)
    if key not in FLOAT_DTYPES:
        raise MobileLLMError(f"unknown precision {name!r}; choose from {', '.join(FLOAT_DTYPES)}")
    return FLOAT_DTYPES[key]
