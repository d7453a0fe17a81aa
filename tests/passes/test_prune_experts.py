"""prune-experts: Before/Expected IR from a profile, and the error pruning costs on held-out
inputs of a model with two rarely used experts."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from moec.errors import PassError
from moec.ir import interpret, parse
from moec.passes import PassManager, parse_pipeline
from moec.passes.prune_experts import PruneExperts
from moec.testing import assert_ir_equal, run_pass

BEFORE = """
dim T: 0..64
input %x: f32[T, 16]
param @r: f32[4, 16]
param @wd: f32[4, 8, 16]
%w: f32[T, 2], %i: i32[T, 2] = moe.router(%x, @r) {k=2}
%s: i32[(T//4+4)*8], %te: i32[T//4+4], %sr: i32[T, 2] = moe.align(%i) {block_m=8, num_experts=4}
%y: f32[(T//4+4)*8, 8] = moe.grouped_matmul(%x, @wd, %s, %te) {block_m=8, top_k=2, gather=true}
%o: f32[T, 8] = moe.combine(%y, %w, %sr)
output %o
"""


def _profile(tmp_path, load, router="r"):
    p = tmp_path / "profile.json"
    p.write_text(json.dumps({"layers": [{"router": router, "load": load}]}))
    return str(p)


def _graph(text):
    g = parse(text)
    rng = np.random.default_rng(0)
    for name, v in g.params.items():
        g.param_data[name] = rng.standard_normal([int(d) for d in v.shape]).astype(np.float32)
    return g


def test_prune_experts_ir(tmp_path):
    g = _graph(BEFORE)
    r, wd = g.param_data["r"], g.param_data["wd"]
    out = run_pass(PruneExperts(profile=_profile(tmp_path, [0.5, 0.005, 0.3, 0.195])), g)
    assert_ir_equal(out, """
      dim T: 0..64
      input %x: f32[T, 16]
      param @r.pruned: f32[3, 16]
      param @wd.pruned: f32[3, 8, 16]
      %w: f32[T, 2], %i: i32[T, 2] = moe.router(%x, @r.pruned) {k=2}
      %s: i32[(T//4+3)*8], %te: i32[T//4+3], %sr: i32[T, 2] = moe.align(%i) {block_m=8, num_experts=3}
      %y: f32[(T//4+3)*8, 8] = moe.grouped_matmul(%x, @wd.pruned, %s, %te) {block_m=8, top_k=2, gather=true}
      %o: f32[T, 8] = moe.combine(%y, %w, %sr)
      output %o
    """)
    np.testing.assert_array_equal(out.param_data["r.pruned"], r[[0, 2, 3]])
    np.testing.assert_array_equal(out.param_data["wd.pruned"], wd[[0, 2, 3]])


def test_prune_experts_keeps_top_k(tmp_path):
    g = run_pass(PruneExperts(profile=_profile(tmp_path, [0.0, 0.0, 0.9, 0.1]), threshold=0.5),
                 _graph(BEFORE))
    assert g.params["r.pruned"].shape[0] == 2  # never fewer experts than k


def test_prune_experts_nothing_below_threshold(tmp_path):
    g = run_pass(PruneExperts(profile=_profile(tmp_path, [0.25] * 4)), _graph(BEFORE))
    assert "r" in g.params


def test_prune_experts_needs_profile():
    with pytest.raises(PassError, match="profile"):
        run_pass(PruneExperts(), _graph(BEFORE))


def rare_experts_model():
    """The demo layer with experts 6 and 7 made rare (router logit bias -3.5)."""
    from moec.models.reference import demo_model, skew_router

    model, _ = demo_model(hidden=64, intermediate=128, tokens=8)
    skew_router(model, expert=0, margin=0.0)
    with torch.no_grad():
        model.mlp.gate.bias[6:] = -3.5
    return model


def prune_error(tmp_path, threshold=0.02):
    """(held-out relative error of the layer output, of the MoE output, kept experts)."""
    from moec.compiler import to_graph
    from moec.profile import profile_graph

    model = rare_experts_model()
    gen = torch.Generator().manual_seed(5)
    calib, held = (torch.randn(256, 64, generator=gen).numpy() for _ in range(2))
    g = to_graph(model, (torch.from_numpy(calib[:8]),), 256)
    PassManager(parse_pipeline("default")).run(g)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(profile_graph(g, [[calib]])))
    seen = {}

    def run(graph):
        y = interpret(graph, [held], observer=lambda n, o: seen.update(
            moe=o[0]) if n.op == "moe.combine" else None)[0]
        return y, seen["moe"]

    ref, ref_moe = run(g)
    pm = PassManager([PruneExperts(profile=str(path), threshold=threshold)])
    pm.run(g)
    y, moe = run(g)
    rel = [float(np.linalg.norm(a - b) / np.linalg.norm(b)) for a, b in ((y, ref),
                                                                        (moe, ref_moe))]
    return rel[0], rel[1], pm.ctx.stats["prune-experts.kept"]


def test_prune_rare_experts_error(tmp_path):
    layer, moe, kept = prune_error(tmp_path)
    assert kept == {"mlp.gate.weight": [0, 1, 2, 3, 4, 5]}
    assert layer < 0.02 and moe < 0.1


@pytest.mark.parametrize(("content", "pattern"), [
    (None, "not a regular file"),  # /dev/zero: used to be read forever
    ("fifo", "not a regular file"),
    ("missing", "cannot be read"),
    ([1, 2], 'no "layers" list'),
    ({"layers": "x"}, 'no "layers" list'),
    ({"layers": [1]}, r"layers\[0\] is not a layer"),
    ({"layers": [{"load": [0.5]}]}, r"layers\[0\] is not a layer"),  # was KeyError
    ({"layers": [{"router": "r", "load": "abc"}]}, r"layers\[0\]"),
    ({"layers": [{"router": "r", "load": [0.5, -1, 0.2, 0.3]}]}, r"layers\[0\]"),
    (b"\xff\xfe", "not JSON"),
    (b"[" * 100_000, "not JSON"),
])
def test_prune_experts_bad_profiles_are_pass_errors(tmp_path, content, pattern):
    path = tmp_path / "p.json"
    if content is None:
        path = Path("/dev/zero")
    elif content == "fifo":
        os.mkfifo(path)
    elif content == "missing":
        pass
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(json.dumps(content))
    with pytest.raises(PassError, match=pattern):
        run_pass(PruneExperts(profile=str(path)), _graph(BEFORE))
