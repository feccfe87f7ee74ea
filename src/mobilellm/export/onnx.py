"""ONNX export with a KV cache, through `torch.onnx.export(..., dynamo=True)`.

The graph takes input_ids (B, T) and past_key_values.{i}.key/value per logical layer and returns logits
and present.{i}.key/value (docs/export.md); batch, sequence and past length are dynamic. Identical
constants are merged after export, so a layer-shared model stores its weights once."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mobilellm.errors import MobileLLMError
from mobilellm.export.stages import Stages
from mobilellm.fileio import atomic_path
from mobilellm.model import MobileLLM

ONNX_QUANTS = ("fp32",)
PROTOBUF_LIMIT = 2 * 2**30  # a single-file ONNX model (weights inside) must stay under 2 GiB


class _PastCache:
    """cache.update for model.Block in the exported graph: the past K/V of each logical layer come in
    as inputs, past + new go out as `present` outputs (and, repeated over each GQA group, to attention)."""

    def __init__(self, past: list[torch.Tensor], group: int):
        self.past, self.group, self.present = past, group, []

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        k = torch.cat([self.past[2 * layer], k], dim=2)  # (B, KV, P+T, hd)
        v = torch.cat([self.past[2 * layer + 1], v], dim=2)
        self.present += [k, v]
        return k.repeat_interleave(self.group, dim=1), v.repeat_interleave(self.group, dim=1)


class OnnxLM(nn.Module):
    """(input_ids, past) -> (logits, *present) with model.MobileLLM's own blocks."""

    def __init__(self, model: MobileLLM):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, past: list[torch.Tensor]):
        cfg = self.model.config
        T, P = input_ids.shape[1], past[0].shape[2]
        positions = torch.arange(T, device=input_ids.device) + P  # (T,)
        mask = torch.arange(P + T, device=input_ids.device)[None, :] <= positions[:, None]  # (T, P+T)
        cache = _PastCache(past, cfg.n_heads // cfg.n_kv_heads)
        hidden = self.model.hidden_states(input_ids, cache=cache, positions=positions, attn_mask=mask)
        return (F.linear(hidden, self.model.output_weight), *cache.present)  # logits (B, T, vocab), present


def io_names(n_logical: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(n_logical) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n_logical) for kv in ("key", "value")]
    return ["input_ids", *past], ["logits", *present]


def dedupe_initializers(graph) -> int:
    """Merge byte-identical constant tensors; returns how many were dropped.

    The exporter folds `Transpose(weight)` into a new constant at every use of a weight, so a block
    that runs at two logical layers would carry its attention matrices twice.
    """
    seen: dict[tuple, str] = {}
    rename: dict[str, str] = {}
    keep = []
    for tensor in graph.initializer:
        key = (tensor.data_type, tuple(tensor.dims), tensor.raw_data) if tensor.raw_data else None
        if key is not None and key in seen:
            rename[tensor.name] = seen[key]
            continue
        if key is not None:
            seen[key] = tensor.name
        keep.append(tensor)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return len(rename)


def export_onnx(model: MobileLLM, output: str | Path, *, quant: str = "fp32", stages: Stages | None = None) -> dict:
    stages = stages or Stages()
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise MobileLLMError("ONNX export needs the export extra: pip install 'mobilellm[export]'") from None
    if quant not in ONNX_QUANTS:
        raise MobileLLMError(f"--precision {quant!r} is not available for onnx; choose from {', '.join(ONNX_QUANTS)} "
                             "(quantize with onnxruntime's tools afterwards if needed)")
    if getattr(model, "quantization", None):
        from mobilellm import quantize as Q

        if any(isinstance(m, Q.QuantizedLinear) and m.dynamic_activations for m in model.modules()):
            raise MobileLLMError(f"ONNX export of {model.quantization['scheme']} (dynamic int8 activations) is "
                                 "not supported; export the float model directory or an int8 weight-only one")
        model = Q.float_modules(model)
    n_bytes = sum(p.numel() * 4 for p in model.parameters())
    if n_bytes >= PROTOBUF_LIMIT:
        raise MobileLLMError(f"model has {n_bytes / 2**30:.2f} GiB of float32 weights; a single-file ONNX model "
                             "must stay under 2 GiB: export a smaller model or use gguf/pte")
    cfg = model.config
    wrapper = OnnxLM(model).eval()
    B, T, P = 2, 3, 4  # example sizes; all three are dynamic in the graph
    past = [torch.zeros(B, cfg.n_kv_heads, P, cfg.attn_head_dim) for _ in range(2 * cfg.n_logical_layers)]
    batch, seq, past_len = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("past_len")
    dynamic = ({0: batch, 1: seq}, [{0: batch, 2: past_len} for _ in past])
    inputs, outputs = io_names(cfg.n_logical_layers)
    output = Path(output)
    with atomic_path(output) as tmp, torch.no_grad():
        stages(f"trace: torch.onnx.export of {cfg.n_logical_layers} logical layers (dynamic batch and lengths)")
        program = torch.onnx.export(wrapper, (torch.zeros(B, T, dtype=torch.long), past), dynamo=True,
                                    input_names=inputs, output_names=outputs, dynamic_shapes=dynamic,
                                    external_data=False, verbose=False)
        import onnx

        proto = program.model_proto
        stages("serialize: merging shared weights, writing the model")
        dedupe_initializers(proto.graph)
        onnx.save_model(proto, str(tmp))
    return {"format": "onnx", "quant": quant, "bytes": output.stat().st_size, "logical_layers": cfg.n_logical_layers}


class OnnxRunner:
    """Run the exported graph with onnxruntime; keeps the KV cache between calls (batch 1)."""

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.past_inputs = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.reset()

    def reset(self) -> None:
        import numpy as np

        self.past = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), dtype=np.float32) for i in self.past_inputs}

    def forward(self, tokens: list[int]) -> "numpy.ndarray":  # noqa: F821
        """Logits (T, vocab) for the next tokens of the sequence held in the cache."""
        import numpy as np

        feeds = {"input_ids": np.asarray([tokens], dtype=np.int64), **self.past}
        out = self.session.run(None, feeds)
        names = [o.name for o in self.session.get_outputs()]
        for name, value in zip(names[1:], out[1:]):
            self.past[name.replace("present.", "past_key_values.")] = value
        return out[0][0]
