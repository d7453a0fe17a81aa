"""Before/Expected IR tests, one or more per pass, plus a numeric check of the default pipeline."""

import numpy as np
import pytest

from moec.errors import PassError
from moec.ir import interpret, parse
from moec.passes import NumericCheck, PassManager, get_pass, parse_pipeline
from moec.passes.canonicalize import Canonicalize
from moec.passes.fuse_combine import FuseCombine
from moec.passes.fuse_gating import FuseGating
from moec.passes.reorder_dispatch import ReorderDispatch
from moec.passes.tile_expert_gemm import TileExpertGemm
from moec.testing import assert_ir_equal, run_pass

HEAD = """
dim T: 0..4096
input %x: f32[T, 16]
param @r: f32[4, 16]
"""
EXPERT_PARAMS = """
param @wg: f32[4, 8, 16]
param @wu: f32[4, 8, 16]
param @wd: f32[4, 16, 8]
"""


def test_fuse_gating_softmax_topk_renorm():
    before = parse(HEAD + """
      %l: f32[T, 4] = core.linear(%x, @r)
      %p: f32[T, 4] = core.softmax(%l) {axis=-1}
      %v: f32[T, 2], %i: i32[T, 2] = core.topk(%p) {k=2}
      %s: f32[T, 1] = core.sum(%v) {axis=-1, keepdim=true}
      %w: f32[T, 2] = core.div(%v, %s)
      output %w, %i
    """)
    assert_ir_equal(run_pass(FuseGating(), before), HEAD + """
      %w: f32[T, 2], %i: i32[T, 2] = moe.router(%x, @r) {k=2, scoring=softmax, norm_topk=true}
      output %w, %i
    """)


def test_fuse_gating_sigmoid_without_renorm():
    before = parse(HEAD + """
      %l: f32[T, 4] = core.linear(%x, @r)
      %p: f32[T, 4] = core.sigmoid(%l)
      %v: f32[T, 2], %i: i32[T, 2] = core.topk(%p) {k=2}
      output %v, %i
    """)
    assert_ir_equal(run_pass(FuseGating(), before), HEAD + """
      %w: f32[T, 2], %i: i32[T, 2] = moe.router(%x, @r) {k=2, scoring=sigmoid}
      output %w, %i
    """)


def test_fuse_gating_topk_then_softmax():
    before = parse(HEAD + """
      %l: f32[T, 4] = core.linear(%x, @r)
      %v: f32[T, 2], %i: i32[T, 2] = core.topk(%l) {k=2}
      %w: f32[T, 2] = core.softmax(%v) {axis=-1}
      output %w, %i
    """)
    assert_ir_equal(run_pass(FuseGating(), before), HEAD + """
      %w: f32[T, 2], %i: i32[T, 2] = moe.router(%x, @r) {k=2, order=topk_score}
      output %w, %i
    """)


def test_fuse_gating_keeps_the_router_bias():
    before = parse(HEAD + """
      param @b: f32[4]
      %l: f32[T, 4] = core.linear(%x, @r, @b)
      %p: f32[T, 4] = core.softmax(%l) {axis=-1}
      %v: f32[T, 2], %i: i32[T, 2] = core.topk(%p) {k=2}
      output %v, %i
    """)
    assert_ir_equal(run_pass(FuseGating(), before), HEAD + """
      param @b: f32[4]
      %w: f32[T, 2], %i: i32[T, 2] = moe.router(%x, @r, @b) {k=2, logit_bias=true}
      output %w, %i
    """)


def test_fuse_gating_leaves_a_non_router_topk_alone():
    text = HEAD + """
      %v: f32[T, 2], %i: i32[T, 2] = core.topk(%x) {k=2}
      output %v, %i
    """
    assert_ir_equal(run_pass(FuseGating(), parse(text)), text)


def test_reorder_dispatch():
    before = parse(HEAD + EXPERT_PARAMS + """
      input %w: f32[T, 2]
      input %i: i32[T, 2]
      %y: f32[T, 16] = moe.experts(%x, %w, %i, @wg, @wu, @wd)
      output %y
    """)
    assert_ir_equal(run_pass(ReorderDispatch(block_m=4), before), HEAD + EXPERT_PARAMS + """
      input %w: f32[T, 2]
      input %i: i32[T, 2]
      %s: i32[(T//2+4)*4], %t: i32[T//2+4], %sr: i32[T, 2] = moe.align(%i) {num_experts=4, block_m=4}
      %xs: f32[(T//2+4)*4, 16] = moe.permute(%x, %s) {top_k=2}
      %ys: f32[(T//2+4)*4, 16] = moe.expert_ffn(%xs, %t, @wg, @wu, @wd) {block_m=4}
      %u: f32[T, 2, 16] = moe.unpermute(%ys, %sr)
      %w3: f32[T, 2, 1] = core.reshape(%w) {shape=[-1, 2, 1]}
      %m: f32[T, 2, 16] = core.mul(%u, %w3)
      %y: f32[T, 16] = core.sum(%m) {axis=1}
      output %y
    """)


ALIGNED = HEAD + EXPERT_PARAMS + """
  input %i: i32[T, 2]
  %s: i32[(T//2+4)*4], %t: i32[T//2+4], %sr: i32[T, 2] = moe.align(%i) {num_experts=4, block_m=4}
"""


def test_tile_expert_gemm():
    before = parse(ALIGNED + """
      %xs: f32[(T//2+4)*4, 16] = moe.permute(%x, %s) {top_k=2}
      %ys: f32[(T//2+4)*4, 16] = moe.expert_ffn(%xs, %t, @wg, @wu, @wd) {block_m=4}
      output %ys
    """)
    assert_ir_equal(run_pass(TileExpertGemm(), before), ALIGNED + """
      %h: f32[(T//2+4)*4, 8] = moe.grouped_matmul(%x, @wg, @wu, %s, %t) {block_m=4, top_k=2, gather=true, activation=silu_mul}
      %y: f32[(T//2+4)*4, 16] = moe.grouped_matmul(%h, @wd, %s, %t) {block_m=4, top_k=2}
      output %y
    """)


def test_tile_expert_gemm_needs_the_permute():
    text = ALIGNED + """
      input %xs: f32[(T//2+4)*4, 16]
      %ys: f32[(T//2+4)*4, 16] = moe.expert_ffn(%xs, %t, @wg, @wu, @wd) {block_m=4}
      output %ys
    """
    assert_ir_equal(run_pass(TileExpertGemm(), parse(text)), text)  # nothing to fold: unchanged


def test_fuse_combine():
    body = """
      input %w: f32[T, 2]
      input %ys: f32[(T//2+4)*4, 16]
    """
    before = parse(ALIGNED + body + """
      %u: f32[T, 2, 16] = moe.unpermute(%ys, %sr)
      %w3: f32[T, 2, 1] = core.reshape(%w) {shape=[-1, 2, 1]}
      %m: f32[T, 2, 16] = core.mul(%u, %w3)
      %y: f32[T, 16] = core.sum(%m) {axis=1}
      output %y
    """)
    assert_ir_equal(run_pass(FuseCombine(), before), ALIGNED + body + """
      %y: f32[T, 16] = moe.combine(%ys, %w, %sr)
      output %y
    """)


def test_canonicalize():
    before = parse(HEAD + """
      %a: f32[T, 16] = core.cast(%x) {dtype=f32}
      %b: f32[T, 16] = core.neg(%a)
      %c: f32[T, 16] = core.neg(%b)
      %dead: f32[T, 4] = core.linear(%x, @r)
      output %c
    """)
    assert_ir_equal(run_pass(Canonicalize(), before), """
      dim T: 0..4096
      input %x: f32[T, 16]
      output %x
    """)


def test_pipeline_string_and_options():
    passes = parse_pipeline("default,+reorder-dispatch{block_m=8}")
    assert passes[-1] == get_pass("reorder-dispatch")(block_m=8)
    assert [p.name for p in passes[:3]] == ["canonicalize", "fuse-gating", "reorder-dispatch"]
    with pytest.raises(PassError, match="unknown pass"):
        parse_pipeline("no-such-pass")
    with pytest.raises(PassError, match="bad options"):
        parse_pipeline("reorder-dispatch{bogus=1}")


def test_numeric_check_names_the_pass_that_changed_numbers():
    from dataclasses import dataclass
    from typing import ClassVar

    from moec.passes import Pass

    @dataclass(frozen=True)
    class Broken(Pass):
        name: ClassVar[str] = "broken"

        def run(self, graph, ctx):
            node = graph.find("core.softmax")[0]
            node.attrs = {"axis": 0}  # wrong on purpose (bypassing the rewriter)
            return True

    g = parse(HEAD + """
      %l: f32[T, 4] = core.linear(%x, @r)
      %p: f32[T, 4] = core.softmax(%l) {axis=-1}
      output %p
    """)
    g.param_data["r"] = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
    x = np.random.default_rng(1).standard_normal((5, 16)).astype(np.float32)
    with pytest.raises(PassError, match="pass broken changed output 0"):
        PassManager([Broken()], [NumericCheck([x])]).run(g)


@pytest.mark.parametrize("order", ["score_topk", "topk_score"])
@pytest.mark.parametrize("tokens", [0, 1, 7, 64])
def test_default_pipeline_keeps_numbers(order, tokens):
    rng = np.random.default_rng(tokens)
    router = "core.softmax(%l) {axis=-1}" if order == "score_topk" else None
    text = HEAD + EXPERT_PARAMS + ("""
      %l: f32[T, 4] = core.linear(%x, @r)
      %p: f32[T, 4] = """ + router + """
      %v: f32[T, 2], %i: i32[T, 2] = core.topk(%p) {k=2}
      %s: f32[T, 1] = core.sum(%v) {axis=-1, keepdim=true}
      %w: f32[T, 2] = core.div(%v, %s)
    """ if router else """
      %l: f32[T, 4] = core.linear(%x, @r)
      %v: f32[T, 2], %i: i32[T, 2] = core.topk(%l) {k=2}
      %w: f32[T, 2] = core.softmax(%v) {axis=-1}
    """) + """
      %y: f32[T, 16] = moe.experts(%x, %w, %i, @wg, @wu, @wd)
      output %y
    """
    g = parse(text)
    for name, v in g.params.items():
        g.param_data[name] = rng.standard_normal(v.type.concrete({})).astype(np.float32)
    x = rng.standard_normal((tokens, 16)).astype(np.float32)
    (want,) = interpret(g, [x])
    PassManager(parse_pipeline("default"), [NumericCheck([x], rtol=1e-5)]).run(g)
    assert [n.op for n in g.nodes] == ["moe.router", "moe.align", "moe.grouped_matmul",
                                       "moe.grouped_matmul", "moe.combine"]
    (got,) = interpret(g, [x])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
