"""The compile -> save -> reload loop of a notebook or a hot-reloading server: compiling model B
and saving it where model A was saved, then loading that path again in the same process, runs
B's code with B's weights (it used to run A's cached kernels.so with B's weights)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import moec
from moec.models.reference import demo_model

from .conftest import MAX_TOKENS, MODEL_KW, Demo, eager, tokens


def test_compile_save_reload_to_one_path(demo: Demo, tmp_path: Path) -> None:
    x = tokens(9, seed=3)
    path = demo.artifact.save(tmp_path / "m.moec")
    model_a = moec.load(path)
    np.testing.assert_allclose(model_a(x), eager(demo.module, x), rtol=1e-4, atol=1e-4)

    # Same signature, other code (top-1 routing) and other weights.
    kw = dict(MODEL_KW, seed=5, top_k=1)
    module_b, example = demo_model(**kw)
    module_b.eval()
    moec.compile(module_b, example, max_tokens=MAX_TOKENS).save(path)
    model_b = moec.load(path)
    assert model_b.signature == model_a.signature
    np.testing.assert_allclose(model_b(x), eager(module_b, x), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(model_a(x), eager(demo.module, x), rtol=1e-4, atol=1e-4)
