"""Fixtures: the tiny artifacts of tiny_models.py, built and saved once per session."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from .tiny_models import build_ids_model, ir_header, make_artifact


@pytest.fixture(scope="session")
def scale_artifact() -> Any:
    return make_artifact()


@pytest.fixture(scope="session")
def scale_weights(scale_artifact: Any) -> dict[str, np.ndarray]:
    return dict(scale_artifact.weights)


@pytest.fixture(scope="session")
def saved_path(scale_artifact: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved `scale` artifact; tests must not modify it (use `artifact_copy`)."""
    return scale_artifact.save(tmp_path_factory.mktemp("art") / "scale.moec")


@pytest.fixture
def artifact_copy(saved_path: Path, tmp_path: Path) -> Path:
    """A private copy of the saved artifact, free to damage."""
    return Path(shutil.copytree(saved_path, tmp_path / "copy.moec"))


@pytest.fixture(scope="session")
def model(saved_path: Path) -> Any:
    from moec.runtime import load

    return load(saved_path)


@pytest.fixture(scope="session")
def ids_model(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from moec.runtime import load

    ir = ir_header({}, build_ids_model()[2]) + "%out: i32[T] = core.mul(%ids, 2)"
    art = make_artifact(build_ids_model, ir_text=ir)
    return load(art.save(tmp_path_factory.mktemp("ids") / "ids.moec"))
