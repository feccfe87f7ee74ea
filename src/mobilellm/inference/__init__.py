"""Generation on a CPU: the engine, its two backends and the pieces they share.

  sampling.py       SamplingParams and next_token (greedy / temperature / top-k / top-p / penalty)
  text.py           streaming text: incremental detokenization, stop strings
  layout.py         the one weight layout of every backend (fused q|k|v and gate|up, RoPE row order)
                    and the precisions it converts to
  backend.py        the backend contract: prefill, decode, free, weight and cache sizes
  torch_backend.py  PyTorch ops (oneDNN / fbgemm kernels, optional torch.compile)
  native.py         one C call per step (native_kernels.c, compiled on first use)
  select.py         which backend runs here
  engine.py         requests, continuous batching, load_engine
"""

from mobilellm.inference.engine import Completion, Engine, Request, default_precision, load_engine
from mobilellm.inference.layout import PRECISIONS
from mobilellm.inference.sampling import SamplingParams, next_token
from mobilellm.inference.select import BACKENDS
from mobilellm.inference.text import IncrementalDetokenizer, StopStrings

__all__ = ["BACKENDS", "PRECISIONS", "Completion", "Engine", "IncrementalDetokenizer", "Request", "SamplingParams",
           "StopStrings", "default_precision", "load_engine", "next_token"]
