"""widen-activations: Before/Expected IR, and the numbers it keeps (reference interpreter)."""

import ml_dtypes
import numpy as np
import pytest

from moec.ir import interpret, parse
from moec.ir.builder import IRBuilder
from moec.passes import PassManager, parse_pipeline
from moec.passes.widen_activations import WidenActivations, has_half_compute
from moec.testing import assert_ir_equal, run_pass

BF16 = ml_dtypes.bfloat16


def test_widen_activations_bf16_decoder_ffn():
    before = parse("""
      dim T: 0..4096
      input %x: bf16[T, 16]
      param @norm: bf16[16]
      param @w: bf16[8, 16]
      param @b: bf16[8]
      %h: bf16[T, 16] = core.rmsnorm(%x, @norm) {eps=1e-06}
      %y: bf16[T, 8] = core.linear(%h, @w, @b)
      %y32: f32[T, 8] = core.cast(%y) {dtype=f32}
      %s: f32[T, 8] = core.softmax(%y32) {axis=-1}
      %o: bf16[T, 8] = core.cast(%s) {dtype=bf16}
      output %o
    """)
    # the linear weight stays bf16; the norm scale and the bias become f32 copies; the casts
    # inside the graph disappear, the input is widened once and the output narrowed once
    assert_ir_equal(run_pass(WidenActivations(), before), """
      dim T: 0..4096
      input %x: bf16[T, 16]
      param @w: bf16[8, 16]
      param @norm.f32: f32[16]
      param @b.f32: f32[8]
      %x.f32: f32[T, 16] = core.cast(%x) {dtype=f32}
      %h: f32[T, 16] = core.rmsnorm(%x.f32, @norm.f32) {eps=1e-06}
      %y: f32[T, 8] = core.linear(%h, @w, @b.f32)
      %s: f32[T, 8] = core.softmax(%y) {axis=-1}
      %o: bf16[T, 8] = core.cast(%s) {dtype=bf16}
      output %o
    """)


def test_widen_activations_keeps_expert_weights_and_widens_lookups():
    before = parse("""
      dim T: 0..4096
      dim S: 0..100000
      dim TL: 0..10000
      input %ids: i64[T]
      input %sid: i32[S]
      input %te: i32[TL]
      param @emb: f16[32, 16]
      param @wg: f16[4, 8, 16]
      param @wu: f16[4, 8, 16]
      %x: f16[T, 16] = core.embedding(@emb, %ids)
      %g: f16[S, 8] = moe.grouped_matmul(%x, @wg, @wu, %sid, %te) {block_m=16, top_k=2, gather=true, activation=silu_mul}
      output %g
    """)
    assert_ir_equal(run_pass(WidenActivations(), before), """
      dim T: 0..4096
      dim S: 0..100000
      dim TL: 0..10000
      input %ids: i64[T]
      input %sid: i32[S]
      input %te: i32[TL]
      param @emb: f16[32, 16]
      param @wg: f16[4, 8, 16]
      param @wu: f16[4, 8, 16]
      %x: f16[T, 16] = core.embedding(@emb, %ids)
      %x.f32: f32[T, 16] = core.cast(%x) {dtype=f32}
      %g: f32[S, 8] = moe.grouped_matmul(%x.f32, @wg, @wu, %sid, %te) {block_m=16, top_k=2, gather=true, activation=silu_mul}
      %g.f16: f16[S, 8] = core.cast(%g) {dtype=f16}
      output %g.f16
    """)


def test_widen_activations_leaves_a_float32_graph_alone():
    text = """
      dim T: 0..4096
      input %x: f32[T, 16]
      param @w: f32[8, 16]
      %y: f32[T, 8] = core.linear(%x, @w)
      output %y
    """
    g = parse(text)
    assert not has_half_compute(g)
    assert not WidenActivations().run(g, None)
    assert_ir_equal(g, text)


def _ffn_graph(dtype, stored=None):
    """A norm + two-linear FFN with weights rounded to `dtype`, stored as `stored` (default
    `dtype`; float32 makes the float32 reference of the same weights)."""
    rng = np.random.default_rng(0)
    stored = stored or dtype

    def param(name, values):
        return b.param(name, values.astype(dtype).astype(stored))

    b = IRBuilder()
    t = b.dim("T", 0, 64)
    x = b.input("x", (t, 16), {BF16: "bf16", np.float16: "f16", np.float32: "f32"}[stored])
    nw = param("norm", 1 + 0.1 * rng.standard_normal(16))
    w1 = param("w1", rng.standard_normal((24, 16)) / 4)
    w2 = param("w2", rng.standard_normal((16, 24)) / 5)
    h = b.op("core.rmsnorm", [x, nw], {"eps": 1e-6})
    a = b.op("core.silu", [b.op("core.linear", [h, w1])])
    y = b.op("core.add", [x, b.op("core.linear", [a, w2])])
    b.output(y)
    return b.graph


@pytest.mark.parametrize("dtype", [BF16, np.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("tokens", [0, 1, 7])
def test_widen_activations_computes_the_float32_result(dtype, tokens):
    """The widened graph computes in float32 on the half weights: its output is that float32
    result rounded once to the half dtype (round to nearest, so within half a unit in the last
    place, 2^-8 relative for bf16 and 2^-11 for f16), where the half graph rounds after every
    op."""
    g = _ffn_graph(dtype)
    x = np.random.default_rng(tokens).standard_normal((tokens, 16)).astype(dtype)
    PassManager(parse_pipeline("widen-activations")).run(g)
    assert not has_half_compute(g)
    got = interpret(g, [x])[0]
    assert got.dtype == np.dtype(dtype) and got.shape == (tokens, 16)
    # the float32 reference: the same ops on float32 copies of x and the weights
    want = interpret(_ffn_graph(dtype, np.float32), [x.astype(np.float32)])[0]
    eps = 2.0 ** -8 if dtype == BF16 else 2.0 ** -11
    scale = max(float(np.abs(want).max(initial=0.0)), 1e-30)
    assert np.all(np.abs(got.astype(np.float32) - want) <= eps * np.abs(want) + 1e-6 * scale)


def test_widen_activations_is_idempotent():
    g = _ffn_graph(BF16)
    run_pass(WidenActivations(), g)
    once = str(g)
    assert not WidenActivations().run(g, None)
    assert str(g) == once
