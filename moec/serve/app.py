"""The ASGI app of `moec serve` (Starlette): the OpenAI routes, /health, /metrics, the API-key
check and OpenAI-style error bodies.

    app = create_app(moec.load("m.moec", max_batch=16), api_key="secret")
    uvicorn.run(app, host="127.0.0.1", port=8000)

The engine thread starts and stops with the app (its lifespan).
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from moec.engine.engine import Engine
from moec.engine.llm import LanguageModel
from moec.engine.tokenizer import Tokenizer
from moec.errors import InputError
from moec.serve.metrics import Metrics
from moec.serve.openai_api import Generation
from moec.serve.protocol import ApiError
from moec.serve.runner import DEFAULT_MAX_QUEUE, DEFAULT_TIMEOUT, EngineRunner

log = logging.getLogger("moec.serve")


@dataclass
class ServerState:
    """Everything the handlers share."""

    engine: Engine
    tokenizer: Tokenizer | None
    model_name: str
    runner: EngineRunner
    metrics: Metrics
    api_key: str | None = None
    request_timeout: float | None = DEFAULT_TIMEOUT
    draining: bool = False  # set on SIGTERM: new requests get 503
    created: int = field(default_factory=lambda: int(time.time()))


def create_app(model: LanguageModel, *, model_name: str | None = None,
               api_key: str | None = None, max_queue: int = DEFAULT_MAX_QUEUE,
               request_timeout: float | None = DEFAULT_TIMEOUT) -> Starlette:
    """The ASGI app serving `model` (what `moec.load` returns for a generation artifact).

    model_name: the id clients put in `model` (default: the artifact's file name without its
    suffix). api_key: if given, every route but /health needs `Authorization: Bearer KEY`.
    max_queue: sequences that may wait for a place in the running batch; beyond
    `max_batch + max_queue` outstanding, requests get 503 with Retry-After.
    request_timeout: seconds from arrival after which a request is cancelled (None: never)."""
    if not isinstance(model, LanguageModel):
        raise InputError(f"moec serve needs a generation artifact (a causal LM compiled from a "
                         f"checkpoint folder), got {type(model).__name__}")
    if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
        raise InputError(f"max_queue must be an integer >= 0, got {max_queue!r}")
    if request_timeout is not None and not request_timeout > 0:
        raise InputError(f"request_timeout must be > 0 seconds (or None), got "
                         f"{request_timeout!r}")
    if api_key is not None and not api_key:
        raise InputError("api_key must not be empty")
    engine = model.engine
    name = model_name or _default_name(model.path)

    def gauges() -> dict[str, tuple[str, float]]:
        pool = engine.pool
        return {
            "moec_requests_running": ("Sequences in the running batch.", len(engine.running)),
            "moec_requests_waiting": ("Sequences waiting for a place in the batch.",
                                      len(engine.waiting)),
            "moec_kv_cache_blocks_in_use": ("KV-cache blocks held by sequences.",
                                            pool.num_blocks - pool.num_free),
            "moec_kv_cache_blocks_total": ("KV-cache blocks in the pool.", pool.num_blocks),
            "moec_kv_cache_usage_ratio": ("Fraction of the KV-cache blocks in use.",
                                          (pool.num_blocks - pool.num_free) / pool.num_blocks),
            "moec_preemptions": ("Sequences preempted (recomputed later) since start.",
                                 engine.stats["preemptions"]),
        }

    metrics = Metrics(gauges)
    runner = EngineRunner(engine, metrics, max_queue)
    state = ServerState(engine, model.tokenizer, name, runner, metrics, api_key,
                        request_timeout)
    gen = Generation(state)

    async def health(request: Request) -> Response:
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not runner.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics_page(request: Request) -> Response:
        return PlainTextResponse(metrics.render(),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{
            "id": name, "object": "model", "created": state.created, "owned_by": "moec",
            "max_model_len": engine.max_seq_len}]})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        runner.start()
        try:
            yield
        finally:
            runner.stop()

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics_page, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/completions", gen.completions, methods=["POST"]),
        Route("/v1/chat/completions", gen.chat_completions, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={
        ApiError: _api_error, HTTPException: _http_error, Exception: _internal_error})
    app.state.moec = state
    if api_key is not None:
        app.add_middleware(ApiKey, key=api_key)
    return app


def _default_name(path: Any) -> str:
    p = Path(str(path))
    name = p.name
    for suffix in (".tar", ".moec"):
        name = name.removesuffix(suffix)
    return name or "moec"


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    err = ApiError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}",
                   code="not_found" if exc.status_code == 404 else None)
    return JSONResponse(err.body(), status_code=exc.status_code, headers=exc.headers)


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error in %s %s", request.method, request.url.path)
    err = ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")
    return JSONResponse(err.body(), status_code=500)


class ApiKey:
    """ASGI middleware: every HTTP route but /health needs `Authorization: Bearer KEY`
    (compared in constant time); 401 with an OpenAI-style error body otherwise."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self.expected = f"Bearer {key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/health":
            await self.app(scope, receive, send)
            return
        got = dict(scope["headers"]).get(b"authorization", b"")
        if not hmac.compare_digest(got, self.expected):
            state: ServerState = scope["app"].state.moec if "app" in scope else None
            if state is not None:
                state.metrics.outcome("unauthorized")
            err = ApiError(401, "a valid API key is needed: send the header 'Authorization: "
                           "Bearer KEY'", code="invalid_api_key")
            resp = JSONResponse(err.body(), status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
            await resp(scope, receive, send)
            return
        await self.app(scope, receive, send)
