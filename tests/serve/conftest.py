"""Fixtures of the server tests: one tiny checkpoint (qwen3_moe, random weights) with a trained
BPE tokenizer and a chat template, compiled once for the whole directory, and servers started
on a free loopback port in a thread of the test process (`serve(...)`)."""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

sys.path.insert(0, str(Path(__file__).parents[1] / "generate"))

from families import config, randomize  # noqa: E402

CONTEXT = 4096  # long enough that a request of CONTEXT - 100 tokens outlasts any test timing


def save_tokenizer(folder: Path) -> None:
    from test_text import save_tokenizer as save  # tests/generate/test_text.py

    save(folder)


@pytest.fixture(scope="session")
def artifact(tmp_path_factory) -> Path:
    """A generation artifact with a tokenizer and a chat template (context CONTEXT tokens)."""
    import torch
    import transformers

    import moec

    tmp = tmp_path_factory.mktemp("serve")
    cfg = config("qwen3_moe")
    cfg.max_position_embeddings = CONTEXT
    torch.manual_seed(4)
    m = randomize(transformers.AutoModelForCausalLM.from_config(cfg), 4)
    m.save_pretrained(tmp / "ckpt")
    save_tokenizer(tmp / "ckpt")
    out = tmp / "tiny.moec"
    moec.compile(str(tmp / "ckpt"), max_tokens=64).save(out)
    return out


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


@pytest.fixture(scope="module")
def server(artifact):
    s = Server(artifact, max_batch=16)
    yield s
    s.stop()
