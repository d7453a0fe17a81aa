"""Helpers of the server tests (imported by name: pytest puts this folder on sys.path, and a
conftest module is not importable by name when several folders have one)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path

CONTEXT = 4096  # long enough that a request of CONTEXT - 100 tokens outlasts any test timing


class Server:
    """A moec server on 127.0.0.1:<free port>, run by uvicorn in a thread."""

    def __init__(self, path: Path, *, max_batch: int = 16, kv_cache=None, load_kw=None,
                 **app_kw) -> None:
        import uvicorn

        import moec
        from moec.serve import create_app

        self.model = moec.load(str(path), max_batch=max_batch, kv_cache=kv_cache,
                               **(load_kw or {}))
        self.app = create_app(self.model, **app_kw)
        self.state = self.app.state.moec
        self.engine = self.model.engine
        config = uvicorn.Config(self.app, log_level="warning", lifespan="on",
                                timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(
            target=lambda: asyncio.run(self.server.serve(sockets=[self.sock])), daemon=True)
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() - t0 < 30, "server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive()
