"""cap-topk (dynamic gating): Before/Expected IR for both rewrites (router k, or slices), numbers
against a numpy cap of the router's own top-k for every router kind, the routers it must leave
alone, and a compiled demo layer equal to the same PyTorch layer built with top_k=1."""

import numpy as np
import pytest
import torch

import moec
from moec.errors import PassError
from moec.ir import interpret, parse
from moec.passes import PassManager, parse_pipeline
from moec.passes.cap_topk import CapTopK
from moec.testing import assert_ir_equal, run_pass

HEAD = """
dim T: 0..64
input %x: f32[T, 16]
param @r: f32[4, 16]
param @wg: f32[4, 8, 16]
param @wu: f32[4, 8, 16]
param @wd: f32[4, 16, 8]
"""
LAYER = HEAD + """
%w: f32[T, 2], %i: i32[T, 2] = moe.router(%x, @r) {k=2, ATTRS}
%y: f32[T, 16] = moe.experts(%x, %w, %i, @wg, @wu, @wd)
output %y
"""


def layer(attrs: str) -> str:
    return LAYER.replace("ATTRS", attrs)


def test_cap_changes_the_router_k_when_that_is_exact():
    """A renormalising router (norm_topk) capped with renormalize=true: only k changes."""
    after = run_pass(CapTopK(k=1), layer("scoring=softmax, norm_topk=true"))
    assert_ir_equal(after, HEAD + """
      %w: f32[T, 1], %i: i32[T, 1] = moe.router(%x, @r) {k=1, scoring=softmax, norm_topk=true}
      %y: f32[T, 16] = moe.experts(%x, %w, %i, @wg, @wu, @wd)
      output %y
    """)


def test_cap_slices_and_renormalises_otherwise():
    """A router without norm_topk capped with renormalize=true: the router keeps k=2, its first
    column is kept and scaled to the sum of both weights."""
    after = run_pass(CapTopK(k=1), layer("scoring=softmax"))
    assert_ir_equal(after, HEAD + """
      %w: f32[T, 2], %i: i32[T, 2] = moe.router(%x, @r) {k=2, scoring=softmax}
      %w1: f32[T, 1] = core.slice(%w) {axis=1, start=0, stop=1}
      %i1: i32[T, 1] = core.slice(%i) {axis=1, start=0, stop=1}
      %s: f32[T, 1] = core.sum(%w) {axis=1, keepdim=true}
      %s1: f32[T, 1] = core.sum(%w1) {axis=1, keepdim=true}
      %q: f32[T, 1] = core.div(%s, %s1)
      %wr: f32[T, 1] = core.mul(%w1, %q)
      %y: f32[T, 16] = moe.experts(%x, %wr, %i1, @wg, @wu, @wd)
      output %y
    """)


def _data(g, peak: float = 1.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    for name, v in g.params.items():
        g.param_data[name] = (rng.standard_normal(v.type.shape) * (peak if name == "r" else 0.3)
                              ).astype(np.float32)
    return rng.standard_normal((13, 16)).astype(np.float32)


def _expected(text: str, x: np.ndarray, params: dict, k: int, renormalize: bool) -> np.ndarray:
    """The layer with the router's own top-k weights cut to the first k in numpy."""
    g = parse(text.replace("output %y", "output %w, %i"))
    g.param_data.update(params)
    w, ids = interpret(g, [x])
    kept = w[:, :k]
    if renormalize:
        kept = kept * (w.sum(1, keepdims=True) / kept.sum(1, keepdims=True))
    ex = parse(HEAD.replace("input %x: f32[T, 16]", f"input %x: f32[T, 16]\ninput %w: f32[T, {k}]"
                                                     f"\ninput %i: i32[T, {k}]") + """
      %y: f32[T, 16] = moe.experts(%x, %w, %i, @wg, @wu, @wd)
      output %y
    """)
    ex.param_data.update(params)
    return interpret(ex, [x, kept.astype(np.float32), ids[:, :k]])[0]


ROUTERS = ["scoring=softmax", "scoring=softmax, norm_topk=true", "scoring=sigmoid",
           "scoring=sigmoid, norm_topk=true, scale=2.5", "scoring=softmax, order=topk_score",
           "scoring=sigmoid, order=topk_score"]


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("attrs", ROUTERS)
def test_numbers_equal_a_numpy_cap_of_the_router(attrs, renormalize):
    text = layer(attrs)
    g = parse(text)
    x = _data(g)
    params = dict(g.param_data)
    pm = PassManager([CapTopK(k=1, renormalize=renormalize)])
    pm.run(g)
    assert pm.ctx.stats["cap-topk.capped"] == 1
    got = interpret(g, [x])[0]
    want = _expected(text, x, params, 1, renormalize)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert g.find("moe.experts")[0].operands[2].shape[1] == 1  # one expert per token


def test_k_above_the_router_k_changes_nothing_and_bad_k_is_refused():
    g = parse(layer("scoring=softmax"))
    pm = PassManager([CapTopK(k=2)])
    pm.run(g)
    assert pm.ctx.stats["cap-topk.capped"] == 0 and g.find("moe.router")[0].attrs["k"] == 2
    with pytest.raises(PassError, match="cap-topk: k must be >= 1, got 0"):
        PassManager([CapTopK(k=0)]).run(parse(layer("scoring=softmax")))


@pytest.mark.parametrize("text", [
    LAYER.replace("output %y", "output %y, %i"),          # the ids are a graph output
    LAYER.replace("ATTRS", "capacity=3, ATTRS"),          # token capacity drops slots by order
])
def test_routers_it_cannot_cap_are_left_alone_and_counted(text):
    g = parse(text.replace("ATTRS", "scoring=softmax"))
    before = g.find("moe.router")[0].attrs["k"]
    pm = PassManager([CapTopK(k=1)])
    pm.run(g)
    assert pm.ctx.stats == {"cap-topk.capped": 0, "cap-topk.skipped": 1}
    assert g.find("moe.router")[0].attrs["k"] == before and not g.find("core.slice")


def test_peaked_router_loses_less_than_a_uniform_one():
    """The trade the pass makes: a peaked router's capped output is closer to the uncapped one."""
    from moec.passes.manager import relative_error

    errs = {}
    for name, peak in (("uniform", 0.01), ("peaked", 20.0)):
        g = parse(layer("scoring=softmax"))
        x = _data(g, peak=peak, seed=1)
        full = interpret(g, [x])[0]
        PassManager([CapTopK(k=1)]).run(g)
        errs[name] = relative_error(interpret(g, [x])[0], full)
    assert errs["peaked"] < 0.1 * errs["uniform"], errs


def test_compiled_layer_equals_the_model_built_with_top_k_1():
    """demo_model(top_k=2) with `cap-topk{k=1,renormalize=false}@after:fuse-gating` is the same
    layer as demo_model(top_k=1) (same seed, same weights): softmax, top-1, no renormalisation.
    The statistic reaches the manifest."""
    from moec.models.reference import demo_model

    model, (x,) = demo_model(seed=7, hidden=64, intermediate=96, experts=4, top_k=2)
    top1, _ = demo_model(seed=7, hidden=64, intermediate=96, experts=4, top_k=1)
    art = moec.compile(model, (x,), max_tokens=64,
                       passes="default,cap-topk{k=1,renormalize=false}@after:fuse-gating")
    assert list(art.pipeline[:4]) == ["canonicalize", "fuse-gating", "cap-topk{renormalize=false}",
                                "reorder-dispatch"]
    assert art.meta["pass_stats"] == {"cap-topk.capped": 1}
    xs = torch.randn(9, 64)
    with torch.no_grad():
        want, uncapped = top1(xs).numpy(), model(xs).numpy()
    got = art.load_model()(xs.numpy())
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    assert np.abs(got - uncapped).max() > 1e-3 * np.abs(uncapped).max()  # it did cap


def test_pass_list_forms():
    passes = parse_pipeline("default,cap-topk{k=1}@after:fuse-gating")
    assert [p.name for p in passes[:4]] == ["canonicalize", "fuse-gating", "cap-topk",
                                            "reorder-dispatch"]
    assert passes[2] == CapTopK(k=1, renormalize=True)
