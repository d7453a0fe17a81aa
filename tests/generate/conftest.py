"""Fixtures of the generation tests: tiny random checkpoints saved with save_pretrained and
compiled once per module (tests/generate/families.py builds them)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from families import model as family_model  # noqa: E402

MAX_TOKENS = 64  # prompts longer than this are prefilled in chunks


def compile_family(family: str, tmp: Path, **kw):
    """(transformers model, artifact path) of a family's tiny checkpoint."""
    import moec

    m = family_model(family)
    m.save_pretrained(tmp / "ckpt")
    out = tmp / "model.moec"
    moec.compile(str(tmp / "ckpt"), max_tokens=kw.pop("max_tokens", MAX_TOKENS), **kw).save(out)
    return m, out


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return compile_family("mixtral", tmp_path_factory.mktemp("mixtral"))
