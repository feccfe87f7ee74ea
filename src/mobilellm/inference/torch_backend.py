"""The PyTorch backend: the network in the inference layout (layout.py) as PyTorch ops.

Same math as model.MobileLLM in about 20 calls per layer and token instead of about 55 (fused q|k|v
and gate|up products, residual adds fused where the kernel allows, RoPE as one complex multiplication):
at batch 1 on a CPU the time between kernels is as large as the kernels. `compile=True` runs the decode
step through torch.compile with fixed shapes."""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

from mobilellm.inference.backend import Backend
from mobilellm.inference.layout import Matrix, block_weights, embedding_table, output_matrix
from mobilellm.model import KVCache, rope_cos_sin
from mobilellm.precision import FLOAT_DTYPES
from mobilellm.quantize import dequantize_weight, fake_quantize_activations


def _onednn_available(dtype: torch.dtype) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _linear(m: Matrix, precision: str, prepack: bool = True):
    """(x -> x @ W.T, (x, r) -> r + x @ W.T, bytes held) in the decode precision.

    fp32 / bf16: oneDNN with the weight prepacked once (about twice the default BLAS speed for one-row
    products on some CPUs) and the residual add fused, else a plain matmul (no oneDNN, or prepack=False:
    torch.compile packs weights itself). fp16 / int8: fbgemm's dynamic kernels, returning fp32.
    int4: the quantized arithmetic in fp32 (a reference, not a fast path).
    """
    if precision in ("fp32", "bf16"):
        dtype = FLOAT_DTYPES[precision]
        w, _ = m.converted(precision)
        nbytes = w.numel() * w.element_size()
        if prepack and _onednn_available(dtype):
            packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)  # blocked layout, tuned for one row
            pointwise = torch.ops.mkldnn._linear_pointwise
            return (lambda x: pointwise(x, packed, None, "none", [], ""),
                    lambda x, r: pointwise.binary(x, r, packed, None, "add"), nbytes)
        return functools.partial(F.linear, weight=w), lambda x, r: r + F.linear(x, w), nbytes
    if precision == "int4":  # no int4 kernel in PyTorch: the reference numerics (dequantized weights,
        q, scale = m.as_int4_groups()  # activations fake-quantized per token), held as fp32
        w = dequantize_weight(q, scale)
        fn = lambda x: F.linear(fake_quantize_activations(x), w)  # noqa: E731
        return fn, lambda x, r: r + fn(x), w.numel() * 4
    with warnings.catch_warnings():  # torch marks the quantized tensor API deprecated; it is the fastest here
        warnings.simplefilter("ignore")
        if precision == "int8":
            q, scale = m.as_int8_rows()
            qweight = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros(len(q), dtype=torch.long), 0)
            packed = torch.ops.quantized.linear_prepack(qweight, None)
            fn = functools.partial(torch.ops.quantized.linear_dynamic, W_prepack=packed, reduce_range=True)
            nbytes = q.numel() + scale.numel() * 4
        else:  # fp16
            packed = torch.ops.quantized.linear_prepack_fp16(m.dense(), None)
            fn = functools.partial(torch.ops.quantized.linear_dynamic_fp16, W_prepack=packed)
            nbytes = m.shape[0] * m.shape[1] * 2
    return fn, lambda x, r: r + fn(x), nbytes


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:  # one call; the same op order and result as model.RMSNorm in fp32
        return F.rms_norm(x, weight.shape, weight, eps)
    x32 = x.float()  # same op order as model.RMSNorm
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class TorchNet:
    """model.MobileLLM's weights in the inference layout, as PyTorch callables in the decode precision."""

    def __init__(self, model, precision: str, max_len: int, consume: bool, prepack: bool):
        cfg = model.config
        self.config, self.layer_to_block = cfg, list(model.layer_to_block)
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.n_heads, self.n_kv, self.hd, self.eps = cfg.n_heads, cfg.n_kv_heads, cfg.attn_head_dim, cfg.norm_eps
        self.nbytes = 0
        # copies (copy=True): a view of a loaded model's tensor would keep the loaded weights alive
        self.embed = embedding_table(model).to(self.dtype, copy=True)
        self.norm = model.norm.weight.detach().to(self.dtype, copy=True)
        self.blocks = []
        with torch.no_grad():
            for block in model.layers:
                b = block_weights(block, cfg, consume)
                qkv_proj, _, n1 = _linear(b.qkv, precision, prepack)
                _, o_add, n2 = _linear(b.o, precision, prepack)
                up_proj, _, n3 = _linear(b.up, precision, prepack)
                _, down_add, n4 = _linear(b.down, precision, prepack)
                self.nbytes += n1 + n2 + n3 + n4
                self.blocks.append((b.ln1.to(self.dtype, copy=True), b.ln2.to(self.dtype, copy=True),
                                    qkv_proj, o_add, up_proj, down_add))
                self.gated = b.gated
            self.head, _, head_bytes = _linear(output_matrix(model), precision, prepack)
        shared_head = cfg.tie_embeddings and precision in ("fp32", "bf16")  # same storage as the embedding
        norms = (2 * len(self.blocks) + 1) * cfg.dim
        self.nbytes += (self.embed.numel() + norms) * self.embed.element_size() + (0 if shared_head else head_bytes)
        cos, sin = rope_cos_sin(torch.arange(max_len), self.hd, cfg.rope_theta)  # (max_len, hd): two equal halves
        self.rotation = torch.complex(cos[:, :self.hd // 2], sin[:, :self.hd // 2])  # (max_len, hd/2) complex64

    def forward(self, tokens: torch.Tensor, cache, positions: torch.Tensor, mask: torch.Tensor | None = None,
                is_causal: bool = False, last_only: bool = False) -> torch.Tensor:
        """Logits (n, T or 1, V) fp32. tokens (n, T); positions (T,) or (n, T) index the RoPE table;
        cache.update(layer, 0, k, v) stores the new K/V and returns all keys/values to attend to."""
        n, T = tokens.shape
        H, KV, hd = self.n_heads, self.n_kv, self.hd
        rotation = self.rotation[positions].unsqueeze(-2)  # (T, 1, hd/2) or (n, T, 1, hd/2): over heads
        x = F.embedding(tokens, self.embed)  # (n, T, dim)
        for layer, b in enumerate(self.layer_to_block):
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
            if self.gated:
                gate, up = h.chunk(2, dim=-1)
                h = F.silu(gate) * up
            else:
                h = F.relu(h)
            x = down_add(h, x)
        if last_only:
            x = x[:, -1:]
        return self.head(_rms_norm(x, self.norm, self.eps)).float()


# ---- cache writes: what cache.update means for each kind of step --------------------------------


class _RowCache:
    """A prefill into one row of the shared cache (what KVCache.update does for all rows)."""

    def __init__(self, cache: KVCache, row: int):
        self.k, self.v = cache.k[:, row:row + 1], cache.v[:, row:row + 1]  # views: (L, 1, KV, S, hd)

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class _DecodeCache:
    """One decode step of rows [0, n): each row writes its new K/V at its own length."""

    def __init__(self, cache: KVCache):
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
    """The compiled decode step: fixed shapes, every row sees the whole cache (masked).

    Row r writes its new K/V at column positions[r], so one graph serves every step instead of one
    per cache length.
    """

    def __init__(self, cache: KVCache, positions: torch.Tensor):
        self.cache, self.positions = cache, positions  # positions: the backend's (max_batch, 1) buffer

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        n = k.shape[0]
        rows, cols = torch.arange(n, device=k.device), self.positions[:n, 0]
        self.cache.k[layer, rows, :, cols] = k[:, :, 0]
        self.cache.v[layer, rows, :, cols] = v[:, :, 0]
        return self.cache.k[layer, :n], self.cache.v[layer, :n]  # (n, KV, max_len, hd)


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, model, precision: str, max_batch: int, max_len: int, consume: bool = False,
                 compile: bool = False):
        super().__init__(model.config, precision, max_batch, max_len)
        self.net = TorchNet(model, precision, max_len, consume, prepack=not compile)
        self.nbytes = self.net.nbytes
        cache_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.cache = KVCache(self.config, max_batch, max_len, device="cpu", dtype=cache_dtype)
        self._decode_cache = _DecodeCache(self.cache)
        self._cols = torch.arange(max_len)  # key columns, for building decode masks
        self._tokens = torch.zeros(max_batch, 1, dtype=torch.long)  # decode inputs, reused every step
        self._positions = torch.zeros(max_batch, 1, dtype=torch.long)
        self.compiled = compile
        if compile:
            self._static_cache = _StaticDecodeCache(self.cache, self._positions)
            self._step = torch.compile(self._forward_static, dynamic=False)

    def _prefill(self, row: int, ids: list[int]) -> torch.Tensor:
        P = len(ids)
        return self.net.forward(torch.tensor([ids]), _RowCache(self.cache, row), torch.arange(P),
                                is_causal=P > 1, last_only=True)[0, 0]  # only the last position's logits

    def _decode(self, rows: list[int], tokens: list[int], positions: list[int]) -> torch.Tensor:
        # Rows [0, n) all run: a row not decoding now writes harmless K/V at its own next column,
        # which its next real token overwrites before anything reads it.
        n = max(rows) + 1
        cols, inputs = list(self.lengths[:n]), [0] * n
        for row, token, pos in zip(rows, tokens, positions):
            cols[row], inputs[row] = pos, token
        dc = self._decode_cache
        dc.n, dc.kv_len = n, max(cols) + 1
        if n == 1:
            self._tokens[0, 0] = inputs[0]
            self._positions[0, 0] = cols[0]
        else:
            self._tokens[:n, 0] = torch.tensor(inputs)
            self._positions[:n, 0] = dc.cols[:n] = torch.tensor(cols)
        if self.compiled:
            logits = self._step(self._tokens[:n])
        else:
            dc.same_col = cols[0] if all(c == cols[0] for c in cols) else None
            mask = None  # one query per row; all rows at the same length see every cached key: no mask
            if dc.same_col is None:
                mask = (self._cols[:dc.kv_len][None, :] <= dc.cols[:n, None])[:, None, None]  # (n, 1, 1, S)
            logits = self.net.forward(self._tokens[:n], dc, self._positions[:n], mask)[:, 0]  # (n, V)
        return logits[rows]

    def _forward_static(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[0]
        positions = self._positions[:n]  # (n, 1)
        mask = (self._cols[None, :] <= positions)[:, None, None]  # (n, 1, 1, max_len)
        return self.net.forward(tokens, self._static_cache, positions, mask)[:, 0]  # (n, V)
