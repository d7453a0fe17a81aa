"""Before/Expected IR tests for the routing and expert variants of the Hugging Face families
(selection bias and grouped top-k, casts, top-k then sigmoid, expert biases, clamped SwiGLU,
routing weight on the expert input), and the default pipeline's numerics on them."""

import numpy as np
import pytest

from moec.ir import interpret, parse
from moec.passes import NumericCheck, PassManager, parse_pipeline
from moec.passes.fuse_gating import FuseGating
from moec.passes.reorder_dispatch import ReorderDispatch
from moec.passes.tile_expert_gemm import TileExpertGemm
from moec.testing import assert_ir_equal, run_pass

HEAD = """
dim T: 0..4096
input %x: f32[T, 16]
param @r: f32[4, 16]
"""
EXPERTS = """
param @wg: f32[4, 8, 16]
param @wu: f32[4, 8, 16]
param @wd: f32[4, 16, 8]
param @bg: f32[4, 8]
param @bu: f32[4, 8]
param @bd: f32[4, 16]
"""
ROUTING = """
input %w: f32[T, 2]
input %i: i32[T, 2]
"""
S = "(T//2+4)*4"  # rows of the aligned layout for T*2 slots, 4 experts, block_m=4
TL = "T//2+4"


def test_fuse_gating_sigmoid_select_bias_groups_renorm_scale():
    """DeepSeek-V3: sigmoid scores, correction bias, group-limited top-k, renormalised, scaled."""
    before = parse(HEAD + """
      param @sb: f32[4]
      %l: f32[T, 4] = core.linear(%x, @r)
      %p: f32[T, 4] = core.sigmoid(%l)
      %v: f32[T, 2], %i: i32[T, 2] = moe.select(%p, @sb) {k=2, n_groups=2, topk_groups=1, group_score=top2_sum, select_bias=true}
      %s: f32[T, 1] = core.sum(%v) {axis=-1, keepdim=true}
      %n: f32[T, 2] = core.div(%v, %s)
      %w: f32[T, 2] = core.scale(%n) {value=2.5}
      output %w, %i
    """)  # noqa: E501
    assert_ir_equal(run_pass(FuseGating(), before), HEAD + """
      param @sb: f32[4]
      %w: f32[T, 2], %i: i32[T, 2] = moe.router(%x, @r, @sb) {k=2, scoring=sigmoid, norm_topk=true, scale=2.5, n_groups=2, topk_groups=1, group_score=top2_sum, select_bias=true}
      output %w, %i
    """)  # noqa: E501


def test_fuse_gating_looks_through_casts_and_fuses_topk_then_sigmoid():
    """A bf16 router cast to f32, top-1 then sigmoid (Llama 4)."""
    head = """
      dim T: 0..4096
      input %x: bf16[T, 16]
      param @r: bf16[4, 16]
    """
    before = parse(head + """
      %l: bf16[T, 4] = core.linear(%x, @r)
      %c: f32[T, 4] = core.cast(%l) {dtype=f32}
      %v: f32[T, 1], %i: i32[T, 1] = core.topk(%c) {k=1}
      %w: f32[T, 1] = core.sigmoid(%v)
      output %w, %i
    """)
    assert_ir_equal(run_pass(FuseGating(), before), head + """
      %w: f32[T, 1], %i: i32[T, 1] = moe.router(%x, @r) {k=1, scoring=sigmoid, order=topk_score}
      output %w, %i
    """)


def test_fuse_gating_leaves_a_scale_shared_with_others_alone():
    text = HEAD + """
      %l: f32[T, 4] = core.linear(%x, @r)
      %p: f32[T, 4] = core.softmax(%l) {axis=-1}
      %v: f32[T, 2], %i: i32[T, 2] = core.topk(%p) {k=2}
      %w: f32[T, 2] = core.scale(%v) {value=2.0}
      output %w, %v, %i
    """
    assert_ir_equal(run_pass(FuseGating(), parse(text)), HEAD + """
      %v: f32[T, 2], %i: i32[T, 2] = moe.router(%x, @r) {k=2}
      %w: f32[T, 2] = core.scale(%v) {value=2.0}
      output %w, %v, %i
    """)


def test_reorder_dispatch_carries_biases_and_clamped_swiglu():
    before = parse(HEAD + EXPERTS + ROUTING + """
      %y: f32[T, 16] = moe.experts(%x, %w, %i, @wg, @wu, @wd, @bg, @bu, @bd) {activation=clamped_swiglu, bias=true, alpha=1.5, limit=3.0}
      output %y
    """)  # noqa: E501
    assert_ir_equal(run_pass(ReorderDispatch(block_m=4), before), HEAD + EXPERTS + ROUTING + f"""
      %s: i32[{S}], %t: i32[{TL}], %sr: i32[T, 2] = moe.align(%i) {{num_experts=4, block_m=4}}
      %xs: f32[{S}, 16] = moe.permute(%x, %s) {{top_k=2}}
      %ys: f32[{S}, 16] = moe.expert_ffn(%xs, %t, @wg, @wu, @wd, @bg, @bu, @bd) {{block_m=4, activation=clamped_swiglu, bias=true, alpha=1.5, limit=3.0}}
      %u: f32[T, 2, 16] = moe.unpermute(%ys, %sr)
      %w3: f32[T, 2, 1] = core.reshape(%w) {{shape=[-1, 2, 1]}}
      %m: f32[T, 2, 16] = core.mul(%u, %w3)
      %y: f32[T, 16] = core.sum(%m) {{axis=1}}
      output %y
    """)  # noqa: E501


def test_reorder_dispatch_weight_on_input_scales_the_permuted_rows():
    before = parse(HEAD + EXPERTS + ROUTING + """
      %y: f32[T, 16] = moe.experts(%x, %w, %i, @wg, @wu, @wd) {weight_on=input}
      output %y
    """)
    assert_ir_equal(run_pass(ReorderDispatch(block_m=4), before), HEAD + EXPERTS + ROUTING + f"""
      %s: i32[{S}], %t: i32[{TL}], %sr: i32[T, 2] = moe.align(%i) {{num_experts=4, block_m=4}}
      %xs: f32[{S}, 16] = moe.permute(%x, %s) {{top_k=2}}
      %w1: f32[T*2, 1] = core.reshape(%w) {{shape=[-1, 1]}}
      %ws: f32[{S}, 1] = moe.permute(%w1, %s) {{top_k=1}}
      %xw: f32[{S}, 16] = core.mul(%xs, %ws)
      %ys: f32[{S}, 16] = moe.expert_ffn(%xw, %t, @wg, @wu, @wd) {{block_m=4}}
      %u: f32[T, 2, 16] = moe.unpermute(%ys, %sr)
      %y: f32[T, 16] = core.sum(%u) {{axis=1}}
      output %y
    """)


def test_tile_expert_gemm_biases_and_clamped_swiglu():
    before = parse(HEAD + EXPERTS + f"""
      input %s: i32[{S}]
      input %t: i32[{TL}]
      %xs: f32[{S}, 16] = moe.permute(%x, %s) {{top_k=2}}
      %ys: f32[{S}, 16] = moe.expert_ffn(%xs, %t, @wg, @wu, @wd, @bg, @bu, @bd) {{block_m=4, activation=clamped_swiglu, bias=true, alpha=1.5, limit=3.0}}
      output %ys
    """)  # noqa: E501
    assert_ir_equal(run_pass(TileExpertGemm(), before), HEAD + EXPERTS + f"""
      input %s: i32[{S}]
      input %t: i32[{TL}]
      %h: f32[{S}, 8] = moe.grouped_matmul(%x, @wg, @wu, @bg, @bu, %s, %t) {{block_m=4, top_k=2, gather=true, activation=clamped_swiglu_mul, bias=true, alpha=1.5, limit=3.0}}
      %y: f32[{S}, 16] = moe.grouped_matmul(%h, @wd, @bd, %s, %t) {{block_m=4, top_k=2, bias=true}}
      output %y
    """)  # noqa: E501


def test_tile_expert_gemm_on_scaled_rows_reads_them_in_place():
    before = parse(HEAD + EXPERTS + f"""
      input %s: i32[{S}]
      input %t: i32[{TL}]
      input %ws: f32[{S}, 1]
      %xs: f32[{S}, 16] = moe.permute(%x, %s) {{top_k=2}}
      %xw: f32[{S}, 16] = core.mul(%xs, %ws)
      %ys: f32[{S}, 16] = moe.expert_ffn(%xw, %t, @wu, @wd) {{block_m=4, gated=false, activation=relu}}
      output %ys
    """)  # noqa: E501
    assert_ir_equal(run_pass(TileExpertGemm(), before), HEAD + EXPERTS + f"""
      input %s: i32[{S}]
      input %t: i32[{TL}]
      input %ws: f32[{S}, 1]
      %xs: f32[{S}, 16] = moe.permute(%x, %s) {{top_k=2}}
      %xw: f32[{S}, 16] = core.mul(%xs, %ws)
      %h: f32[{S}, 8] = moe.grouped_matmul(%xw, @wu, %s, %t) {{block_m=4, top_k=2, activation=relu}}
      %y: f32[{S}, 16] = moe.grouped_matmul(%h, @wd, %s, %t) {{block_m=4, top_k=2}}
      output %y
    """)


_ROUTERS = {
    "deepseek_v3": """
      param @sb: f32[4]
      %l: f32[T, 4] = core.linear(%x, @r)
      %p: f32[T, 4] = core.sigmoid(%l)
      %v: f32[T, 2], %i: i32[T, 2] = moe.select(%p, @sb) {k=2, n_groups=2, topk_groups=1, group_score=top2_sum, select_bias=true}
      %s: f32[T, 1] = core.sum(%v) {axis=-1, keepdim=true}
      %n: f32[T, 2] = core.div(%v, %s)
      %w: f32[T, 2] = core.scale(%n) {value=2.5}
    """,  # noqa: E501
    "sparsemixer": """
      %w: f32[T, 2], %i: i32[T, 2] = moe.router(%x, @r) {k=2, order=sparsemixer, jitter_eps=0.1}
    """,
    "capacity": """
      %w: f32[T, 2], %i: i32[T, 2] = moe.router(%x, @r) {k=2, capacity=3}
    """,
}
_EXPERTS = {
    "clamped_bias": "moe.experts(%x, %w, %i, @wg, @wu, @wd, @bg, @bu, @bd) "
                    "{activation=clamped_swiglu, bias=true, limit=1.0}",
    "input_weighted": "moe.experts(%x, %w, %i, @wg, @wu, @wd) {weight_on=input}",
}


@pytest.mark.parametrize("experts", list(_EXPERTS))
@pytest.mark.parametrize("router", list(_ROUTERS))
@pytest.mark.parametrize("tokens", [0, 1, 7, 64])
def test_default_pipeline_keeps_numbers_on_variants(router, experts, tokens):
    rng = np.random.default_rng(tokens)
    g = parse(HEAD + EXPERTS + _ROUTERS[router] + f"""
      %y: f32[T, 16] = {_EXPERTS[experts]}
      output %y
    """)
    for name, v in g.params.items():
        g.param_data[name] = rng.standard_normal(v.type.concrete({})).astype(np.float32)
    x = rng.standard_normal((tokens, 16)).astype(np.float32)
    (want,) = interpret(g, [x])
    PassManager(parse_pipeline("default"), [NumericCheck([x], rtol=1e-5)]).run(g)
    ops = [n.op for n in g.nodes]
    assert ops[:2] == ["moe.router", "moe.align"] and ops.count("moe.grouped_matmul") == 2
    assert ("moe.combine" in ops) == (experts != "input_weighted")
    (got,) = interpret(g, [x])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max(initial=1.0))
