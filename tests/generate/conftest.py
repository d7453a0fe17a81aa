"""Fixtures of the generation tests: tiny random checkpoints saved with save_pretrained and
compiled once per module (tests/generate/families.py builds them)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from families import compile_family  # noqa: E402


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return compile_family("mixtral", tmp_path_factory.mktemp("mixtral"))
