"""Before/Expected IR tests for the expert and routing forms of issue 17 §2: squared-ReLU
(non-gated) experts through tile-expert-gemm, sqrt-softplus scoring through fuse-gating, the
clamped SwiGLU without alpha and +1 (offset=0) through reorder-dispatch and tile-expert-gemm;
plus the default pipeline's numbers on each (interpreter, NumericCheck)."""

import numpy as np
import pytest

from moec.errors import ParseError
from moec.ir import interpret, parse, print_graph
from moec.passes import NumericCheck, PassManager, parse_pipeline
from moec.passes.tile_expert_gemm import TileExpertGemm
from moec.testing import assert_ir_equal, run_pass

HEAD = """
dim T: 0..4096
input %x: f32[T, 16]
param @r: f32[4, 16]
param @wu: f32[4, 8, 16]
param @wd: f32[4, 16, 8]
"""
ALIGNED = HEAD + """
  input %i: i32[T, 2]
  %s: i32[(T//2+4)*4], %t: i32[T//2+4], %sr: i32[T, 2] = moe.align(%i) {num_experts=4, block_m=4}
"""


def test_tile_expert_gemm_relu2():
    before = parse(ALIGNED + """
      %xs: f32[(T//2+4)*4, 16] = moe.permute(%x, %s) {top_k=2}
      %ys: f32[(T//2+4)*4, 16] = moe.expert_ffn(%xs, %t, @wu, @wd) {block_m=4, activation=relu2, gated=false}
      output %ys
    """)
    assert_ir_equal(run_pass(TileExpertGemm(), before), ALIGNED + """
      %h: f32[(T//2+4)*4, 8] = moe.grouped_matmul(%x, @wu, %s, %t) {block_m=4, top_k=2, gather=true, activation=relu2}
      %y: f32[(T//2+4)*4, 16] = moe.grouped_matmul(%h, @wd, %s, %t) {block_m=4, top_k=2}
      output %y
    """)


def test_relu2_is_for_non_gated_experts():
    with pytest.raises(ParseError, match="relu2 is for non-gated experts"):
        parse(HEAD + """
          param @wg: f32[4, 8, 16]
          input %w: f32[T, 2]
          input %i: i32[T, 2]
          %y: f32[T, 16] = moe.experts(%x, %w, %i, @wg, @wu, @wd) {activation=relu2}
          output %y
        """)


def _numeric_pipeline(text: str, tokens=(0, 1, 9)):
    """The default pipeline under NumericCheck (each pass keeps the interpreter's numbers),
    and the final graph equal to the first on a few token counts."""
    rng = np.random.default_rng(0)
    g = parse(text)
    for name, v in g.params.items():
        g.param_data[name] = (rng.standard_normal(v.shape) / 4).astype(np.float32)
    inputs = [rng.standard_normal((9, 16)).astype(np.float32)]
    before = interpret(g, inputs)[0]
    PassManager(parse_pipeline("default"), [NumericCheck(inputs, rtol=1e-5)]).run(g)
    np.testing.assert_allclose(interpret(g, inputs)[0], before, rtol=1e-5, atol=1e-6)
    for t in tokens:
        interpret(g, [rng.standard_normal((t, 16)).astype(np.float32)])
    return g


def test_default_pipeline_keeps_relu2_experts_numbers():
    g = _numeric_pipeline(HEAD + """
      %l: f32[T, 4] = core.linear(%x, @r)
      %p: f32[T, 4] = core.softmax(%l) {axis=-1}
      %v: f32[T, 2], %i: i32[T, 2] = core.topk(%p) {k=2}
      %y: f32[T, 16] = moe.experts(%x, %v, %i, @wu, @wd) {activation=relu2, gated=false}
      output %y
    """)
    assert [n.attrs["activation"] for n in g.find("moe.grouped_matmul")] == ["relu2", "none"]


ROUTER_HEAD = """
dim T: 0..4096
input %x: f32[T, 16]
param @r: f32[4, 16]
param @b: f32[4]
"""


def test_fuse_gating_sqrt_softplus_with_bias_renorm_scale():
    from moec.passes.fuse_gating import FuseGating

    before = parse(ROUTER_HEAD + """
      %l: f32[T, 4] = core.linear(%x, @r)
      %sp: f32[T, 4] = core.softplus(%l)
      %p: f32[T, 4] = core.sqrt(%sp)
      %v: f32[T, 2], %i: i32[T, 2] = moe.select(%p, @b) {k=2, select_bias=true}
      %s: f32[T, 1] = core.sum(%v) {axis=-1, keepdim=true}
      %n: f32[T, 2] = core.div(%v, %s)
      %w: f32[T, 2] = core.scale(%n) {value=1.5}
      output %w, %i
    """)
    assert_ir_equal(run_pass(FuseGating(), before), ROUTER_HEAD + """
      %w: f32[T, 2], %i: i32[T, 2] = moe.router(%x, @r, @b) {k=2, scoring=sqrt_softplus, norm_topk=true, scale=1.5, select_bias=true}
      output %w, %i
    """)


def test_fuse_gating_topk_then_sqrt_softplus():
    from moec.passes.fuse_gating import FuseGating

    before = parse(ROUTER_HEAD + """
      %l: f32[T, 4] = core.linear(%x, @r)
      %v: f32[T, 2], %i: i32[T, 2] = core.topk(%l) {k=2}
      %sp: f32[T, 2] = core.softplus(%v)
      %w: f32[T, 2] = core.sqrt(%sp)
      output %w, %i
    """)
    assert_ir_equal(run_pass(FuseGating(), before), ROUTER_HEAD + """
      %w: f32[T, 2], %i: i32[T, 2] = moe.router(%x, @r) {k=2, scoring=sqrt_softplus, order=topk_score}
      output %w, %i
    """)


def test_sqrt_alone_is_no_scoring():
    """sqrt of the logits (no softplus) is not a router scoring: left as it is."""
    from moec.passes.fuse_gating import FuseGating

    text = ROUTER_HEAD + """
      %l: f32[T, 4] = core.linear(%x, @r)
      %p: f32[T, 4] = core.sqrt(%l)
      %v: f32[T, 2], %i: i32[T, 2] = core.topk(%p) {k=2}
      output %v, %i
    """
    assert_ir_equal(run_pass(FuseGating(), parse(text)), text)


def test_default_pipeline_keeps_sqrt_softplus_router_numbers():
    g = _numeric_pipeline(HEAD + """
      param @b: f32[4]
      param @wg: f32[4, 8, 16]
      %l: f32[T, 4] = core.linear(%x, @r)
      %sp: f32[T, 4] = core.softplus(%l)
      %p: f32[T, 4] = core.sqrt(%sp)
      %v: f32[T, 2], %i: i32[T, 2] = moe.select(%p, @b) {k=2, select_bias=true}
      %s: f32[T, 1] = core.sum(%v) {axis=-1, keepdim=true}
      %n: f32[T, 2] = core.div(%v, %s)
      %y: f32[T, 16] = moe.experts(%x, %n, %i, @wg, @wu, @wd)
      output %y
    """)
    (router,) = g.find("moe.router")
    assert router.attrs["scoring"] == "sqrt_softplus" and router.attrs["select_bias"]


CLAMPED = "activation=clamped_swiglu, alpha=1.0, limit=0.5, offset=0.0"
GATED = HEAD + """
param @wg: f32[4, 8, 16]
input %w: f32[T, 2]
input %i: i32[T, 2]
"""


def test_reorder_dispatch_carries_the_plain_clamped_swiglu():
    """silu(min(g, L)) * clamp(u, -L, L): alpha 1 and offset 0 travel to moe.expert_ffn."""
    from moec.passes.reorder_dispatch import ReorderDispatch

    before = parse(GATED + f"""
      %y: f32[T, 16] = moe.experts(%x, %w, %i, @wg, @wu, @wd) {{{CLAMPED}}}
      output %y
    """)
    assert_ir_equal(run_pass(ReorderDispatch(block_m=4), before), GATED + f"""
      %s: i32[(T//2+4)*4], %t: i32[T//2+4], %sr: i32[T, 2] = moe.align(%i) {{num_experts=4, block_m=4}}
      %xs: f32[(T//2+4)*4, 16] = moe.permute(%x, %s) {{top_k=2}}
      %ys: f32[(T//2+4)*4, 16] = moe.expert_ffn(%xs, %t, @wg, @wu, @wd) {{block_m=4, {CLAMPED}}}
      %u: f32[T, 2, 16] = moe.unpermute(%ys, %sr)
      %w3: f32[T, 2, 1] = core.reshape(%w) {{shape=[-1, 2, 1]}}
      %m: f32[T, 2, 16] = core.mul(%u, %w3)
      %y: f32[T, 16] = core.sum(%m) {{axis=1}}
      output %y
    """)  # noqa: E501


def test_tile_expert_gemm_plain_clamped_swiglu():
    before = parse(GATED + f"""
      %s: i32[(T//2+4)*4], %t: i32[T//2+4], %sr: i32[T, 2] = moe.align(%i) {{num_experts=4, block_m=4}}
      %xs: f32[(T//2+4)*4, 16] = moe.permute(%x, %s) {{top_k=2}}
      %ys: f32[(T//2+4)*4, 16] = moe.expert_ffn(%xs, %t, @wg, @wu, @wd) {{block_m=4, {CLAMPED}}}
      output %ys
    """)  # noqa: E501
    assert_ir_equal(run_pass(TileExpertGemm(), before), GATED + """
      %s: i32[(T//2+4)*4], %t: i32[T//2+4], %sr: i32[T, 2] = moe.align(%i) {num_experts=4, block_m=4}
      %h: f32[(T//2+4)*4, 8] = moe.grouped_matmul(%x, @wg, @wu, %s, %t) {block_m=4, top_k=2, gather=true, activation=clamped_swiglu_mul, alpha=1.0, limit=0.5, offset=0.0}
      %y: f32[(T//2+4)*4, 16] = moe.grouped_matmul(%h, @wd, %s, %t) {block_m=4, top_k=2}
      output %y
    """)  # noqa: E501


def test_plain_clamped_swiglu_reference_reaches_the_limit():
    """The reference of the clamped form with alpha 1, offset 0 is silu(min(g, L)) *
    clamp(u, -L, L), on values past the limit on both sides."""
    from moec.ir.moe_ops import clamped_swiglu

    g = np.array([-3.0, -0.2, 0.3, 0.5, 2.0, 9.0], np.float32)
    u = np.array([4.0, -9.0, 0.1, -0.5, 0.7, -0.6], np.float32)
    gc = np.minimum(g, 0.5)
    want = gc / (1 + np.exp(-gc)) * np.clip(u, -0.5, 0.5)
    np.testing.assert_allclose(clamped_swiglu(g, u, 1.0, 0.5, 0.0), want, rtol=1e-6)


def test_default_pipeline_keeps_plain_clamped_swiglu_numbers():
    g = _numeric_pipeline(HEAD + """
      param @wg: f32[4, 8, 16]
      %l: f32[T, 4] = core.linear(%x, @r)
      %p: f32[T, 4] = core.softmax(%l) {axis=-1}
      %v: f32[T, 2], %i: i32[T, 2] = core.topk(%p) {k=2}
      %y: f32[T, 16] = moe.experts(%x, %v, %i, @wg, @wu, @wd) {activation=clamped_swiglu, alpha=1.0, limit=0.05, offset=0.0}
      output %y
    """)  # noqa: E501
    (first, _) = g.find("moe.grouped_matmul")
    assert first.attrs["offset"] == 0.0 and first.attrs["activation"] == "clamped_swiglu_mul"


IDENTITY = """
dim T: 0..4096
input %x: f32[T, 16]
param @r: f32[6, 16]
param @wg: f32[4, 8, 16]
param @wu: f32[4, 8, 16]
param @wd: f32[4, 16, 8]
input %w: f32[T, 2]
input %i: i32[T, 2]
"""


def test_reorder_dispatch_identity_experts():
    """4 FFN experts and 2 identity experts: the layout leaves the identity slots out
    (slot_row -1) and moe.combine, with x as its fourth operand, adds w * x for them."""
    from moec.passes.reorder_dispatch import ReorderDispatch

    before = parse(IDENTITY + """
      %y: f32[T, 16] = moe.experts(%x, %w, %i, @wg, @wu, @wd) {identity_experts=2}
      output %y
    """)
    assert_ir_equal(run_pass(ReorderDispatch(block_m=4), before), IDENTITY + """
      %s: i32[(T//2+4)*4], %t: i32[T//2+4], %sr: i32[T, 2] = moe.align(%i) {num_experts=4, block_m=4, identity_experts=2}
      %xs: f32[(T//2+4)*4, 16] = moe.permute(%x, %s) {top_k=2}
      %ys: f32[(T//2+4)*4, 16] = moe.expert_ffn(%xs, %t, @wg, @wu, @wd) {block_m=4}
      %y: f32[T, 16] = moe.combine(%ys, %w, %sr, %x)
      output %y
    """)  # noqa: E501


def test_identity_experts_take_weight_on_output():
    with pytest.raises(ParseError, match="identity_experts must be >= 0, and take "
                                         "weight_on=output"):
        parse(IDENTITY + """
          %y: f32[T, 16] = moe.experts(%x, %w, %i, @wg, @wu, @wd) {identity_experts=2, weight_on=input}
          output %y
        """)  # noqa: E501


def test_identity_experts_reference():
    """ids 4 and 5 (after the 4 FFN experts) add w * x; the others go through their FFN."""
    from moec.ir.registry import get_op

    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 16)).astype(np.float32)
    ws = [rng.standard_normal(s).astype(np.float32) for s in ((4, 8, 16), (4, 8, 16), (4, 16, 8))]
    ids = np.array([[4, 0], [1, 5], [5, 4], [2, 3], [0, 1]], np.int32)
    w = rng.random((5, 2)).astype(np.float32)
    op = get_op("moe.experts")
    (got,) = op.reference([x, w, ids, *ws], op.check_attrs({"identity_experts": 2}))

    def ffn(e, v):
        g, u = v @ ws[0][e].T, v @ ws[1][e].T
        return (g / (1 + np.exp(-g)) * u) @ ws[2][e].T

    want = np.stack([sum(w[t, j] * (x[t] if ids[t, j] >= 4 else ffn(ids[t, j], x[t]))
                         for j in range(2)) for t in range(5)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_default_pipeline_keeps_identity_experts_numbers():
    text = HEAD.replace("param @r: f32[4, 16]", "param @r: f32[6, 16]") + """
      param @wg: f32[4, 8, 16]
      %l: f32[T, 6] = core.linear(%x, @r)
      %p: f32[T, 6] = core.softmax(%l) {axis=-1}
      %v: f32[T, 2], %i: i32[T, 2] = core.topk(%p) {k=2}
      %y: f32[T, 16] = moe.experts(%x, %v, %i, @wg, @wu, @wd) {identity_experts=2}
      output %y
    """
    g = _numeric_pipeline(text)
    (combine,) = g.find("moe.combine")
    assert len(combine.operands) == 4 and combine.operands[3] is g.inputs[0]


def test_offload_experts_hooks_each_routed_layer_identity_experts_included():
    """offload-experts puts moe.expert_fetch(ids, x) before each moe.align fed by a router,
    layers numbered in graph order; a layer with identity experts is hooked too (num_experts
    counts the FFN experts: the cache leaves ids past them out). The graph computes the same."""
    from moec.passes.offload_experts import OffloadExperts

    before = IDENTITY.replace("input %w: f32[T, 2]\ninput %i: i32[T, 2]\n", "") + """
      param @r2: f32[4, 16]
      %w: f32[T, 2], %i: i32[T, 2] = moe.router(%x, @r) {k=2}
      %s: i32[(T//2+4)*4], %t: i32[T//2+4], %sr: i32[T, 2] = moe.align(%i) {num_experts=4, block_m=4, identity_experts=2}
      %w2: f32[T, 2], %i2: i32[T, 2] = moe.router(%x, @r2) {k=2}
      %s2: i32[(T//2+4)*4], %t2: i32[T//2+4], %sr2: i32[T, 2] = moe.align(%i2) {num_experts=4, block_m=4}
      output %s, %t, %sr, %s2, %t2, %sr2
    """  # noqa: E501
    g = run_pass(OffloadExperts(), parse(before))
    assert_ir_equal(g, IDENTITY.replace("input %w: f32[T, 2]\ninput %i: i32[T, 2]\n", "") + """
      param @r2: f32[4, 16]
      %w: f32[T, 2], %i: i32[T, 2] = moe.router(%x, @r) {k=2}
      %f: i32[T, 2] = moe.expert_fetch(%i, %x) {layer=0, num_experts=4}
      %s: i32[(T//2+4)*4], %t: i32[T//2+4], %sr: i32[T, 2] = moe.align(%f) {num_experts=4, block_m=4, identity_experts=2}
      %w2: f32[T, 2], %i2: i32[T, 2] = moe.router(%x, @r2) {k=2}
      %f2: i32[T, 2] = moe.expert_fetch(%i2, %x) {layer=1, num_experts=4}
      %s2: i32[(T//2+4)*4], %t2: i32[T//2+4], %sr2: i32[T, 2] = moe.align(%f2) {num_experts=4, block_m=4}
      output %s, %t, %sr, %s2, %t2, %sr2
    """)  # noqa: E501
    again = run_pass(OffloadExperts(), parse(print_graph(g)))  # hooked layers stay as they are
    assert len(again.find("moe.expert_fetch")) == 2
    rng = np.random.default_rng(3)
    x = rng.standard_normal((9, 16)).astype(np.float32)
    outs = []
    for graph in (parse(before), g):
        prng = np.random.default_rng(4)  # the same weights in both
        for name in sorted(graph.params):
            shape = tuple(graph.params[name].type.shape)
            graph.param_data[name] = prng.standard_normal(shape).astype(np.float32)
        outs.append(interpret(graph, {"x": x}))
    for a, b in zip(*outs, strict=True):
        np.testing.assert_array_equal(a, b)
