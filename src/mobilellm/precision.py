"""The precision names every command uses, and the torch dtypes behind the float ones.

  fp32, bf16, fp16   float weights (and activations where a command computes in that dtype)
  int8               int8 weights, one scale per output row (quantize.py's rule); with
                     `mobilellm quantize` also int8 activations per token (W8A8)
  int4               int4 weights in groups of 32 input columns, int8 activations per token (8da4w)
Older spellings (float32, bfloat16, float16) are accepted where a dtype is asked for.
"""

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
