"""An OpenAI-compatible HTTP API (FastAPI) over the generation engine; `mobilellm serve` runs it.

HTTP handlers only validate and queue; tokenizing and template rendering run on worker threads, so one
large request never stalls the others. One background thread (BatchingLoop) owns the model and runs
continuous batching, handing each request its new text through an asyncio queue. Endpoints, limits
(ServerLimits) and OpenAI-style error bodies are described in docs/inference.md."""

# No `from __future__ import annotations`: FastAPI must see the real `Request` class of the route
# handlers, which are defined inside OpenAIServer.app (fastapi is imported lazily).
import asyncio
import json
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from mobilellm.chat_template import ROLES, ChatFormatter
from mobilellm.errors import MobileLLMError
from mobilellm.inference import SamplingParams
from mobilellm.inference.sampling import MAX_STOP_STRINGS
from mobilellm.sysinfo import return_freed_memory

API_KEY_ENV = "MOBILELLM_API_KEY"
MAX_STOP_CHARS = 256  # per stop string
BIG_REQUEST_BYTES = 256 * 1024  # after such a request, freed memory is handed back to the OS


@dataclass
class ServerLimits:
    max_request_bytes: int = 1_000_000  # a request body over this gets 413
    max_queue: int = 64  # requests waiting for a cache row; more get 503


class APIError(Exception):
    """An HTTP error with an OpenAI-style body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Handle:
    """Where the batching thread delivers one request's text: (delta, finish_reason or None) items."""

    request: Any
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop


class BatchingLoop:
    """Runs Engine.step() in a background thread while any request is waiting or active."""

    def __init__(self, engine, max_queue: int):
        self.engine = engine
        self.max_queue = max_queue
        self.handles: dict[int, Handle] = {}
        self.wake = threading.Condition()
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="mobilellm-batching", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.wake:
            self.stopped = True
            self.wake.notify()
        self.thread.join(timeout=10)

    def submit(self, request) -> Handle:
        with self.wake:
            if len(self.engine.waiting) >= self.max_queue:
                raise APIError(503, f"the server is busy: {len(self.engine.waiting)} requests wait already; "
                                    "retry later", type="server_error", code="server_overloaded")
            handle = Handle(request, asyncio.Queue(), asyncio.get_running_loop())
            self.handles[request.id] = handle
            self.engine.submit(request)
            self.wake.notify()
        return handle

    def cancel(self, request) -> None:
        if not request.finished:
            self.engine.cancel(request)
            with self.wake:
                self.wake.notify()

    def _run(self) -> None:
        while True:
            with self.wake:
                while not self.stopped and not self.engine.has_work():
                    self.wake.wait()
                if self.stopped:
                    return
            try:
                events = self.engine.step()
            except Exception as err:  # never let one bad step kill the server: fail the requests in flight
                print(f"error: generation step failed: {err!r}", file=sys.stderr)
                events = list(self.engine.active) + list(self.engine.waiting)
                self.engine.waiting.clear()
                for req in events:
                    self.engine.finish(req, "error")
            for req in events:
                handle = self.handles.get(req.id)
                if handle is None:
                    continue
                handle.loop.call_soon_threadsafe(handle.queue.put_nowait, (req.new_text, req.finish_reason))
                if req.finished:
                    self.handles.pop(req.id, None)


def _schemas():
    """Pydantic request models (built lazily: pydantic is only needed by the server). Every field has
    its range: what passes here the engine accepts."""
    from pydantic import BaseModel, ConfigDict, Field

    class Sampling(BaseModel):
        model_config = ConfigDict(strict=True, extra="ignore")
        model: str | None = Field(default=None, max_length=256)
        max_tokens: int | None = Field(default=None, ge=-2**31, le=2**31)
        max_completion_tokens: int | None = Field(default=None, ge=-2**31, le=2**31)
        temperature: float | None = Field(default=None, ge=0, le=2)
        top_p: float | None = Field(default=None, gt=0, le=1)
        top_k: int | None = Field(default=None, ge=0, le=2**31)
        repetition_penalty: float | None = Field(default=None, gt=0, le=100)
        seed: int | None = Field(default=None, ge=0, lt=2**64)
        stop: str | list[str] | None = Field(default=None, max_length=MAX_STOP_STRINGS)
        stream: bool = False
        stream_options: dict | None = None
        n: int = Field(default=1, ge=1, le=1)
        presence_penalty: float | None = Field(default=None, ge=0, le=0)
        frequency_penalty: float | None = Field(default=None, ge=0, le=0)
        logprobs: Any = None
        user: str | None = Field(default=None, max_length=256)

    class CompletionBody(Sampling):
        prompt: str | list[str] | list[int]
        echo: bool = False

    class Message(BaseModel):
        model_config = ConfigDict(strict=True, extra="ignore")
        role: str
        content: str | list[dict] | None = None

    class ChatBody(Sampling):
        messages: list[Message] = Field(min_length=1)

    return CompletionBody, ChatBody


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "tagged-union"}


def _validation_error(err) -> APIError:
    first = err.errors()[0]
    # drop the union-member tags pydantic puts in locations ("prompt.str", "stop.list[str]")
    loc = [str(x) for x in first.get("loc", ())
           if x != "body" and not (isinstance(x, str) and ("[" in x or x in _TYPE_TAGS))]
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON ({first.get('msg')})", code="invalid_json")
    param = ".".join(loc) or None
    return APIError(400, f"invalid value for {param or 'the request'}: {first.get('msg')}", param=param,
                    code="invalid_value" if param else "invalid_request")


def _text_content(content, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:  # OpenAI content parts: only text parts are supported
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, f"messages[{index}].content: only text parts are supported",
                           param=f"messages.{index}.content")
        parts.append(part["text"])
    return "".join(parts)


def _finish_reason(reason: str) -> str:
    return reason if reason in ("stop", "length") else "stop"


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class OpenAIServer:
    """The API over one engine. `app()` is the FastAPI application (the batching thread starts and
    stops with its lifespan)."""

    def __init__(self, engine, model_name: str, *, api_key: str | None = None, limits: ServerLimits | None = None):
        self.engine, self.model_name, self.api_key = engine, model_name, api_key
        self.limits = limits or ServerLimits()
        self.batching = BatchingLoop(engine, self.limits.max_queue)
        tok = engine.tokenizer
        self.formatter = ChatFormatter(tok, engine.max_len) if tok is not None else None
        # a text longer than this cannot fit the context, whatever it holds: refused before tokenizing
        longest_token = max((len(tok.id_to_token(i) or "") for i in range(tok.vocab_size)), default=1) if tok else 1
        self.max_prompt_chars = engine.max_len * max(longest_token, 1)
        self.created = int(time.time())
        self.CompletionBody, self.ChatBody = _schemas()

    def app(self):
        import contextlib

        from fastapi import FastAPI, Request
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import JSONResponse
        from starlette.exceptions import HTTPException as StarletteHTTPException

        @contextlib.asynccontextmanager
        async def lifespan(app):
            self.batching.start()
            yield
            self.batching.stop()

        app = FastAPI(title="mobilellm", lifespan=lifespan)
        app.state.batching = self.batching

        def error_response(err: APIError) -> JSONResponse:
            headers = {"Retry-After": "1"} if err.status == 503 else None
            return JSONResponse(err.body(), status_code=err.status, headers=headers)

        @app.exception_handler(APIError)
        async def _api_error(request, err: APIError):
            return error_response(err)

        @app.exception_handler(RequestValidationError)
        async def _invalid(request, err):
            return error_response(_validation_error(err))

        @app.exception_handler(StarletteHTTPException)
        async def _http_error(request, err):
            code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
            return error_response(APIError(err.status_code, str(err.detail), code=code))

        @app.middleware("http")
        async def _gate(request: Request, call_next):
            if self.api_key and request.url.path.startswith("/v1/"):
                if request.headers.get("authorization", "") != f"Bearer {self.api_key}":
                    return error_response(APIError(401, "incorrect or missing API key: send 'Authorization: "
                                                        "Bearer <key>'", code="invalid_api_key"))
            declared = request.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > self.limits.max_request_bytes:
                return error_response(self._too_large())
            return await call_next(request)

        @app.get("/health")
        async def health():
            return self.health()

        @app.get("/v1/models")
        async def models():
            return self.models()

        @app.post("/v1/completions")
        async def completions(http_request: Request):
            return await self.completions(http_request)

        @app.post("/v1/chat/completions")
        async def chat_completions(http_request: Request):
            return await self.chat_completions(http_request)

        return app

    def health(self) -> dict:
        engine = self.engine
        return {"status": "ok", "model": self.model_name, "active": len(engine.active), "waiting": len(engine.waiting),
                "max_batch": engine.max_batch, "max_queue": self.limits.max_queue, **engine.stats}

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "mobilellm", "context_length": self.engine.max_len}]}

    async def completions(self, http_request):
        raw = await self._read_body(http_request)
        body = self._parse(raw, self.CompletionBody)
        self._check_model(body.model)
        token_ids = isinstance(body.prompt, list) and all(isinstance(t, int) for t in body.prompt)
        if self.engine.tokenizer is None and not token_ids:
            raise APIError(400, "this model has no tokenizer: send the prompt as a list of token ids", param="prompt")
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            if len(prompt) != 1:
                raise APIError(400, "send one prompt per request (a list of several prompts is not supported)",
                               param="prompt", code="unsupported")
            prompt = prompt[0]
        if isinstance(prompt, list) and not prompt:
            raise APIError(400, "the prompt is empty", param="prompt", code="invalid_value")
        if isinstance(prompt, str):
            self._check_prompt_chars(len(prompt), "prompt")
            ids = await asyncio.to_thread(self.engine.encode, prompt)
        else:
            ids = list(prompt)
        ids = self._prompt_ids(ids, "prompt")
        handle = self._start(ids, self._sampling(body, len(ids)))
        rid, echo = f"cmpl-{uuid.uuid4().hex}", (prompt if body.echo and isinstance(prompt, str) else "")

        def chunk(text, finish):
            return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": self.model_name,
                    "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]}

        if body.stream:
            return self._streaming(handle, chunk, body, [chunk(echo, None)] if echo else [], len(raw))
        text, finish = await self._collect(handle, http_request, len(raw))
        out = chunk(echo + text, _finish_reason(finish))
        out["usage"] = self._usage(handle)
        return out

    async def chat_completions(self, http_request):
        raw = await self._read_body(http_request)
        body = self._parse(raw, self.ChatBody)
        self._check_model(body.model)
        if self.formatter is None:
            raise APIError(400, "this model has no tokenizer, so it cannot chat", code="unsupported")
        messages = [{"role": m.role, "content": _text_content(m.content, i)} for i, m in enumerate(body.messages)]
        for i, m in enumerate(messages):
            if m["role"] not in ROLES:
                raise APIError(400, f"messages[{i}].role must be system, user or assistant", param=f"messages.{i}.role")
        self._check_prompt_chars(sum(len(m["content"]) for m in messages), "messages")
        try:  # the template comes from the model directory: rendered with bounds, off the event loop
            ids = await asyncio.to_thread(self.formatter.encode, messages)
        except MobileLLMError as err:
            raise APIError(400, str(err), param="messages") from None
        ids = self._prompt_ids(ids, "messages")
        handle = self._start(ids, self._sampling(body, len(ids), self.formatter.stops))
        rid = f"chatcmpl-{uuid.uuid4().hex}"

        def chunk(text, finish):
            delta = {} if text is None else {"content": text}
            return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
                    "model": self.model_name,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        if body.stream:
            head = chunk("", None)
            head["choices"][0]["delta"] = {"role": "assistant", "content": ""}
            return self._streaming(handle, chunk, body, [head], len(raw))
        text, finish = await self._collect(handle, http_request, len(raw))
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": self.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": _finish_reason(finish)}],
                "usage": self._usage(handle)}

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body is larger than {self.limits.max_request_bytes:,} bytes "
                             "(the server's --max-request-bytes)", code="request_too_large")

    async def _read_body(self, http_request) -> bytes:
        """The body, read only up to the limit (a chunked upload has no length to check first)."""
        chunks, size = [], 0
        async for chunk in http_request.stream():
            size += len(chunk)
            if size > self.limits.max_request_bytes:
                raise self._too_large()
            chunks.append(chunk)
        return b"".join(chunks)

    def _parse(self, raw: bytes, schema):
        from pydantic import ValidationError

        try:
            return schema.model_validate_json(raw or b"{}")
        except ValidationError as err:
            raise _validation_error(err) from None

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def _context_error(self, what: str, param: str) -> APIError:
        return APIError(400, f"this model's context is {self.engine.max_len} tokens and {what}: shorten the prompt",
                        param=param, code="context_length_exceeded")

    def _check_prompt_chars(self, chars: int, param: str) -> None:
        if chars > self.max_prompt_chars:
            raise self._context_error(f"a text of {chars:,} characters cannot fit in it", param)

    def _prompt_ids(self, ids: list[int], param: str) -> list[int]:
        if len(ids) >= self.engine.max_len:
            raise self._context_error(f"the prompt has {len(ids)}", param)
        try:
            self.engine.check_prompt(ids)
        except MobileLLMError as err:
            raise APIError(400, str(err), param=param, code="invalid_value") from None
        return ids

    def _sampling(self, body, prompt_tokens: int, extra_stops: list[str] = ()) -> SamplingParams:
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        room = self.engine.max_len - prompt_tokens
        if max_tokens is None:
            max_tokens = room if isinstance(body, self.ChatBody) else min(16, room)  # OpenAI defaults
        if max_tokens < 1:
            raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens",
                           code="invalid_value")
        if max_tokens > room:
            raise APIError(400, f"this model's context is {self.engine.max_len} tokens; the prompt has {prompt_tokens} "
                                f"and max_tokens asks for {max_tokens}: lower max_tokens or shorten the prompt",
                           param="max_tokens", code="context_length_exceeded")
        if body.logprobs not in (None, False):
            raise APIError(400, "logprobs are not supported", param="logprobs", code="unsupported")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise APIError(400, f"each stop string may have at most {MAX_STOP_CHARS} characters", param="stop",
                           code="invalid_value")
        params = SamplingParams(
            max_new_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
            top_k=body.top_k or 0, top_p=1.0 if body.top_p is None else body.top_p,
            repetition_penalty=body.repetition_penalty or 1.0, seed=body.seed, stop=stops + list(extra_stops))
        try:
            params.validate()
        except MobileLLMError as err:
            raise APIError(400, str(err), param="stop", code="invalid_value") from None
        return params

    def _start(self, ids: list[int], params: SamplingParams) -> Handle:
        try:
            request = self.engine.make_request(ids, params)
        except MobileLLMError as err:
            raise APIError(400, str(err), code="invalid_value") from None
        return self.batching.submit(request)

    def _done(self, body_bytes: int) -> None:
        if body_bytes > BIG_REQUEST_BYTES:  # tokenizing it left freed heap behind: give it back
            return_freed_memory()

    async def _collect(self, handle: Handle, http_request, body_bytes: int) -> tuple[str, str]:
        """Wait for a whole completion; cancel it if the client goes away."""
        text = []
        try:
            while True:
                try:
                    delta, finish = await asyncio.wait_for(handle.queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await http_request.is_disconnected():
                        self.batching.cancel(handle.request)
                        raise APIError(499, "client closed the request", code="client_closed") from None
                    continue
                text.append(delta)
                if finish is not None:
                    if finish == "error":
                        raise APIError(500, "generation failed", type="server_error")
                    return "".join(text), finish
        except asyncio.CancelledError:
            self.batching.cancel(handle.request)
            raise
        finally:
            self._done(body_bytes)

    def _usage(self, handle: Handle) -> dict:
        req = handle.request
        return {"prompt_tokens": len(req.prompt_ids), "completion_tokens": len(req.output_ids),
                "total_tokens": len(req.prompt_ids) + len(req.output_ids)}

    def _streaming(self, handle: Handle, make_chunk, body, first: list[dict], body_bytes: int):
        from fastapi.responses import StreamingResponse

        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(self._events(handle, make_chunk, include_usage, first, body_bytes),
                                 media_type="text/event-stream")

    async def _events(self, handle: Handle, make_chunk, include_usage: bool, first: list[dict], body_bytes: int):
        try:
            for chunk in first:
                yield _sse(chunk)
            while True:
                delta, finish = await handle.queue.get()
                if finish == "error":
                    yield _sse(APIError(500, "generation failed", type="server_error").body())
                    break
                if delta:
                    yield _sse(make_chunk(delta, None))
                if finish is not None:
                    yield _sse(make_chunk(None, _finish_reason(finish)))
                    break
            if include_usage:
                final = make_chunk(None, None)
                final["choices"], final["usage"] = [], self._usage(handle)
                yield _sse(final)
            yield "data: [DONE]\n\n"
        finally:  # normal end, or the client went away (the response task is cancelled)
            self.batching.cancel(handle.request)
            self._done(body_bytes)


def model_name_for(directory) -> str:
    """The id clients send: the model directory's name, or its nearest telling ancestor's where the
    directory has a generic name (runs/quickstart/run/final -> "quickstart")."""
    import re
    from pathlib import Path

    generic = re.compile(r"^(final|model|run|runs|checkpoints?|step-\d+|\d+)$")
    path = Path(directory).resolve()
    for part in [path, *path.parents]:
        if part.name and not generic.match(part.name):
            return part.name
    return path.name or "model"
