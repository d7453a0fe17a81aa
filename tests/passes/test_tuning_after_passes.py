"""Tuning follows the passes: block_m is chosen when reorder-dispatch runs, on the MoE layers as
they reach it, and the grouped-GEMM tiles after the pipeline, on the layers as lowered. A pass
that changes a layer's top-k (cap-topk) gets the entry of the new shape, not the old one."""

import json

import numpy as np
import pytest
import torch

import moec
from moec.codegen import tune
from moec.codegen.kernels.base import vector_lanes
from moec.models.reference import demo_model

SIZES = {"hidden": 64, "intermediate": 96, "experts": 4}
CAP = "default,cap-topk{k=1,renormalize=false}@after:fuse-gating"
# tiles that fit this CPU (NR a multiple of its SIMD width: 8 with AVX2, 16 with AVX-512)
VL = vector_lanes("float32")
TILES = [[6, VL], [6, 2 * VL]]


@pytest.fixture(autouse=True)
def private_user_db(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEC_TUNING_DB", str(tmp_path / "user-tuning.json"))


def _db(tmp_path, top_k: int):
    db = tmp_path / "db.json"
    key = f"E4_H64_I96_k{top_k}_silu_mul_float32"
    tune.write_db(db, {f"{tune.cpu_name()}|{key}": {"block_m": 16, "tiles": TILES}})
    return db, key


def test_the_capped_shape_gets_its_own_entry(tmp_path):
    db, key = _db(tmp_path, top_k=1)
    model, (x,) = demo_model(seed=7, top_k=2, **SIZES)
    art = moec.compile(model, (x,), max_tokens=64, passes=CAP, tuning=db)
    assert "reorder-dispatch{block_m=16}" in art.pipeline
    assert art.meta["tuning"] == {key: {"cpu": tune.cpu_name(), "block_m": 16,
                                        "tiles": TILES}}
    kernels = json.dumps(art.meta["kernels"])
    # the tuned tiles reached the lowering
    assert f"t6x{VL}" in kernels and f"t6x{2 * VL}" in kernels
    top1, _ = demo_model(seed=7, top_k=1, **SIZES)
    xs = torch.randn(37, 64)
    with torch.no_grad():
        want = top1(xs).numpy()
    np.testing.assert_allclose(art.load_model()(xs.numpy()), want, rtol=1e-4,
                               atol=1e-5 * np.abs(want).max())


def test_the_entry_of_the_uncapped_shape_is_not_applied_to_the_capped_layer(tmp_path):
    db, _ = _db(tmp_path, top_k=2)
    model, (x,) = demo_model(seed=7, top_k=2, **SIZES)
    art = moec.compile(model, (x,), max_tokens=64, passes=CAP, tuning=db)
    assert "reorder-dispatch" in art.pipeline and "block_m=16" not in " ".join(art.pipeline)
    assert "tuning" not in art.meta and f"t6x{VL}" not in json.dumps(art.meta["kernels"])
