"""`moec serve`: an OpenAI-compatible HTTP server for a generation artifact.

    moec serve m.moec --port 8000 --api-key "$KEY" --kv-cache 2GB --max-batch 16

SIGTERM (or Ctrl-C) drains: the listening socket closes, requests that arrive on open
connections get 503, the requests in flight run to their end for at most --drain-timeout
seconds (then they are cancelled), the engine thread stops and the process exits (0 after a
SIGTERM).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Any

from moec.errors import InputError


def add_commands(sub: Any) -> None:
    from moec.engine.cli import add_device_argument, add_offload_arguments
    from moec.serve.runner import DEFAULT_MAX_QUEUE, DEFAULT_TIMEOUT

    s = sub.add_parser("serve", help="serve a causal LM artifact over HTTP with the OpenAI API "
                       "(/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics)")
    s.add_argument("artifact", help="a generation artifact (compiled from a checkpoint folder)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: "
                   "this machine only; 0.0.0.0 for every interface)")
    s.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on "
                   "every route but /health (default: $MOEC_API_KEY if set)")
    s.add_argument("--model-name", default=None, help="the model id clients send (default: "
                   "the artifact's name)")
    s.add_argument("--kv-cache", default=None, help="KV cache size, e.g. 2GB")
    s.add_argument("--max-batch", type=int, default=16, help="most sequences decoded at once")
    s.add_argument("--max-seq-len", type=int, default=None, help="longest prompt + output in "
                   "tokens (default: the model's context, at most 4096)")
    s.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help="sequences that may wait for the batch; beyond, 503 with Retry-After")
    s.add_argument("--request-timeout", type=float, default=DEFAULT_TIMEOUT,
                   help="seconds before a request is cancelled (0: no timeout)")
    s.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds given to running requests to finish")
    add_device_argument(s)
    add_offload_arguments(s)  # --expert-budget, --expert-policy, --prefetch, --expert-source
    s.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's and moec's logging (default: %(default)s)")
    s.set_defaults(fn=cmd_serve)


def cmd_serve(a: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        raise InputError("moec serve needs uvicorn and starlette: pip install 'moec[serve]'"
                         ) from None
    from moec import env
    from moec.engine.cli import _load
    from moec.serve.app import create_app

    if not 0 <= a.port <= 65535:
        raise InputError(f"--port must be in 0..65535, got {a.port}")
    if a.drain_timeout < 0:
        raise InputError(f"--drain-timeout must be >= 0, got {a.drain_timeout}")
    # SIGTERM before the server runs (while loading) exits; after a drain, uvicorn re-raises
    # the signal it caught, and this handler turns it into a clean exit
    previous = signal.signal(signal.SIGTERM, _exit_0)
    try:
        model = _load(a, max_batch=a.max_batch)
        key = a.api_key if a.api_key is not None else env.api_key()
        app = create_app(model, model_name=a.model_name, api_key=key, max_queue=a.max_queue,
                         request_timeout=a.request_timeout or None)
        logging.basicConfig(level=a.log_level.upper(), format="%(levelname)s: %(message)s")
        config = uvicorn.Config(app, host=a.host, port=a.port, log_level=a.log_level,
                                timeout_graceful_shutdown=a.drain_timeout, lifespan="on")
        sock = config.bind_socket()
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        ready = (f"moec serve: {app.state.moec.model_name} on http://{shown}:{port}/v1"
                 f"{' (API key required)' if key else ''}")
        draining_server(config, app.state.moec, ready).run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def draining_server(config: Any, state: Any, ready: str) -> Any:
    """A uvicorn.Server that prints `ready` once it accepts connections, and marks the app as
    draining (new requests: 503) when a signal tells it to exit; uvicorn then waits up to
    timeout_graceful_shutdown for the requests in flight and cancels the rest."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            if not self.should_exit:
                print(ready, flush=True)

        def handle_exit(self, sig: int, frame: Any) -> None:
            state.draining = True
            super().handle_exit(sig, frame)

    return DrainingServer(config)


def _exit_0(signum: int, frame: Any) -> None:
    sys.exit(0)
