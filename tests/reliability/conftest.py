"""One small compiled demo MoE model, shared by every reliability test (a compile takes seconds).

`demo`: (torch module, the compiled Artifact, its saved folder, the loaded CompiledModel). Tests
must not modify the saved folder; `artifact_copy` gives a private copy to damage.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest

HIDDEN, MAX_TOKENS = 64, 64
MODEL_KW = dict(seed=1, hidden=HIDDEN, intermediate=96, experts=8, top_k=2)


class Demo(NamedTuple):
    module: Any
    artifact: Any
    path: Path
    model: Any


def build() -> Any:
    """Compile the reference model (used in-process and in subprocesses); returns the Artifact."""
    import moec
    from moec.models.reference import demo_model

    module, example = demo_model(**MODEL_KW)
    return moec.compile(module, example, max_tokens=MAX_TOKENS)


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    import moec
    from moec.models.reference import demo_model

    artifact = build()
    path = artifact.save(tmp_path_factory.mktemp("reliability") / "demo.moec")
    module, _ = demo_model(**MODEL_KW)
    module.eval()
    return Demo(module, artifact, path, moec.load(path))


@pytest.fixture
def artifact_copy(demo: Demo, tmp_path: Path) -> Path:
    return Path(shutil.copytree(demo.path, tmp_path / "copy.moec"))


def tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, HIDDEN)).astype(np.float32)


def eager(module: Any, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return module(torch.from_numpy(np.array(x, np.float32))).numpy()  # a writable copy
