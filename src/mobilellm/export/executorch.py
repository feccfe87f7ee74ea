"""ExecuTorch export: one `forward(tokens, input_pos)` method with a KV cache, lowered to XNNPACK.

The program holds the KV cache as mutable buffers, one key and one value buffer per *logical* layer,
written with `index_copy_` at `input_pos`; attention runs over the whole cache with a mask (keys at
positions <= the query's), so one method serves a dynamic-length prefill (T tokens at positions
0..T-1) and then one-token decode steps. A layer-shared model calls the same physical block at
several logical layers, so its weights are stored once in the program.

Quantized linears become torchao `IntxUnpackedToInt8Tensor` weights built from *our* integers and
scales (quantize.py follows torchao's numerics), which XNNPACK lowers to its int8-activation kernels.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mobilellm.errors import MobileLLMError
from mobilellm.export.stages import Stages
from mobilellm.fileio import atomic_path
from mobilellm.model import MobileLLM, RMSNorm

PTE_QUANTS = ("fp32", "w8a8", "8da4w")


class _BufferCache:
    """cache.update for model.Block inside the exported program: K/V buffers written at input_pos.

    Attention then runs over the whole cache (1, KV, max_len, hd), masked to the positions each query
    may see; _sdpa_as_bmm shares each key head among its query group without repeating the keys.
    """

    def __init__(self, program: "ExecuTorchLM", input_pos: torch.Tensor):
        self.program, self.input_pos = program, input_pos

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        k_cache, v_cache = getattr(self.program, f"k_cache_{layer}"), getattr(self.program, f"v_cache_{layer}")
        k_cache.index_copy_(2, self.input_pos, k)  # (1, KV, max_len, hd)
        v_cache.index_copy_(2, self.input_pos, v)
        return k_cache, v_cache


def _sdpa_as_bmm(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """scaled_dot_product_attention as the ops XNNPACK lowers with a dynamic token count: batched matmuls
    over (KV, group * T, hd) query rows, an additive mask and a softmax. torch's own decomposition adds
    ops XNNPACK has not (a repeat of the keys, a check for fully masked rows, scalar multiplies),
    each of which splits the graph into one more delegate. Every query sees its own key, so no row
    is fully masked. q (1, H, T, hd); k, v (1, KV, L, hd); attn_mask (T, L) additive."""
    _, n_heads, _, hd = q.shape
    n_kv, length = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(hd) if scale is None else scale
    # -1, not T: XNNPACK takes reshapes whose only unknown size is inferred, not symbolic ones
    q_rows = (q * scale).contiguous().view(n_kv, -1, hd)  # a group's heads are adjacent: (KV, group*T, hd)
    scores = torch.bmm(q_rows, k.view(n_kv, length, hd).transpose(1, 2))  # (KV, group*T, L)
    scores = (scores.view(n_kv, n_heads // n_kv, -1, length) + attn_mask).view(n_kv, -1, length)
    y = torch.bmm(torch.softmax(scores, dim=-1), v.view(n_kv, length, hd))  # (KV, group*T, hd)
    # the layout torch's SDPA returns, (1, T, H, hd) in memory, which Attention's reshape expects
    return y.view(1, n_heads, -1, hd).transpose(1, 2).contiguous().transpose(1, 2)


class _RMSNormByMatmul(nn.Module):
    """model.RMSNorm with the mean of squares as a product with a constant (1, dim) row of 1/dim:
    XNNPACK has no mean over the last axis of a 3-D tensor, and each op it lacks splits the graph."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps
        dim = norm.weight.shape[0]
        self.register_buffer("mean_row", torch.full((1, dim), 1.0 / dim), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(F.linear(x * x, self.mean_row) + self.eps))


class ExecuTorchLM(nn.Module):
    """forward(tokens (1, T) int64, input_pos (T,) int64) -> logits (1, T, vocab): model.MobileLLM's own
    blocks (a shared block is one module, called at each of its logical layers) over buffer caches."""

    def __init__(self, model: MobileLLM, max_len: int):
        super().__init__()
        cfg = model.config
        self.model = model
        cache_shape = (1, cfg.n_kv_heads, max_len, cfg.attn_head_dim)
        for layer in range(cfg.n_logical_layers):
            self.register_buffer(f"k_cache_{layer}", torch.zeros(cache_shape), persistent=False)
            self.register_buffer(f"v_cache_{layer}", torch.zeros(cache_shape), persistent=False)
        self.register_buffer("key_positions", torch.arange(max_len), persistent=False)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        visible = self.key_positions[None, :] <= input_pos[:, None]  # (T, max_len): causal over the cache
        # additive, made once: a boolean mask makes SDPA's decomposition test it again in every layer
        mask = torch.where(visible, 0.0, float("-inf"))
        hidden = self.model.hidden_states(tokens, cache=_BufferCache(self, input_pos), positions=input_pos,
                                          attn_mask=mask)
        return F.linear(hidden, self.model.output_weight)  # (1, T, vocab)


class _OneHotEmbedding(nn.Module):
    """Embedding lookup as one_hot(tokens) @ weight, so XNNPACK runs it from the same constant as the
    tied output matrix (`F.linear(hidden, weight)`): the delegate stores one tensor for both, where a
    plain `aten.embedding` keeps its own copy of the table outside the delegate. Exact: each output
    is one row times 1.0 plus zeros."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        vocab = torch.arange(self.weight.shape[0], device=tokens.device)
        return (tokens[..., None] == vocab).to(self.weight.dtype) @ self.weight  # (B, T, dim)


class _QuantizedLookup(nn.Module):
    """QuantizedEmbedding as ExecuTorch's quantized embedding kernels (int8 rows, or int4 packed
    two per byte, high nibble first, offset by 8), returning the same dequantized rows."""

    def __init__(self, emb):
        super().__init__()
        self.bits = emb.bits
        q = emb.weight_q
        if self.bits == 4:
            u = (q.to(torch.int16) + 8).to(torch.uint8)
            q = (u[:, 0::2] << 4) | u[:, 1::2]
        self.register_buffer("weight", q)
        self.register_buffer("scale", emb.weight_scale.clone())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.quantized_decomposed
        if self.bits == 4:
            return ops.embedding_4bit.default(self.weight, self.scale, None, -8, 7, tokens)
        return ops.embedding_byte.default(self.weight, self.scale, None, -128, 127, tokens)


def _torchao_linear(qlinear) -> nn.Linear:
    """Our QuantizedLinear -> nn.Linear whose weight is a torchao tensor with the same integers."""
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8Tensor,
        IntxUnpackedToInt8TensorActivationQuantization,
    )

    scale = qlinear.weight_scale  # (out, G)
    weight = IntxUnpackedToInt8Tensor(
        qdata=qlinear.weight_q,
        scale=scale.clone(),
        zero_point=torch.zeros(scale.shape, dtype=torch.int8),
        target_dtype=torch.int4 if qlinear.bits == 4 else torch.int8,
        block_size=(1, qlinear.group_size),
        dtype=torch.float32,
        activation_quantization=IntxUnpackedToInt8TensorActivationQuantization.INT8_ASYM_PER_TOKEN,
    )
    linear = nn.Linear(qlinear.in_features, qlinear.out_features, bias=False)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    return linear


# XNNPACK's preprocess runs its 17 graph passes on every delegate, each one re-tracing it: about half
# of the lowering time. These are the ones a decoder graph needs; the others rewrite ops that never
# occur in it (convolutions, batch norm, pooling, upsampling, PReLU, padding, long concatenations,
# channels-last layouts, SDPA patterns) and only cost their re-trace. The tests run every exported
# program against PyTorch, so a needed pass left out shows up there.
_XNNPACK_PASSES = ("XNNPACKRemoveCloneOpsTransform", "DimOrderOpsRevertPass", "ConvertToLinearPass", "ConstPropPass",
                   "FuseActivationPass", "RemoveRedundantCopyPass")


@contextlib.contextmanager
def _decoder_lowering():
    """While lowering: XNNPACK's default pass list is _XNNPACK_PASSES (an explicit list is kept), and
    ExecuTorch's decomposition table turns SDPA into _sdpa_as_bmm (in its own decomposition pass,
    not in one more of ours: each pass re-traces the whole graph)."""
    from executorch.backends.xnnpack import _passes, xnnpack_preprocess
    from executorch.exir.program import _program

    default_passes, default_table = xnnpack_preprocess.XNNPACKPassManager, _program._default_decomposition_table

    class DecoderPasses(default_passes):
        def __init__(self, exported_program, passes=None):
            super().__init__(exported_program, passes or [getattr(_passes, n) for n in _XNNPACK_PASSES])

    def decoder_table():
        return {**default_table(), torch.ops.aten.scaled_dot_product_attention.default: _sdpa_as_bmm}

    xnnpack_preprocess.XNNPACKPassManager, _program._default_decomposition_table = DecoderPasses, decoder_table
    try:
        yield
    finally:
        xnnpack_preprocess.XNNPACKPassManager, _program._default_decomposition_table = default_passes, default_table


def _decoder_partitioner():
    """XnnpackPartitioner without its per-node check of the ops it keeps whole (linear and the torchao
    quantization ops): every linear here has constant weights, which XNNPACK takes, and without the
    check ExecuTorch decomposes the graph once instead of twice (a whole-graph re-trace each)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    class DecoderPartitioner(XnnpackPartitioner):
        def ops_to_not_decompose(self, ep):
            return super().ops_to_not_decompose(ep)[0], None

    return DecoderPartitioner()


def check_pte_quant(model: MobileLLM, quant: str) -> None:
    """Reject scheme combinations a .pte cannot hold (before any heavy import)."""
    if quant not in PTE_QUANTS:
        raise MobileLLMError(f"--quant {quant!r} is not available for pte; choose from {', '.join(PTE_QUANTS)}")
    existing = getattr(model, "quantization", None)
    if existing:
        if quant not in ("fp32", existing["scheme"]):
            raise MobileLLMError(f"model directory is already quantized with {existing['scheme']}; "
                                 f"export it with --quant {existing['scheme']} or start from its float model")
        if existing["scheme"] == "int8":
            raise MobileLLMError("int8 weight-only has no XNNPACK kernel in ExecuTorch; quantize with "
                                 "--scheme w8a8 or 8da4w for .pte")


def prepare_for_pte(model: MobileLLM, quant: str, group_size: int = 32, embedding: str = "none") -> MobileLLM:
    """Quantize (if asked) with our numerics, then swap modules for ones torch.export + XNNPACK lower."""
    from mobilellm import quantize as Q

    check_pte_quant(model, quant)
    if not getattr(model, "quantization", None) and quant != "fp32":
        Q.quantize_model(model, quant, group_size=group_size, embedding=embedding)
    emb = model.embed_tokens
    if isinstance(emb, Q.QuantizedEmbedding):
        import executorch.kernels.quantized  # noqa: F401  registers quantized_decomposed.embedding_*

        if model.lm_head is None:  # tied: the output matrix is the same integers, as an int8-activation linear
            model.lm_head = Q.QuantizedLinear(emb.weight_q, emb.weight_scale, emb.bits, dynamic_activations=True)
        model.embed_tokens = _QuantizedLookup(emb)
    elif model.lm_head is None:  # tied float table: one constant for the lookup and the logits
        model.embed_tokens = _OneHotEmbedding(emb.weight)
    for name, mod in list(model.named_modules()):  # int8-activation linears: torchao tensors XNNPACK lowers
        if isinstance(mod, Q.QuantizedLinear):
            Q.set_module(model, name, _torchao_linear(mod))
        elif isinstance(mod, RMSNorm):
            Q.set_module(model, name, _RMSNormByMatmul(mod))
    return model


def pte_embedding(model: MobileLLM, quant: str, embedding: str | None) -> str:
    """The embedding (= tied output matrix) setting of a .pte: a quantized directory's own; for a float
    model `embedding`, by default int4 with 8da4w (ExecuTorch's 8da4w recipe) and float otherwise."""
    from mobilellm.quantize import EMBEDDING_MODES

    existing = getattr(model, "quantization", None)
    if existing:
        own = existing.get("embedding", "none")
        if embedding not in (None, own):
            raise MobileLLMError(f"model directory is already quantized with --embedding {own}; "
                                 f"export it as it is or start from its float model")
        return own
    if embedding is None:
        return "int4" if quant == "8da4w" else "none"
    if embedding not in EMBEDDING_MODES:
        raise MobileLLMError(f"unknown --embedding {embedding!r}; choose from {', '.join(EMBEDDING_MODES)}")
    if quant == "fp32" and embedding != "none":
        raise MobileLLMError("--embedding int8/int4 needs a quantized --precision (w8a8 or 8da4w) for pte")
    return embedding


def export_pte(model: MobileLLM, output: str | Path, *, quant: str = "fp32", group_size: int = 32,
               embedding: str | None = None, max_len: int | None = None, stages: Stages | None = None) -> dict:
    """Lower to XNNPACK and write the .pte atomically; returns a summary dict. embedding: see pte_embedding."""
    stages = stages or Stages()
    check_pte_quant(model, quant)
    embedding = pte_embedding(model, quant, embedding)
    max_len = max_len or model.config.max_seq_len
    if max_len < 2:
        raise MobileLLMError("--max-len must be at least 2")
    try:
        from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower
    except ImportError:
        raise MobileLLMError("ExecuTorch export needs the export extra: pip install 'mobilellm[export]'") from None
    if quant != "fp32" and not getattr(model, "quantization", None):
        stages(f"quantize: {quant}" + (f", groups of {group_size}" if quant == "8da4w" else "")
               + f", embedding {embedding}")
    model = prepare_for_pte(model, quant, group_size, embedding)
    wrapper = ExecuTorchLM(model, max_len).eval()
    cfg = model.config
    with torch.no_grad():  # with grad on, to_executorch fails on the in-place cache writes
        for p in wrapper.parameters():
            p.requires_grad_(False)
        stages(f"trace: torch.export of {cfg.n_logical_layers} logical layers, KV cache {max_len} tokens")
        seq = torch.export.Dim("seq", min=1, max=max_len - 1)
        example = (torch.zeros(1, 2, dtype=torch.long), torch.arange(2))
        ep = torch.export.export(wrapper, example, dynamic_shapes=({1: seq}, {0: seq}), strict=False)
        stages("lower: XNNPACK partitioning and lowering")
        # IR validity re-checks every edge op; torch.export already checked the graph (~15% of lowering).
        # Dim-order ops: one more whole-graph pass (~15%) for layouts this graph never changes.
        config = EdgeCompileConfig(_check_ir_validity=False, _skip_dim_order=True)
        with _decoder_lowering():
            lowered = to_edge_transform_and_lower(ep, partitioner=[_decoder_partitioner()], compile_config=config)
        stages("serialize: ExecuTorch program")
        program = lowered.to_executorch()
    output = Path(output)
    stages(f"write: {len(program.buffer) / 2**20:.1f} MiB")
    with atomic_path(output) as tmp:
        tmp.write_bytes(program.buffer)
    return {"format": "pte", "quant": quant, "embedding": embedding, "max_len": max_len, "bytes": output.stat().st_size,
            "logical_layers": cfg.n_logical_layers, "physical_blocks": cfg.n_layers}


class PteRunner:
    """Run a .pte from the ExecuTorch Python runtime: prefill, then one token per call."""

    def __init__(self, path: str | Path, threads: int | None = None):
        import executorch.kernels.quantized  # noqa: F401  the quantized embedding kernels
        from executorch.runtime import Runtime

        if threads:
            from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

            _unsafe_reset_threadpool(threads)
        self.program = Runtime.get().load_program(Path(path))
        self.method = self.program.load_method("forward")

    def forward(self, tokens: list[int], start: int) -> torch.Tensor:
        """Logits (T, vocab) for tokens at positions [start, start + T)."""
        t = torch.tensor([tokens], dtype=torch.long)
        pos = torch.arange(start, start + len(tokens), dtype=torch.long)
        return self.method.execute([t, pos])[0][0]
