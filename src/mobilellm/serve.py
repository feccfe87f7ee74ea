"""`mobilellm serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the generation engine.

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with
`stream: true` as server-sent events `data: {...}` ending in `data: [DONE]`).

Concurrency: HTTP handlers only validate, tokenize and queue. One background thread (BatchingLoop)
owns the model: each iteration admits waiting requests into free cache rows (prefill) and runs one
decode step for all active rows together (continuous batching), then hands every request its new
text through an asyncio queue. The waiting queue is bounded (`--max-queue`): beyond it the server
answers 503. A client that disconnects has its request cancelled and its row freed at the next step.

Errors use OpenAI's body: {"error": {"message", "type", "param", "code"}}; the server keeps serving.
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` class of the route handlers,
# which are defined inside create_app (fastapi is imported lazily).
import asyncio
import json
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from mobilellm.errors import MobileLLMError

API_KEY_ENV = "MOBILELLM_API_KEY"


class APIError(Exception):
    """An HTTP error with an OpenAI-style body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- the batching loop ---------------------------------------------------------------------------


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
                                    "retry later",
                               type="server_error", code="server_overloaded")
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
                events = []
                for req in list(self.engine.active) + list(self.engine.waiting):
                    self.engine._finish(req, "error")
                    events.append(req)
                self.engine.waiting.clear()
            for req in events:
                handle = self.handles.get(req.id)
                if handle is None:
                    continue
                item = (req.new_text, req.finish_reason)
                handle.loop.call_soon_threadsafe(handle.queue.put_nowait, item)
                if req.finished:
                    self.handles.pop(req.id, None)


# ---- request parsing -------------------------------------------------------------------------------


def _schemas():
    """Pydantic request models (built lazily: pydantic is only needed by the server)."""
    from pydantic import BaseModel, ConfigDict, Field

    class Sampling(BaseModel):
        model_config = ConfigDict(strict=True, extra="ignore")
        model: str | None = None
        max_tokens: int | None = None
        max_completion_tokens: int | None = None
        temperature: float | None = Field(default=None, ge=0, le=2)
        top_p: float | None = Field(default=None, gt=0, le=1)
        top_k: int | None = Field(default=None, ge=0)
        repetition_penalty: float | None = Field(default=None, gt=0)
        seed: int | None = None
        stop: str | list[str] | None = None
        stream: bool = False
        stream_options: dict | None = None
        n: int = Field(default=1, ge=1, le=1)
        presence_penalty: float | None = Field(default=None, ge=0, le=0)
        frequency_penalty: float | None = Field(default=None, ge=0, le=0)
        logprobs: Any = None
        user: str | None = None

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


# ---- the app -----------------------------------------------------------------------------------------


def create_app(engine, model_name: str, *, api_key: str | None = None, max_queue: int = 64):
    """The FastAPI application; the batching thread starts and stops with the app's lifespan."""
    import contextlib

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import ValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from mobilellm.chat import ChatFormatter
    from mobilellm.generate import SamplingParams

    CompletionBody, ChatBody = _schemas()
    batching = BatchingLoop(engine, max_queue)
    formatter = ChatFormatter(engine.tokenizer, engine.max_len) if engine.tokenizer is not None else None
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batching.start()
        yield
        batching.stop()

    app = FastAPI(title="mobilellm", lifespan=lifespan)
    app.state.batching = batching

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
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return error_response(APIError(401, "incorrect or missing API key: send 'Authorization: Bearer <key>'",
                                               code="invalid_api_key"))
        return await call_next(request)

    async def parse(request: Request, schema):
        raw = await request.body()
        try:
            return schema.model_validate_json(raw or b"{}")
        except ValidationError as err:
            raise _validation_error(err) from None

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")

    def sampling(body, prompt_tokens: int, extra_stops: list[str] = ()) -> SamplingParams:
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        room = engine.max_len - prompt_tokens
        if max_tokens is None:
            max_tokens = room if isinstance(body, ChatBody) else min(16, room)  # OpenAI defaults
        if max_tokens < 1:
            raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens",
                           code="invalid_value")
        if max_tokens > room:
            raise APIError(400, f"this model's context is {engine.max_len} tokens; the prompt has {prompt_tokens} "
                                f"and max_tokens asks for {max_tokens}: lower max_tokens or shorten the prompt",
                           param="max_tokens", code="context_length_exceeded")
        if body.logprobs not in (None, False):
            raise APIError(400, "logprobs are not supported", param="logprobs", code="unsupported")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        params = SamplingParams(
            max_new_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
            top_k=body.top_k or 0, top_p=1.0 if body.top_p is None else body.top_p,
            repetition_penalty=body.repetition_penalty or 1.0, seed=body.seed, stop=stops + list(extra_stops))
        try:
            params.validate()
        except MobileLLMError as err:
            raise APIError(400, str(err), param="stop", code="invalid_value") from None
        return params

    def prompt_ids(ids: list[int], param: str) -> list[int]:
        if len(ids) >= engine.max_len:
            raise APIError(400, f"this model's context is {engine.max_len} tokens and the prompt has {len(ids)}: "
                                "shorten the prompt", param=param, code="context_length_exceeded")
        try:
            engine.check_prompt(ids)
        except MobileLLMError as err:
            raise APIError(400, str(err), param=param, code="invalid_value") from None
        return ids

    def start(ids: list[int], params: SamplingParams) -> Handle:
        try:
            request = engine.make_request(ids, params)
        except MobileLLMError as err:
            raise APIError(400, str(err), code="invalid_value") from None
        return batching.submit(request)

    async def collect(handle: Handle, http_request: Request) -> tuple[str, str]:
        """Wait for a whole completion; cancel it if the client goes away."""
        text = []
        try:
            while True:
                try:
                    delta, finish = await asyncio.wait_for(handle.queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await http_request.is_disconnected():
                        batching.cancel(handle.request)
                        raise APIError(499, "client closed the request", code="client_closed") from None
                    continue
                text.append(delta)
                if finish is not None:
                    return "".join(text), finish
        except asyncio.CancelledError:
            batching.cancel(handle.request)
            raise

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def usage(handle: Handle) -> dict:
        req = handle.request
        return {"prompt_tokens": len(req.prompt_ids), "completion_tokens": len(req.output_ids),
                "total_tokens": len(req.prompt_ids) + len(req.output_ids)}

    def finish_reason(reason: str) -> str:
        return reason if reason in ("stop", "length") else "stop"

    async def stream_events(handle: Handle, make_chunk, include_usage: bool, first: list[dict] = ()):
        try:
            for chunk in first:
                yield sse(chunk)
            while True:
                delta, finish = await handle.queue.get()
                if finish == "error":
                    yield sse(APIError(500, "generation failed", type="server_error").body())
                    break
                if delta:
                    yield sse(make_chunk(delta, None))
                if finish is not None:
                    yield sse(make_chunk(None, finish_reason(finish)))
                    break
            if include_usage:
                final = make_chunk(None, None)
                final["choices"], final["usage"] = [], usage(handle)
                yield sse(final)
            yield "data: [DONE]\n\n"
        finally:  # normal end, or the client went away (the response task is cancelled)
            batching.cancel(handle.request)

    # ---- routes --------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "active": len(engine.active), "waiting": len(engine.waiting),
                "max_batch": engine.max_batch, "max_queue": max_queue, **engine.stats}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "mobilellm", "context_length": engine.max_len}]}

    @app.post("/v1/completions")
    async def completions(http_request: Request):
        body = await parse(http_request, CompletionBody)
        check_model(body.model)
        token_ids = isinstance(body.prompt, list) and all(isinstance(t, int) for t in body.prompt)
        if engine.tokenizer is None and not token_ids:
            raise APIError(400, "this model has no tokenizer: send the prompt as a list of token ids", param="prompt")
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            if len(prompt) != 1:
                raise APIError(400, "send one prompt per request (a list of several prompts is not supported)",
                               param="prompt", code="unsupported")
            prompt = prompt[0]
        if isinstance(prompt, list) and not prompt:
            raise APIError(400, "the prompt is empty", param="prompt", code="invalid_value")
        ids = prompt_ids(engine.encode(prompt) if isinstance(prompt, str) else list(prompt), "prompt")
        params = sampling(body, len(ids))
        handle = start(ids, params)
        rid, echo = f"cmpl-{uuid.uuid4().hex}", (prompt if body.echo and isinstance(prompt, str) else "")

        def chunk(text, finish):
            return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                    "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]}

        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            first = [chunk(echo, None)] if echo else []
            return StreamingResponse(stream_events(handle, chunk, include_usage, first), media_type="text/event-stream")
        text, finish = await collect(handle, http_request)
        if finish == "error":
            raise APIError(500, "generation failed", type="server_error")
        out = chunk(echo + text, finish_reason(finish))
        out["usage"] = usage(handle)
        return out

    @app.post("/v1/chat/completions")
    async def chat_completions(http_request: Request):
        body = await parse(http_request, ChatBody)
        check_model(body.model)
        if formatter is None:
            raise APIError(400, "this model has no tokenizer, so it cannot chat", code="unsupported")
        messages = [{"role": m.role, "content": _text_content(m.content, i)} for i, m in enumerate(body.messages)]
        for i, m in enumerate(messages):
            if m["role"] not in ("system", "user", "assistant"):
                raise APIError(400, f"messages[{i}].role must be system, user or assistant", param=f"messages.{i}.role")
        try:
            ids = formatter.encode(messages)
        except MobileLLMError as err:
            raise APIError(400, str(err), param="messages") from None
        ids = prompt_ids(ids, "messages")
        params = sampling(body, len(ids), formatter.stops)
        handle = start(ids, params)
        rid = f"chatcmpl-{uuid.uuid4().hex}"

        def chunk(text, finish):
            delta = {} if text is None else {"content": text}
            return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model_name,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            head = chunk("", None)
            head["choices"][0]["delta"] = {"role": "assistant", "content": ""}
            return StreamingResponse(stream_events(handle, chunk, include_usage, [head]),
                                     media_type="text/event-stream")
        text, finish = await collect(handle, http_request)
        if finish == "error":
            raise APIError(500, "generation failed", type="server_error")
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": finish_reason(finish)}],
                "usage": usage(handle)}

    return app


# ---- CLI ------------------------------------------------------------------------------------------------


def _check_port(host: str, port: int) -> None:
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as err:
            raise MobileLLMError(f"cannot listen on {host}:{port} ({err.strerror}); "
                                 "choose another --port or --host") from None


def run(args) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise MobileLLMError("serving needs fastapi and uvicorn: pip install 'mobilellm[serve]'") from None
    from pathlib import Path

    from mobilellm.generate import load_engine

    if args.max_batch < 1 or args.max_queue < 0:
        raise MobileLLMError("--max-batch must be >= 1 and --max-queue >= 0")
    if not (0 <= args.port <= 65535):
        raise MobileLLMError(f"--port must be between 0 and 65535, got {args.port}")
    _check_port(args.host, args.port)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    engine = load_engine(args.model, weights=args.weights, compile=args.compile, threads=args.threads,
                         max_batch=args.max_batch, max_len=args.max_len, backend=args.backend)
    name = args.model_name or Path(args.model).resolve().name
    app = create_app(engine, name, api_key=api_key, max_queue=args.max_queue)
    print(f"serving {name} on http://{args.host}:{args.port}/v1 ({args.max_batch} slots, context {engine.max_len}, "
          f"weights {args.weights}{', API key required' if api_key else ''})", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0


def register(sub) -> None:
    from mobilellm.generate import BACKENDS, WEIGHT_MODES

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching",
                       description="Serves /v1/completions, /v1/chat/completions (streaming or not), /v1/models and "
                                   "/health. Needs the [serve] extra (fastapi, uvicorn).")
    p.add_argument("model", help="model directory (with tokenizer files)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer KEY' (or set {API_KEY_ENV})")
    p.add_argument("--model-name", default=None, help="model id clients send (default: the directory name)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together, one cache row each (default 8)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests allowed to wait for a row; more get 503 (default 64)")
    p.add_argument("--max-len", type=int, default=None, help="context per request (default: the model's)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the model")
    p.add_argument("--weights", choices=WEIGHT_MODES, default="fp32", help="decode weights (default fp32)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="native C forward pass (built once with the C compiler) or torch; auto: native where it builds")
    p.add_argument("--compile", action="store_true", help="torch.compile the torch backend's decode step")
    p.add_argument("--log-level", default="warning", help="uvicorn log level (default warning)")
    p.set_defaults(func=run)
