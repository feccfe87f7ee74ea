"""`mobilellm serve <model dir>`: the OpenAI-compatible server (mobilellm.serve) under uvicorn."""

from __future__ import annotations

import os
import sys

from mobilellm.commands.options import add_runtime_args, engine_args
from mobilellm.errors import MobileLLMError


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
    from mobilellm.inference import load_engine
    from mobilellm.serve import API_KEY_ENV, OpenAIServer, ServerLimits, model_name_for

    if args.max_batch < 1 or args.max_queue < 0 or args.max_request_bytes < 1024:
        raise MobileLLMError("--max-batch must be >= 1, --max-queue >= 0 and --max-request-bytes >= 1024")
    if not (0 <= args.port <= 65535):
        raise MobileLLMError(f"--port must be between 0 and 65535, got {args.port}")
    _check_port(args.host, args.port)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    engine = load_engine(args.model, max_batch=args.max_batch, max_len=args.max_len, **engine_args(args))
    name = args.model_name or model_name_for(args.model)
    server = OpenAIServer(engine, name, api_key=api_key,
                          limits=ServerLimits(max_request_bytes=args.max_request_bytes, max_queue=args.max_queue))
    print(f"serving {name} on http://{args.host}:{args.port}/v1 ({args.max_batch} slots, context {engine.max_len}, "
          f"{engine.precision} on the {engine.backend.name} backend{', API key required' if api_key else ''})",
          file=sys.stderr, flush=True)
    uvicorn.run(server.app(), host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0


def register(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching",
                       description="Serves /v1/completions, /v1/chat/completions (streaming or not), /v1/models and "
                                   "/health. Needs the [serve] extra (fastapi, uvicorn).")
    p.add_argument("model", help="model directory (with tokenizer files; float or quantized)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set MOBILELLM_API_KEY)")
    p.add_argument("--model-name", default=None,
                   help="model id clients send (default: the directory's name, or its parent's for final/, model/)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together, one cache row each (default 8)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests allowed to wait for a row; more get 503 (default 64)")
    p.add_argument("--max-request-bytes", type=int, default=1_000_000,
                   help="larger request bodies get 413 (default 1000000)")
    p.add_argument("--max-len", type=int, default=None, help="context per request (default: the model's)")
    p.add_argument("--log-level", default="warning", help="uvicorn log level (default warning)")
    add_runtime_args(p)
    p.set_defaults(func=run)
