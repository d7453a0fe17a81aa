"""moec.codegen.tune: the tuning database, tuned compiles, and `moec tune` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import moec
from moec.cli import main
from moec.codegen import tune
from moec.codegen.kernels.base import vector_lanes
from moec.codegen.kernels.grouped_matmul import grouped_tiles
from moec.compiler import to_graph
from moec.errors import InputError
from moec.models.reference import demo_model

HIDDEN, INTER, E, K = 64, 96, 4, 2
FACTORY = '''
from moec.models.reference import demo_model
def make():
    return demo_model(hidden=64, intermediate=96, experts=4, top_k=2)
'''


@pytest.fixture(autouse=True)
def private_user_db(tmp_path, monkeypatch):
    """Every test gets its own (empty) user cache."""
    monkeypatch.setenv("MOEC_TUNING_DB", str(tmp_path / "user-tuning.json"))


def _shape() -> tune.LayerShape:
    model, (x,) = demo_model(hidden=HIDDEN, intermediate=INTER, experts=E, top_k=K)
    (shape,) = tune.layers_of(to_graph(model, (x,), 64))
    return shape


def test_layer_shape_of_the_demo_block():
    s = _shape()
    assert (s.experts, s.hidden, s.intermediate, s.top_k, s.activation, s.bias, s.dtype) == (
        E, HIDDEN, INTER, K, "silu_mul", False, "float32")
    assert s.key == "E4_H64_I96_k2_silu_mul_float32"


def test_db_merges_atomically_and_names_a_damaged_file(tmp_path):
    db = tmp_path / "db.json"
    tune.write_db(db, {"a|x": {"block_m": 16, "tiles": [None, None]}})
    tune.write_db(db, {"a|y": {"block_m": 64, "tiles": [[6, 8], None]}})
    assert set(tune.read_db(db)) == {"a|x", "a|y"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tuning-")]
    db.write_text("{not json")
    with pytest.raises(InputError, match=str(db)):
        tune.read_db(db)
    db.write_text(json.dumps({"format": 99, "entries": {}}))
    with pytest.raises(InputError, match="format 1"):
        tune.load_db(db)
    with pytest.raises(InputError, match="does not exist"):
        tune.load_db(tmp_path / "missing.json")


def test_no_entry_means_the_defaults():
    c = tune.choose(_shape(), {})
    assert c == tune.Choice() and c.block_m == tune.DEFAULT_BLOCK_M


def _entry(block_m: int, tiles) -> dict:
    return {f"{tune.cpu_name()}|{_shape().key}": {"block_m": block_m, "tiles": tiles}}


@pytest.mark.parametrize(("routing", "width"), [("uniform", "host"), ("skewed", "host"),
                                              ("uniform", "avx2"), ("uniform", "avx512")])
def test_tuned_compile_uses_the_entry_and_stays_exact(tmp_path, routing, width, monkeypatch):
    """Tiles are SIMD multiples of the width the kernels are built for. Both widths are built
    and run on any x86-64 host: LLVM splits 16-lane vectors into 8-lane ones on AVX2."""
    from moec.codegen.kernels import base
    from moec.models.reference import skew_router

    if width != "host":
        monkeypatch.setattr(base, "_vector_bits", lambda: {"avx2": 256, "avx512": 512}[width])
    db = tmp_path / "db.json"
    lanes = vector_lanes("float32")  # 8 with AVX2, 16 with AVX-512: tiles are SIMD multiples
    tune.write_db(db, _entry(16, [[6, lanes], [6, 2 * lanes]]))
    model, (x,) = demo_model(hidden=HIDDEN, intermediate=INTER, experts=E, top_k=K)
    if routing == "skewed":
        skew_router(model, expert=1)
    art = moec.compile(model, (x,), max_tokens=128, tuning=db)
    path = art.save(tmp_path / "t.moec")
    manifest = json.loads((Path(path) / "manifest.json").read_text())
    text = json.dumps(manifest)
    assert "reorder-dispatch{block_m=16}" in text, manifest.get("pipeline")
    assert f"t6x{lanes}" in text and f"t6x{2 * lanes}" in text  # names carry the tiles
    assert manifest["meta"]["tuning"][_shape().key]["block_m"] == 16, manifest["meta"]
    m = moec.load(path)
    for t in (0, 1, 5, 64, 128):
        xs = torch.randn(t, HIDDEN)
        with torch.no_grad():
            want = model(xs).numpy()
        got = m(xs.numpy())
        assert got.shape == want.shape
        if t:
            assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_expert_parallel_build_uses_the_tuned_tiles(tmp_path):
    """One build path: `ep=True` builds `main` and the one-expert kernels of the EP functions
    with the tuned tiles the manifest records (EP builds used to drop them)."""
    db = tmp_path / "db.json"
    lanes = vector_lanes("float32")
    tune.write_db(db, _entry(16, [[6, lanes], [6, 2 * lanes]]))
    model, (x,) = demo_model(hidden=HIDDEN, intermediate=INTER, experts=E, top_k=K)
    path = moec.compile(model, (x,), max_tokens=64, tuning=db, ep=True).save(tmp_path / "e.moec")
    manifest = json.loads((Path(path) / "manifest.json").read_text())
    assert manifest["meta"]["tuning"][_shape().key]["tiles"] == [[6, lanes], [6, 2 * lanes]]
    gemms = [k for k in manifest["meta"]["kernels"] if k.startswith("grouped_matmul")]
    one_expert = [k for k in gemms if "_E_1_" in k]
    assert len(one_expert) == 2 and len(gemms) == 4, gemms
    assert all(f"_t6x{lanes}" in k or f"_t6x{2 * lanes}" in k for k in gemms), gemms
    xs = torch.randn(9, HIDDEN)
    with torch.no_grad():
        want = model(xs).numpy()
    got = moec.load(path)(xs.numpy())
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_tuning_false_ignores_the_user_cache(tmp_path):
    tune.write_db(tune.user_db_path(), _entry(16, [None, None]))
    model, (x,) = demo_model(hidden=HIDDEN, intermediate=INTER, experts=E, top_k=K)
    text = json.dumps(json.loads((Path(moec.compile(model, (x,), max_tokens=64, tuning=False)
                                       .save(tmp_path / "d.moec")) / "manifest.json").read_text()))
    assert '"reorder-dispatch"' in text and "block_m=16" not in text and '"tuning"' not in text
    text = json.dumps(json.loads((Path(moec.compile(model, (x,), max_tokens=64)
                                       .save(tmp_path / "u.moec")) / "manifest.json").read_text()))
    assert "reorder-dispatch{block_m=16}" in text  # the user cache applies by default


def test_moec_tune_then_compile(tmp_path, capsys):
    """`moec tune` measures the demo layer (one block_m, two token counts), writes the database;
    `moec compile --tuning-db` applies what it chose."""
    (tmp_path / "f.py").write_text(FACTORY)
    db = tmp_path / "tuned.json"
    assert main(["tune", f"{tmp_path / 'f.py'}:make", "-o", str(db), "--tokens", "1", "8",
                 "--reps", "1", "--block-m", "16"]) == 0
    out = capsys.readouterr().out
    assert "best: block_m 16" in out and f"wrote 1 entry to {db}" in out
    (entry,) = tune.read_db(db).values()
    assert entry["block_m"] == 16 and set(entry["measured_ms"]) == {"1", "8"}
    for t, gemm in zip(entry["tiles"], _shape().gemms(), strict=True):
        gated = gemm[3].endswith("_mul")
        assert tuple(t) in tune.tile_candidates("float32", gated) or tuple(t) == grouped_tiles(
            "float32", 16, gated)
    assert main(["compile", f"{tmp_path / 'f.py'}:make", "-o", str(tmp_path / "a.moec"),
                 "--max-tokens", "64", "--tuning-db", str(db)]) == 0
    manifest = (tmp_path / "a.moec" / "manifest.json").read_text()
    assert "reorder-dispatch{block_m=16}" in manifest


@pytest.mark.slow
def test_bf16_layer_tunes_float32_kernels_on_bf16_weights(tmp_path):
    """A bf16 layer is tuned as it is compiled for the CPU (widen-activations): float32
    kernels reading bf16 weights. Its entry has its own key and applies to its compile, whose
    output still matches the model (the tuned block_m is used)."""
    model, (x,) = demo_model(hidden=HIDDEN, intermediate=INTER, experts=E, top_k=K)
    model, x = model.to(torch.bfloat16), x.to(torch.bfloat16)
    (shape,) = tune.layers_of(to_graph(model, (x,), 64))
    assert (shape.dtype, shape.compute_dtype, shape.w_dtype) == ("bfloat16", "float32",
                                                                 "bfloat16")
    assert shape.key.endswith("_bfloat16")
    entry = tune.tune_layer(shape, tokens=(1, 8), reps=1, block_ms=(16,))
    assert entry["block_m"] == 16 and set(entry["measured_ms"]) == {"1", "8"}
    db = tmp_path / "tuned.json"
    tune.write_db(db, {f"{tune.cpu_name()}|{shape.key}": entry})
    art = moec.compile(model, (x,), max_tokens=64, tuning=db)
    assert "reorder-dispatch{block_m=16}" in art.pipeline
    ref = model.float()(x.float()).detach()
    got = art.load_model()(x).float()
    assert (got - ref).abs().max() <= 2.0 ** -8 * ref.abs().max() + 1e-5
