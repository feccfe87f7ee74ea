"""The generation engine: continuous batching over the KV-cache rows of one backend.

A waiting request is prefilled alone into a free row, then joins the decode batch; rows are independent,
so a request gets the same tokens whether it runs alone or beside others. `generate` and `stream` drive
the `submit / step / cancel` loop here; the server drives it from a background thread. A prompt must
leave room for one new token, and generation stops with "length" at the context."""

from __future__ import annotations

import itertools
import random
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from mobilellm.errors import MobileLLMError
from mobilellm.inference.sampling import SamplingParams, next_token
from mobilellm.inference.select import build_backend
from mobilellm.inference.text import IncrementalDetokenizer, StopStrings
from mobilellm.sysinfo import available_memory_bytes, return_freed_memory


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


def check_cache_fits(config, max_batch: int, max_len: int) -> None:
    """Refuse a KV cache that cannot fit in memory now (e.g. max_seq_len 1e9), before allocating it."""
    need = 2 * config.n_logical_layers * max_batch * config.n_kv_heads * max_len * config.attn_head_dim * 4
    free = available_memory_bytes()
    if free is not None and need > free:
        raise MobileLLMError(f"a KV cache for {max_batch} x {max_len} tokens needs {need / 2**30:.1f} GiB but "
                             f"{free / 2**30:.1f} GiB of memory is free: lower the context (--max-len) or the "
                             "batch (--max-batch)")


class Engine:
    """Prefill + batched KV-cache decoding over `max_batch` cache rows of one backend."""

    def __init__(self, model, tokenizer=None, *, max_batch: int = 1, max_len: int | None = None,
                 precision: str | None = None, compile: bool = False, threads: int | None = None,
                 consume: bool = False, backend: str = "auto"):
        """precision None: default_precision(model). consume=True: the backend empties the model's
        matrices as it converts them (give the model up afterwards), so memory holds one copy."""
        if not isinstance(max_batch, int) or max_batch < 1:
            raise MobileLLMError(f"max_batch must be a positive integer, got {max_batch!r}")
        if max_len is not None and (not isinstance(max_len, int) or max_len < 2):
            raise MobileLLMError(f"max_len must be an integer >= 2, got {max_len!r}")
        self.config = model.config
        self.tokenizer = tokenizer
        if threads:
            torch.set_num_threads(threads)
        self.max_len = min(max_len or self.config.max_seq_len, self.config.max_seq_len)
        self.max_batch = max_batch
        check_cache_fits(self.config, max_batch, self.max_len)
        self.precision = precision or default_precision(model)
        self.backend = build_backend(model, self.precision, backend=backend, max_batch=max_batch,
                                     max_len=self.max_len, compile=compile, consume=consume)
        if consume:
            return_freed_memory()
        self.rows: list[Request | None] = [None] * max_batch
        self.waiting: deque[Request] = deque()
        self._lock = threading.Lock()  # guards `waiting` and cancellation flags across threads
        tok_eos = getattr(tokenizer, "eos_id", None)
        self.eos_ids = {i for i in (tok_eos, self.config.eos_token_id) if isinstance(i, int) and i >= 0}
        self.stats = {"requests": 0, "cancelled": 0, "generated_tokens": 0, "peak_batch": 0}
        self.last: Completion | None = None  # set by stream()

    def weight_bytes(self) -> int:
        """Bytes of weights as held for decoding (an fp32/bf16 tied output matrix is the embedding)."""
        return self.backend.nbytes

    def cache_bytes(self) -> int:
        return self.backend.cache_nbytes()

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise MobileLLMError("this model directory has no tokenizer; add tokenizer files or pass token ids")
        return list(self.tokenizer.encode(text, bos=bool(getattr(self.tokenizer, "add_bos", False))))

    def check_prompt(self, prompt_ids: list[int]) -> None:
        if not prompt_ids:
            raise MobileLLMError("empty prompt: give at least one token (or enable BOS in the tokenizer)")
        if len(prompt_ids) >= self.max_len:
            raise MobileLLMError(f"prompt has {len(prompt_ids)} tokens but the context is {self.max_len}: "
                                 "shorten the prompt (at least one token must fit after it)")
        bad = [t for t in prompt_ids if not (isinstance(t, int) and 0 <= t < self.config.vocab_size)]
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

    @torch.inference_mode()
    def step(self) -> list[Request]:
        """Admit waiting requests into free rows (prefill), then one decode step for all active rows.

        Returns the requests that produced text or finished in this step (their `new_text` is set).
        """
        events: list[Request] = []
        with self._lock:
            cancelled = [r for r in list(self.rows) + list(self.waiting) if r is not None and r.cancelled]
            for req in cancelled:
                self.finish(req, "cancelled")
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
            self._accept(req, self._prefill(req))
            events.append(req)
        if decoding:
            self.stats["peak_batch"] = max(self.stats["peak_batch"], len(decoding))
            logits = self.backend.decode([r.row for r in decoding], [r.output_ids[-1] for r in decoding])
            for req, row_logits in zip(decoding, logits):
                req.length += 1
                self._accept(req, row_logits)
                events.append(req)
        for req in events:
            if req.finished:
                self._release(req)
        return events

    def _prefill(self, req: Request) -> torch.Tensor:
        logits = self.backend.prefill(req.row, req.prompt_ids)
        req.length = len(req.prompt_ids)
        if req.params.repetition_penalty != 1.0:
            req.seen = torch.zeros(self.config.vocab_size, dtype=torch.bool)
            req.seen[torch.tensor(req.prompt_ids)] = True
        return logits

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

    def finish(self, req: Request, reason: str) -> None:
        """End a request now (cancelled, or failed in the server) and free its row."""
        req.finish_reason = reason
        req.new_text = ""
        self._release(req)
        self.stats["cancelled"] += reason == "cancelled"

    def _release(self, req: Request) -> None:
        if req.row >= 0 and self.rows[req.row] is req:
            self.rows[req.row] = None
            self.backend.free(req.row)

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


def default_precision(model) -> str:
    """A quantized model runs on its own int8 integers where they are int8 rows; anything else in fp32."""
    quantization = getattr(model, "quantization", None) or {}
    return "int8" if quantization.get("scheme") in ("w8a8", "int8") else "fp32"


def load_engine(model_dir: str | Path, *, need_tokenizer: bool = True, **engine_options) -> Engine:
    """An engine over a model directory (float or quantized); engine_options as for Engine."""
    from mobilellm.checkpoint import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(model_dir, need_tokenizer=need_tokenizer)
    return Engine(model, tokenizer, consume=True, **engine_options)
