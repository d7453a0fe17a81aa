"""Fixtures of the server tests: one tiny checkpoint (qwen3_moe, random weights) with a trained
BPE tokenizer and a chat template, compiled once for the whole directory, and servers started
on a free loopback port in a thread of the test process (`serve(...)`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

sys.path.insert(0, str(Path(__file__).parents[1] / "generate"))
sys.path.insert(0, str(Path(__file__).parent))

from families import config, randomize  # noqa: E402
from serving import CONTEXT, Server  # noqa: E402


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


@pytest.fixture(scope="module")
def server(artifact):
    s = Server(artifact, max_batch=16)
    yield s
    s.stop()
