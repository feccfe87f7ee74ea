"""Which backend runs the network here: native where it builds, else PyTorch (or as asked)."""

from __future__ import annotations

from mobilellm.errors import MobileLLMError
from mobilellm.inference.backend import Backend
from mobilellm.inference.layout import check_precision

BACKENDS = ("auto", "native", "torch")  # auto: native where it builds here, else torch


def choose_backend(backend: str, compile: bool) -> str:
    """"native" or "torch": auto takes native unless it cannot be built here."""
    if backend not in BACKENDS:
        raise MobileLLMError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if compile:  # torch.compile optimizes the PyTorch forward pass
        if backend == "native":
            raise MobileLLMError("--compile applies to the torch backend; drop it or use --backend torch")
        return "torch"
    if backend == "torch":
        return "torch"
    from mobilellm.inference.native import NativeUnavailable, library, note_once

    try:
        library()
    except NativeUnavailable as exc:
        if backend == "native":
            raise
        note_once(f"mobilellm: using the torch backend ({exc})")
        return "torch"
    return "native"


def build_backend(model, precision: str, *, backend: str = "auto", max_batch: int = 1, max_len: int,
                  compile: bool = False, consume: bool = False) -> Backend:
    """The chosen backend holding `model`'s weights in `precision`. consume=True lets it empty the
    model's matrices as it converts them (the caller gives the model up): one copy of the weights."""
    check_precision(precision)
    if choose_backend(backend, compile) == "native":
        from mobilellm.inference.native import NativeBackend

        return NativeBackend(model, precision, max_batch, max_len, consume)
    from mobilellm.inference.torch_backend import TorchBackend

    return TorchBackend(model, precision, max_batch, max_len, consume, compile)
