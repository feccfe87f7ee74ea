"""KV-cache text generation on CPU, and the `mobilellm generate` command.

Bottom-up:
  SamplingParams          what a caller asks for: greedy / temperature / top-k / top-p / repetition
                          penalty / seed / stop tokens / stop strings / max new tokens
  next_token              one row of logits -> one token id
  IncrementalDetokenizer  token ids -> text deltas that never end inside a UTF-8 character or a
                          partial byte-level token
  StopStrings             holds back text that may turn out to be the start of a stop string
  InferenceModel          the network rearranged for CPU inference: fused projections, a RoPE table,
                          weights in the decode precision (fp32 / bf16 / fp16 / int8)
  Engine                  a preallocated KV cache with one row per concurrent sequence (and, from
                          model.KVCache, one slot per *logical* layer); prefill one prompt into a free
                          row, then decode every active row together in one forward per token.
                          `generate` (offline batch) and `stream` (one prompt) drive it here; the
                          server drives the same `submit / step / cancel` loop from a background thread.

Context policy: a prompt must leave room for at least one new token (prompt tokens < context), or
`Engine.make_request` raises MobileLLMError; generation stops with finish_reason "length" when the
sequence reaches the context (`max_seq_len`, or the smaller `max_len` given to the engine).
"""

from __future__ import annotations

import functools
import itertools
import math
import random
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from mobilellm.errors import MobileLLMError
from mobilellm.model import KVCache, MobileLLM, rope_cos_sin

WEIGHT_MODES = ("fp32", "bf16", "fp16", "int8")
BACKENDS = ("auto", "native", "torch")  # auto: native (mobilellm.native) where it builds, else torch
MAX_STOP_STRINGS = 16

# ---- sampling ---------------------------------------------------------------------------------


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off; CTRL/HF style, over prompt and generated tokens
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings: not included in the text
    stop_token_ids: list[int] = field(default_factory=list)  # in addition to the tokenizer's EOS
    ignore_eos: bool = False

    def validate(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise MobileLLMError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise MobileLLMError(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise MobileLLMError(f"top_k must be a non-negative integer, got {self.top_k!r}")
        if not (0 < self.top_p <= 1):
            raise MobileLLMError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise MobileLLMError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if len(self.stop) > MAX_STOP_STRINGS or any(not isinstance(s, str) or not s for s in self.stop):
            raise MobileLLMError(f"stop must be at most {MAX_STOP_STRINGS} non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def next_token(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> int:
    """Pick a token from one row of logits (V,): repetition penalty -> temperature -> top-k -> top-p."""
    logits = logits.float()
    if params.repetition_penalty != 1.0 and seen is not None:
        penalised = torch.where(logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if params.greedy:
        return int(logits.argmax())
    logits = logits / params.temperature
    if 0 < params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= params.top_p  # keep the smallest set reaching top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, -math.inf))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


# ---- text: incremental detokenization and stop strings ----------------------------------------


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Decodes a short window of recent tokens, not the whole sequence, and emits only once the window
    no longer ends in U+FFFD, i.e. once a multi-byte character split over byte-level tokens is
    complete. `context` (the prompt's last tokens) gives SentencePiece the left context it needs to
    keep a leading space on the first generated word.
    """

    CONTEXT_TOKENS = 6

    def __init__(self, tokenizer, context: list[int] = ()):
        self.tokenizer = tokenizer
        self.ids = list(context[-self.CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special=True)

    def push(self, token: int) -> str:
        self.ids.append(token)
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return new_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """Whatever is held back at the end of generation (an incomplete character decodes as U+FFFD)."""
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text):]


class StopStrings:
    """Accumulates text; releases only what cannot be the start of a stop string."""

    def __init__(self, stops: list[str]):
        self.stops = list(stops)
        self.text = ""  # everything decoded so far (up to a stop string once found)
        self.released = 0  # chars of `text` handed out
        self.hit = False

    def push(self, delta: str) -> str:
        if self.hit:
            return ""
        search_from = max(0, len(self.text) - max((len(s) for s in self.stops), default=0) + 1)
        self.text += delta
        if self.stops:
            found = [i for i in (self.text.find(s, search_from) for s in self.stops) if i >= 0]
            if found:
                self.text = self.text[:min(found)]
                self.hit = True
                return self._release(len(self.text))
            return self._release(len(self.text) - self._held_back())
        return self._release(len(self.text))

    def _held_back(self) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best

    def flush(self) -> str:
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        out = self.text[self.released:upto]
        self.released = max(self.released, upto)
        return out


# ---- requests --------------------------------------------------------------------------------


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS, stop token or stop string) or "length"
    prompt_tokens: int


class Request:
    """One sequence being generated: its row in the cache, its sampler state and its text state."""

    _ids = itertools.count()

    def __init__(self, prompt_ids: list[int], params: SamplingParams, tokenizer, stop_ids: set[int]):
        self.id = next(self._ids)
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.stop_ids = stop_ids
        self.output_ids: list[int] = []
        self.row = -1
        self.length = 0  # tokens already in the cache row
        self.finish_reason: str | None = None
        self.cancelled = False
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        self.generator = None if params.greedy else torch.Generator().manual_seed(seed)
        self.seen: torch.Tensor | None = None  # (V,) bool, tokens seen, for the repetition penalty
        self.detok = IncrementalDetokenizer(tokenizer, self.prompt_ids) if tokenizer is not None else None
        self.stops = StopStrings(params.stop)
        self.new_text = ""  # delta produced by the last step, for streaming consumers

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return self.stops.text if self.finished else self.stops.text[:self.stops.released]

    def completion(self) -> Completion:
        return Completion(self.stops.text, list(self.output_ids), self.finish_reason or "length",
                          len(self.prompt_ids))


# ---- the engine --------------------------------------------------------------------------------


class _RowCache:
    """cache.update for a prefill into one row of the shared cache (what KVCache.update does for all rows)."""

    def __init__(self, cache: KVCache, row: int):
        self.k, self.v = cache.k[:, row:row + 1], cache.v[:, row:row + 1]  # views: (L, 1, KV, S, hd)

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class _DecodeCache:
    """cache.update for one decode step of rows [0, n): each row writes its new K/V at its own length."""

    def __init__(self, cache: KVCache):
        self.cache = cache
        self.n = 1
        self.kv_len = 1
        self.rows = torch.arange(cache.k.shape[1])
        self.cols = torch.zeros(cache.k.shape[1], dtype=torch.long)
        self.same_col: int | None = None  # all rows write the same column: a plain slice write
        self.k_layers, self.v_layers = list(cache.k.unbind(0)), list(cache.v.unbind(0))  # views, one per layer

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        # narrow() rather than [..] indexing: this runs twice per layer per token, where Python-level
        # indexing costs as much as the copy itself
        n, S = self.n, self.kv_len
        kl, vl = self.k_layers[layer].narrow(0, 0, n), self.v_layers[layer].narrow(0, 0, n)  # (n, KV, max_len, hd)
        if self.same_col is not None:
            kl.narrow(2, self.same_col, 1).copy_(k)
            vl.narrow(2, self.same_col, 1).copy_(v)
        else:  # (n, KV, 1, hd) -> scattered to (row r, column cols[r])
            kl[self.rows[:n], :, self.cols[:n]] = k[:, :, 0]
            vl[self.rows[:n], :, self.cols[:n]] = v[:, :, 0]
        return kl.narrow(2, 0, S), vl.narrow(2, 0, S)


class _StaticDecodeCache:
    """cache.update for the compiled decode step: fixed shapes, every row sees the whole cache (masked).

    Row r writes its new K/V at column positions[r] (a row's position is its length), so one graph
    serves every step instead of one per cache length.
    """

    def __init__(self, cache: KVCache, positions: torch.Tensor):
        self.cache, self.positions = cache, positions  # positions: the engine's (max_batch, 1) buffer

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        n = k.shape[0]
        rows, cols = torch.arange(n, device=k.device), self.positions[:n, 0]
        self.cache.k[layer, rows, :, cols] = k[:, :, 0]
        self.cache.v[layer, rows, :, cols] = v[:, :, 0]
        return self.cache.k[layer, :n], self.cache.v[layer, :n]  # (n, KV, max_len, hd)


def _onednn_available(dtype: torch.dtype) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _linear(weight: torch.Tensor, weights: str, prepack: bool = True):
    """(x -> x @ weight.T, x, r -> r + x @ weight.T, bytes) in the decode precision.

    fp32 / bf16: oneDNN with the weight reordered once into its blocked layout (about twice the
    speed of the default BLAS call for one-row matrix products on some CPUs, e.g. AMD EPYC), with the
    residual add fused into the same call; a plain matmul where oneDNN is missing or prepack=False
    (torch.compile cannot take reordered weights: it packs them itself). fp16 / int8:
    fbgemm's dynamic kernels (the ones torch.ao's quantize_dynamic installs): fp16 weights, or int8
    weights with one scale per output channel and activations quantized per call; both return fp32.
    """
    if weights in ("fp32", "bf16"):
        dtype = torch.bfloat16 if weights == "bf16" else torch.float32
        w = weight.detach().to(dtype).contiguous()
        nbytes = w.numel() * w.element_size()
        if prepack and _onednn_available(dtype):
            packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)  # blocked layout, tuned for one row
            pointwise = torch.ops.mkldnn._linear_pointwise
            return (lambda x: pointwise(x, packed, None, "none", [], ""),
                    lambda x, r: pointwise.binary(x, r, packed, None, "add"), nbytes)
        return functools.partial(F.linear, weight=w), lambda x, r: r + F.linear(x, w), nbytes
    import warnings

    from torch.ao.quantization import float16_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(weight.detach().float(), requires_grad=False)
    qconfig, dtype = ((per_channel_dynamic_qconfig, torch.qint8) if weights == "int8"
                      else (float16_dynamic_qconfig, torch.float16))
    with warnings.catch_warnings():  # torch marks the quantized tensor API deprecated; it is the fastest here
        warnings.simplefilter("ignore")
        quantized = quantize_dynamic(nn.Sequential(lin), {nn.Linear: qconfig}, dtype=dtype)[0]
    packed = quantized._packed_params._packed_params
    nbytes = weight.numel() * (1 if weights == "int8" else 2)
    if weights == "int8":
        fn = functools.partial(torch.ops.quantized.linear_dynamic, W_prepack=packed, reduce_range=True)
    else:
        fn = functools.partial(torch.ops.quantized.linear_dynamic_fp16, W_prepack=packed)
    return fn, lambda x, r: r + fn(x), nbytes


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:  # one call; the same op order and result as model.RMSNorm in fp32
        return F.rms_norm(x, weight.shape, weight, eps)
    x32 = x.float()  # same op order as model.RMSNorm
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _interleave_rope_rows(w: torch.Tensor, heads: int, hd: int) -> torch.Tensor:
    """Reorder each head's output rows from rotate-half pairs (i, i + hd/2) to adjacent pairs (2i, 2i+1).

    RoPE then is one complex multiplication. Attention scores q.k are unchanged because queries and
    keys are permuted alike; only the engine's own KV cache sees the new order.
    """
    order = torch.arange(hd).view(2, hd // 2).t().reshape(-1)  # 0, hd/2, 1, hd/2 + 1, ...
    return w.view(heads, hd, -1)[:, order].reshape(w.shape)


def fused_block_weights(block, cfg, consume: bool = False) -> tuple[torch.Tensor, ...]:
    """(q|k|v, o, gate|up or up, down) weights of one block, as both engine backends hold them.

    q and k rows are reordered for RoPE on adjacent pairs (_interleave_rope_rows), so a prefill by
    either backend leaves the same KV cache. consume=True empties the block's Linear weights (the
    caller gives the model up): the returned tensors are then the only references left.
    """
    attn, mlp = block.self_attn, block.mlp
    H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.attn_head_dim
    qkv = torch.cat([_interleave_rope_rows(attn.q_proj.weight, H, hd),
                     _interleave_rope_rows(attn.k_proj.weight, KV, hd), attn.v_proj.weight]).detach()
    up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]) if cfg.ffn_type == "swiglu" else mlp.up_proj.weight
    weights = (qkv, attn.o_proj.weight.detach(), up.detach(), mlp.down_proj.weight.detach())
    if consume:
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, *mlp.children()):
            lin.weight = nn.Parameter(torch.empty(0), requires_grad=False)
    return weights


class InferenceModel:
    """The network of model.MobileLLM rearranged for CPU inference; same math, fewer and larger ops.

    * q|k|v and gate|up are fused: 4 matmuls per block instead of 7, the residual adds fused into
      the output projections where the backend allows;
    * RoPE is one complex multiplication over the queries and keys together (see
      _interleave_rope_rows), with the rotation table computed once and indexed by position;
    * weights are held in the decode precision (fp32, bf16, fp16 or int8, see _linear);
    * logits are computed only where asked (the last prompt position in prefill).
    Per decoded token that is about 20 calls per layer instead of about 55: at batch 1 on a CPU,
    the time between kernels is as large as the kernels. Layer sharing runs through `schedule` like
    the model: one physical block per logical layer, and the KV cache has one slot per logical
    layer. Tests compare it with transformers token for token.
    """

    def __init__(self, model: MobileLLM, weights: str = "fp32", max_len: int | None = None, consume: bool = False,
                 prepack: bool = True):
        """consume=True empties the model's Linear weights as they are converted (the caller gives the
        model up), so peak memory holds one extra block instead of a second copy of the network.
        prepack=False keeps plain weight tensors (for torch.compile)."""
        if weights not in WEIGHT_MODES:
            raise MobileLLMError(f"unknown weight mode {weights!r}; choose from {', '.join(WEIGHT_MODES)}")
        cfg = model.config
        self.config, self.schedule, self.weights = cfg, list(model.schedule), weights
        self.dtype = torch.bfloat16 if weights == "bf16" else torch.float32
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.attn_head_dim
        self.eps = cfg.norm_eps
        self.nbytes = 0
        # copies (copy=True): a view of a loaded model's tensor keeps the whole weights file mapped
        self.embed = model.embed_tokens.weight.detach().to(self.dtype, copy=True)
        self.norm = model.norm.weight.detach().to(self.dtype, copy=True)
        self.blocks = []
        with torch.no_grad():
            for block in model.layers:
                qkv, o, up, down = fused_block_weights(block, cfg, consume)
                qkv_proj, _, n1 = _linear(qkv, weights, prepack)
                _, o_add, n2 = _linear(o, weights, prepack)
                up_proj, _, n3 = _linear(up, weights, prepack)
                _, down_add, n4 = _linear(down, weights, prepack)
                del qkv, o, up, down
                self.nbytes += n1 + n2 + n3 + n4
                ln1 = block.input_layernorm.weight.detach().to(self.dtype, copy=True)
                ln2 = block.post_attention_layernorm.weight.detach().to(self.dtype, copy=True)
                self.blocks.append((ln1, ln2, qkv_proj, o_add, up_proj, down_add))
            self.head, _, head_bytes = _linear(model.output_weight, weights, prepack)
        shared_head = cfg.tie_embeddings and weights in ("fp32", "bf16")  # same storage as the embedding
        norms = (2 * len(self.blocks) + 1) * cfg.dim
        self.nbytes += (self.embed.numel() + norms) * self.embed.element_size() + (0 if shared_head else head_bytes)
        length, hd = max_len or cfg.max_seq_len, self.hd
        cos, sin = rope_cos_sin(torch.arange(length), hd, cfg.rope_theta)  # (max_len, hd): two equal halves
        self.rotation = torch.complex(cos[:, :hd // 2], sin[:, :hd // 2])  # (max_len, hd/2) complex64

    def forward(self, tokens: torch.Tensor, cache, positions: torch.Tensor, mask: torch.Tensor | None = None,
                is_causal: bool = False, last_only: bool = False) -> torch.Tensor:
        """Logits (n, T or 1, V) fp32. tokens (n, T); positions (T,) or (n, T) index the RoPE table;
        cache.update(layer, 0, k, v) stores the new K/V and returns all keys/values to attend to."""
        n, T = tokens.shape
        H, KV, hd = self.n_heads, self.n_kv, self.hd
        rotation = self.rotation[positions].unsqueeze(-2)  # (T, 1, hd/2) or (n, T, 1, hd/2): over heads
        x = F.embedding(tokens, self.embed)  # (n, T, dim)
        swiglu = self.config.ffn_type == "swiglu"
        for layer, b in enumerate(self.schedule):
            ln1, ln2, qkv_proj, o_add, up_proj, down_add = self.blocks[b]
            qkv = qkv_proj(_rms_norm(x, ln1, self.eps))  # (n, T, (H + 2 KV) hd)
            qk = torch.view_as_complex(qkv[..., :(H + KV) * hd].float().view(n, T, H + KV, hd // 2, 2))
            qk = torch.view_as_real(qk * rotation).flatten(-2).to(qkv.dtype)  # (n, T, H + KV, hd), rotated
            q, k = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2)  # (n, H, T, hd), (n, KV, T, hd)
            v = qkv[..., (H + KV) * hd:].view(n, T, KV, hd).transpose(1, 2)  # (n, KV, T, hd)
            k, v = cache.update(layer, 0, k, v)  # (n, KV, S, hd)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                               enable_gqa=H != KV)  # (n, H, T, hd)
            x = o_add(y.transpose(1, 2).reshape(n, T, H * hd), x)
            h = up_proj(_rms_norm(x, ln2, self.eps))  # (n, T, 2 ffn) or (n, T, ffn)
            if swiglu:
                gate, up = h.chunk(2, dim=-1)
                h = F.silu(gate) * up
            else:
                h = F.relu(h)
            x = down_add(h, x)
        if last_only:
            x = x[:, -1:]
        return self.head(_rms_norm(x, self.norm, self.eps)).float()


class Engine:
    """Prefill + batched KV-cache decoding over a fixed number of cache rows ("slots").

    A waiting request is prefilled alone into a free row (no padding, positions 0..P-1), then joins
    the decode batch: every step feeds each active row's last token at its own position, writes its
    K/V at its own column and masks out columns past its own length. Rows are independent, so a
    request gets the same tokens whether it runs alone or beside others.
    """

    def __init__(self, model: MobileLLM, tokenizer=None, *, max_batch: int = 1, max_len: int | None = None,
                 weights: str = "fp32", compile: bool = False, threads: int | None = None, consume: bool = False,
                 backend: str = "auto"):
        if not isinstance(max_batch, int) or max_batch < 1:
            raise MobileLLMError(f"max_batch must be a positive integer, got {max_batch!r}")
        self.config = model.config
        self.tokenizer = tokenizer
        self.weights = weights
        if threads:
            torch.set_num_threads(threads)
        self.max_len = min(max_len or self.config.max_seq_len, self.config.max_seq_len)
        self.max_batch = max_batch
        self.backend = _choose_backend(backend, compile)
        if self.backend == "native":
            from mobilellm.native import NativeNet

            self.cache = KVCache(self.config, max_batch, self.max_len, device="cpu")
            self.net = NativeNet(model, weights, self.cache, consume)  # keeps no `model`
        else:  # the torch backend's decode state (the native one keeps its own in C)
            self.net = InferenceModel(model, weights, self.max_len, consume, prepack=not compile)
            cache_dtype = torch.bfloat16 if weights == "bf16" else torch.float32
            self.cache = KVCache(self.config, max_batch, self.max_len, device="cpu", dtype=cache_dtype)
            self._decode_cache = _DecodeCache(self.cache)
            self._cols = torch.arange(self.max_len)  # key columns, for building decode masks
            self._tokens = torch.zeros(max_batch, 1, dtype=torch.long)  # decode inputs, reused every step
            self._positions = torch.zeros(max_batch, 1, dtype=torch.long)
            self.compiled = compile
            self._step_fn = self._forward_decode
            if compile:
                self._static_cache = _StaticDecodeCache(self.cache, self._positions)
                self._step_fn = torch.compile(self._forward_decode_static, dynamic=False)
        self.rows: list[Request | None] = [None] * max_batch
        self.waiting: deque[Request] = deque()
        self._lock = threading.Lock()  # guards `waiting` and cancellation flags across threads
        self.eos_ids = self._eos_ids()
        self.stats = {"requests": 0, "cancelled": 0, "generated_tokens": 0, "peak_batch": 0}
        self.last: Completion | None = None  # set by stream()

    # ---- sizes ----------------------------------------------------------------------------------
    def weight_bytes(self) -> int:
        """Bytes of weights as held for decoding (an fp32/bf16 tied output matrix is the embedding)."""
        return self.net.nbytes

    def cache_bytes(self) -> int:
        return self.cache.nbytes()

    def _eos_ids(self) -> set[int]:
        ids = set()
        tok_eos = getattr(self.tokenizer, "eos_id", None)
        for i in (tok_eos, self.config.eos_token_id):
            if isinstance(i, int) and i >= 0:
                ids.add(i)
        return ids

    # ---- requests -------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise MobileLLMError("this model directory has no tokenizer; add tokenizer files or pass token ids")
        return list(self.tokenizer.encode(text, bos=bool(getattr(self.tokenizer, "add_bos", False))))

    def check_prompt(self, prompt_ids: list[int]) -> None:
        if not prompt_ids:
            raise MobileLLMError("empty prompt: give at least one token (or enable BOS in the tokenizer)")
        if len(prompt_ids) >= self.max_len:
            raise MobileLLMError(
                f"prompt has {len(prompt_ids)} tokens but the context is {self.max_len}: "
                "shorten the prompt (at least one token must fit after it)"
            )
        bad = [t for t in prompt_ids if not (0 <= t < self.config.vocab_size)]
        if bad:
            raise MobileLLMError(f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})")

    def make_request(self, prompt: str | list[int], params: SamplingParams) -> Request:
        params.validate()
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.check_prompt(ids)
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_ids)
        return Request(ids, params, self.tokenizer, stop_ids)

    def submit(self, request: Request) -> Request:
        with self._lock:
            self.waiting.append(request)
            self.stats["requests"] += 1
        return request

    def cancel(self, request: Request) -> None:
        """Thread-safe: the request's row is freed at the start of the next step."""
        with self._lock:
            request.cancelled = True

    @property
    def active(self) -> list[Request]:
        return [r for r in self.rows if r is not None]

    def has_work(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.rows)

    # ---- one scheduler step -----------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Request]:
        """Admit waiting requests into free rows (prefill), then one decode step for all active rows.

        Returns the requests that produced text or finished in this step (their `new_text` is set).
        """
        events: list[Request] = []
        with self._lock:
            cancelled = [r for r in list(self.rows) + list(self.waiting) if r is not None and r.cancelled]
            for req in cancelled:
                self._finish(req, "cancelled")
                events.append(req)
            self.waiting = deque(r for r in self.waiting if not r.cancelled)
            admitted = []
            while self.waiting and None in self.rows:
                req = self.waiting.popleft()
                req.row = self.rows.index(None)
                self.rows[req.row] = req
                admitted.append(req)
        decoding = [r for r in self.rows if r is not None and r not in admitted]
        for req in admitted:
            logits = self._prefill(req)
            self._accept(req, logits)
            events.append(req)
        if decoding:
            self.stats["peak_batch"] = max(self.stats["peak_batch"], len(decoding))
            logits = self._decode(decoding)  # (len(decoding), V)
            for req, row_logits in zip(decoding, logits):
                self._accept(req, row_logits)
                events.append(req)
        for req in events:
            if req.finished and req.row >= 0 and self.rows[req.row] is req:
                self.rows[req.row] = None
        return events

    def _prefill(self, req: Request) -> torch.Tensor:
        ids, P = req.prompt_ids, len(req.prompt_ids)
        if self.backend == "native":
            from mobilellm.native import PREFILL_CHUNK

            for start in range(0, P, PREFILL_CHUNK):  # causal across chunks: earlier ones are in the cache
                chunk = ids[start:start + PREFILL_CHUNK]
                last = start + len(chunk) == P
                logits = self.net.forward(chunk, [req.row] * len(chunk), list(range(start, start + len(chunk))),
                                          [len(chunk) - 1] if last else [])
            logits = logits[0]
        else:
            logits = self.net.forward(torch.tensor([ids]), _RowCache(self.cache, req.row), torch.arange(P),
                                      is_causal=P > 1, last_only=True)[0, 0]  # only the last position's logits
        req.length = P
        if req.params.repetition_penalty != 1.0:
            req.seen = torch.zeros(self.config.vocab_size, dtype=torch.bool)
            req.seen[torch.tensor(ids)] = True
        return logits

    def _decode(self, decoding: list[Request]) -> torch.Tensor:
        """Logits (len(decoding), V) for one decode step of every decoding request, in that order."""
        if self.backend == "native":
            logits = self.net.forward([r.output_ids[-1] for r in decoding], [r.row for r in decoding],
                                      [r.length for r in decoding], list(range(len(decoding))))
            for req in decoding:
                req.length += 1
            return logits
        return self._decode_torch(decoding)[[r.row for r in decoding]]

    def _decode_torch(self, decoding: list[Request]) -> torch.Tensor:
        n = max(r.row for r in decoding) + 1  # rows [0, n) run; the others among them compute harmlessly:
        cols, tokens = [0] * n, [0] * n  # a free row writes garbage at its column 0 (a prefill overwrites it),
        for row, req in enumerate(self.rows[:n]):  # a row prefilled in this step at its next free column
            if req is not None:
                cols[row] = req.length
        for req in decoding:
            tokens[req.row] = req.output_ids[-1]
        dc = self._decode_cache
        dc.n, dc.kv_len = n, max(cols) + 1
        if n == 1:
            self._tokens[0, 0] = tokens[0]
            self._positions[0, 0] = cols[0]
        else:
            self._tokens[:n, 0] = torch.tensor(tokens)
            self._positions[:n, 0] = dc.cols[:n] = torch.tensor(cols)
        if self.compiled:
            logits = self._step_fn(self._tokens[:n])
        else:
            dc.same_col = cols[0] if all(c == cols[0] for c in cols) else None
            # one query per row; when every row is at the same length all cached keys are visible: no mask
            mask = None
            if dc.same_col is None:
                mask = (self._cols[:dc.kv_len][None, :] <= dc.cols[:n, None])[:, None, None]  # (n, 1, 1, S)
            logits = self._step_fn(self._tokens[:n], self._positions[:n], mask)  # (n, V)
        for req in decoding:
            req.length += 1
        return logits

    def _forward_decode(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.net.forward(tokens, self._decode_cache, positions, mask)[:, 0]  # (n, V)

    def _forward_decode_static(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[0]
        positions = self._positions[:n]  # (n, 1)
        mask = (self._cols[None, :] <= positions)[:, None, None]  # (n, 1, 1, max_len)
        return self.net.forward(tokens, self._static_cache, positions, mask)[:, 0]  # (n, V)

    def _accept(self, req: Request, logits: torch.Tensor) -> None:
        """Sample the next token of `req`, update its text and decide whether it is finished."""
        token = next_token(logits, req.params, req.seen, req.generator)
        req.output_ids.append(token)
        self.stats["generated_tokens"] += 1
        if req.seen is not None:
            req.seen[token] = True
        delta = ""
        if token in req.stop_ids:  # EOS or a stop token: finished, and its text is not part of the output
            req.finish_reason = "stop"
        elif req.detok is not None:
            delta = req.stops.push(req.detok.push(token))
            if req.stops.hit:
                req.finish_reason = "stop"
        if req.finish_reason is None and (len(req.output_ids) >= req.params.max_new_tokens
                                          or req.length + 1 >= self.max_len):  # the context is full
            req.finish_reason = "length"
        if req.finish_reason is not None and req.detok is not None and not req.stops.hit:
            delta += req.stops.push(req.detok.flush())  # text held back for an incomplete character
            delta += req.stops.flush()  # text held back for a possible stop string
        req.new_text = delta

    def _finish(self, req: Request, reason: str) -> None:
        req.finish_reason = reason
        req.new_text = ""
        if req.row >= 0 and self.rows[req.row] is req:
            self.rows[req.row] = None
        self.stats["cancelled"] += reason == "cancelled"

    # ---- drivers ------------------------------------------------------------------------------------
    def generate(self, prompts: Iterable[str | list[int]], params: SamplingParams) -> list[Completion]:
        """Generate for many prompts, `max_batch` at a time (same tokens as one by one)."""
        requests = [self.make_request(p, params) for p in prompts]  # all checked before any runs
        for r in requests:
            self.submit(r)
        while self.has_work():
            self.step()
        return [r.completion() for r in requests]

    def stream(self, prompt: str | list[int], params: SamplingParams) -> Iterator[str]:
        """Yield text deltas for one prompt as they are produced; `.last` holds the Completion after."""
        req = self.submit(self.make_request(prompt, params))
        try:
            while not req.finished:
                for r in self.step():
                    if r is req and r.new_text:
                        yield r.new_text
        finally:
            if not req.finished:  # the consumer stopped early
                self.cancel(req)
                self.step()
        self.last = req.completion()


# ---- loading ------------------------------------------------------------------------------------


def _choose_backend(backend: str, compile: bool) -> str:
    """"native" or "torch" for Engine(backend=...): auto takes native unless it cannot be built here."""
    if backend not in BACKENDS:
        raise MobileLLMError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if compile:  # torch.compile optimizes the PyTorch forward pass
        if backend == "native":
            raise MobileLLMError("--compile applies to the torch backend; drop it or use --backend torch")
        return "torch"
    if backend == "torch":
        return "torch"
    from mobilellm.native import NativeUnavailable, library

    try:
        library()
    except NativeUnavailable as exc:
        if backend == "native":
            raise
        _warn_once(f"mobilellm: using the torch backend ({exc})")
        return "torch"
    return "native"


@functools.cache
def _warn_once(message: str) -> None:
    print(message, file=sys.stderr)


def load_engine(model_dir: str | Path, *, weights: str = "fp32", compile: bool = False, threads: int | None = None,
                max_batch: int = 1, max_len: int | None = None, need_tokenizer: bool = True,
                backend: str = "auto") -> Engine:
    from mobilellm.checkpoint import has_tokenizer, load_model_dir

    if threads:
        torch.set_num_threads(threads)
    model = load_model_dir(model_dir)
    tokenizer = None
    if has_tokenizer(model_dir):
        from mobilellm.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(model_dir)
    elif need_tokenizer:
        raise MobileLLMError(f"{model_dir} has no tokenizer files (tokenizer.json or tokenizer.model); "
                             "save the model with its tokenizer")
    engine = Engine(model, tokenizer, weights=weights, compile=compile, threads=threads, max_batch=max_batch,
                    max_len=max_len, consume=True, backend=backend)
    del model
    _return_freed_memory()
    return engine


def _return_freed_memory() -> None:
    """Hand the loaded model's freed memory back to the OS (glibc keeps freed heap pages otherwise,
    e.g. about 200 MiB after converting a 125M model to int8)."""
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ---- CLI ----------------------------------------------------------------------------------------


def add_sampling_args(p, *, temperature: float = 0.0, max_new_tokens: int = 128) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"default {max_new_tokens}")
    g.add_argument("--temperature", type=float, default=temperature, help=f"0 = greedy (default {temperature})")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 = off)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible output)")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable); not printed")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating after the end-of-sequence token")


def add_runtime_args(p) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    g.add_argument("--weights", choices=WEIGHT_MODES, default="fp32",
                   help="decode weights: fp32 (default), bf16, fp16 or int8 (fastest; one scale per output row)")
    g.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="native: one compiled C call per step (needs a C compiler; built once); torch: "
                        "PyTorch ops; auto (default): native where it builds")
    g.add_argument("--compile", action="store_true", help="torch.compile the torch backend's decode step")
    g.add_argument("--verbose", action="store_true", help="print speed and memory to stderr")


def sampling_from_args(args) -> SamplingParams:
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                            stop=list(args.stop), ignore_eos=args.ignore_eos)
    params.validate()
    return params


def report(engine: Engine, tokens: int, seconds: float) -> None:
    print(f"[{tokens} tokens in {seconds:.2f} s, {tokens / max(seconds, 1e-9):.1f} tok/s; weights "
          f"{engine.weight_bytes() / 2**20:.1f} MiB ({engine.weights}, {engine.backend} backend), "
          f"KV cache {engine.cache_bytes() / 2**20:.1f} MiB, "
          f"peak RSS {peak_rss_bytes() / 2**20:.1f} MiB]", file=sys.stderr)


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
    params = sampling_from_args(args)
    if args.batch_size < 1:
        raise MobileLLMError(f"--batch-size must be >= 1, got {args.batch_size}")
    prompts = _read_prompts(args)
    if not Path(args.model).is_dir():
        raise MobileLLMError(f"model directory {args.model} does not exist")
    from mobilellm.checkpoint import has_tokenizer, load_config

    cfg = load_config(args.model)
    if not has_tokenizer(args.model):
        raise MobileLLMError(f"{args.model} has no tokenizer files (tokenizer.json or tokenizer.model); "
                             "save the model with its tokenizer")
    from mobilellm.tokenizer import load_tokenizer

    tok = load_tokenizer(args.model)
    ids = tok.encode_batch(prompts, bos=tok.add_bos)
    # a cache just long enough for the longest prompt and its continuation (capped at the context)
    need = max(len(i) for i in ids) + params.max_new_tokens
    engine = load_engine(args.model, weights=args.weights, compile=args.compile, threads=args.threads,
                         max_batch=min(args.batch_size, len(prompts)), max_len=min(need, cfg.max_seq_len),
                         backend=args.backend)
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
            import json

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
    p.add_argument("model", help="model directory (with tokenizer files)")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    p.add_argument("--prompt-file", default=None, help="file with one prompt per line")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default 8)")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.add_argument("--separator", default="\n", help="printed between completions (default: newline)")
    add_sampling_args(p)
    add_runtime_args(p)
    p.set_defaults(func=run)
