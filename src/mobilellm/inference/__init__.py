"""Generation on a CPU: the engine (engine.py), its two backends (torch_backend.py, native.py) and the
pieces they share (sampling, streaming text, weight layout, the backend contract, backend selection)."""

from mobilellm.inference.engine import Completion, Engine, Request, default_precision, load_engine
from mobilellm.inference.layout import PRECISIONS
from mobilellm.inference.sampling import SamplingParams, next_token
from mobilellm.inference.select import BACKENDS
from mobilellm.inference.text import IncrementalDetokenizer, StopStrings

__all__ = ["BACKENDS", "PRECISIONS", "Completion", "Engine", "IncrementalDetokenizer", "Request", "SamplingParams",
           "StopStrings", "default_precision", "load_engine", "next_token"]
