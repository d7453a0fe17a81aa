"""The CPU side of benchmarks/gpu_check.py: its layer graphs and PyTorch reference agree with
moec's reference interpreter, its shape-only layers compile for cuda:sm_90, and its runtime-only
TVM bundle loads and runs an artifact in a fresh process. (The GPU side runs on a GPU machine.)"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moec.ir import interpret, parse
from moec.passes import PassManager, parse_pipeline

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"
_spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gc)


@pytest.mark.parametrize("layer", sorted(gc.TINY))
@pytest.mark.parametrize("skew", [False, True])
@pytest.mark.parametrize("tokens", [0, 1, 37])
def test_torch_reference_matches_the_interpreter(layer, skew, tokens):
    """The reference the GPU check trusts is itself checked: same routing and outputs as moec's
    reference interpreter on the layer graph, before and after the default pipeline (f32)."""
    c = gc.TINY[layer]
    p = gc.make_weights(c, torch.float32, "cpu", seed=3, skew=skew)
    x = gc.make_x(p, c, tokens, torch.float32, "cpu", seed=tokens)
    g = parse(gc.layer_text(c, "float32"))
    for name in g.params:
        g.param_data[name] = p[name].numpy()
    y, w, ids = interpret(g, [x.numpy()])
    rw, rids, _ = gc.torch_route(x, p["router"], p.get("bias"), c)
    np.testing.assert_array_equal(np.sort(ids, -1), np.sort(rids.numpy(), -1))
    np.testing.assert_allclose(w, rw.numpy(), rtol=1e-5, atol=1e-6)
    ref = gc.torch_experts(x, rw, rids, p, torch.float32).numpy()
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)
    if skew and tokens:  # the skew really concentrates the load
        counts = np.bincount(ids.reshape(-1), minlength=c["E"])
        assert counts[0] > 2 * counts.mean()
    PassManager(parse_pipeline("default")).run(g)
    y2, _, _ = interpret(g, [x.numpy()])
    np.testing.assert_allclose(y2, y, rtol=1e-4, atol=1e-5)


def test_prepare_builds_shape_only_layers_for_sm90(tmp_path: Path):
    """`prepare` compiles a layer whose expert weights have no data (they are made on the GPU)
    into a library with a fatbin; only the router's packed bias is stored."""
    meta = gc.build_layer(gc.TINY["deepseek_v3"], "bfloat16", tmp_path / "ds")
    assert (tmp_path / "ds" / "kernels.so").stat().st_size > 0
    stored = [p["param"] for p in meta["params"] if p["stored"]]
    assert stored == ["bias"]
    assert {p["param"] for p in meta["params"]} == set(gc.param_shapes(gc.TINY["deepseek_v3"]))
    assert "moe.router" in meta["ops"] and "moe.grouped_matmul" in meta["ops"]


def test_runtime_only_bundle_runs_an_artifact(tmp_path: Path):
    """The tvm package without libtvm_compiler (what travels to the GPU machine) loads and runs
    an artifact in a fresh process, in TVM's runtime-only mode."""
    import moec
    from moec.models.reference import demo_model

    model, (x,) = demo_model(hidden=64, intermediate=64, experts=4)
    art_path = moec.compile(model, (x,), max_tokens=64).save(tmp_path / "demo.moec")
    want = model(torch.from_numpy(np.ones((3, 64), np.float32))).detach().numpy()
    tree = gc.runtime_tree(tmp_path / "site")
    assert not list(tree.rglob("libtvm_compiler*"))
    code = ("import numpy as np, moec, tvm; from tvm import base; assert base._RUNTIME_ONLY; "
            f"m = moec.load({str(art_path)!r}); "
            "print(repr(m(np.ones((3, 64), np.float32)).tolist()))")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}"
           f"{Path(__file__).resolve().parents[2]}"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    np.testing.assert_allclose(np.array(eval(out.stdout)), want, rtol=1e-4, atol=1e-5)
