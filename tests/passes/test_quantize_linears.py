"""quantize-linears: Before/Expected IR, routers left alone, the reference of core.linear_q, and
a compiled model (CPU kernels) against the reference interpreter of the same graph."""

import numpy as np
import pytest

from moec.errors import IRError
from moec.ir import interpret, parse
from moec.ir.quant_ops import quantize
from moec.passes import PassManager, parse_pipeline
from moec.passes.quantize_linears import QuantizeLinears
from moec.testing import assert_ir_equal, run_pass

rng = np.random.default_rng(0)


def _with_data(g):
    for name, v in g.params.items():
        g.param_data[name] = rng.standard_normal([int(d) for d in v.shape]).astype(np.float32)
    return g


def test_quantize_linears_ir():
    """Dense linears (with and without bias, one weight read twice) become core.linear_q; the
    linear that feeds a top-k through a softmax (an unfused router) keeps its float weight."""
    head = """
      dim T: 0..64
      input %x: f32[T, 16]
      param @r: f32[4, 16]
    """
    before = _with_data(parse(head + """
      param @w: f32[8, 16]
      param @b: f32[8]
      param @o: f32[16, 8]
      %l: f32[T, 4] = core.linear(%x, @r)
      %p: f32[T, 4] = core.softmax(%l) {axis=-1}
      %v: f32[T, 2], %i: i32[T, 2] = core.topk(%p) {k=2}
      %h: f32[T, 8] = core.linear(%x, @w, @b)
      %h2: f32[T, 8] = core.linear(%x, @w)
      %s: f32[T, 8] = core.add(%h, %h2)
      %y: f32[T, 16] = core.linear(%s, @o)
      output %y, %v
    """))
    assert_ir_equal(run_pass(QuantizeLinears(), before), head + """
      param @b: f32[8]
      param @w.q8: i8[8, 16]
      param @w.scale: f32[8, 1]
      param @o.q8: i8[16, 8]
      param @o.scale: f32[16, 1]
      %l: f32[T, 4] = core.linear(%x, @r)
      %p: f32[T, 4] = core.softmax(%l) {axis=-1}
      %v: f32[T, 2], %i: i32[T, 2] = core.topk(%p) {k=2}
      %h: f32[T, 8] = core.linear_q(%x, @w.q8, @w.scale, @b)
      %h2: f32[T, 8] = core.linear_q(%x, @w.q8, @w.scale)
      %s: f32[T, 8] = core.add(%h, %h2)
      %y: f32[T, 16] = core.linear_q(%s, @o.q8, @o.scale)
      output %y, %v
    """)


def test_linear_q_reference_is_the_dequantised_linear():
    x = rng.standard_normal((5, 3, 40)).astype(np.float32)
    w = rng.standard_normal((24, 40)).astype(np.float32)
    b = rng.standard_normal(24).astype(np.float32)
    q, s = quantize(w, 8, 40)
    g = parse("""
      input %x: f32[5, 3, 40]
      param @q: i8[24, 40]
      param @s: f32[24, 1]
      param @b: f32[24]
      %y: f32[5, 3, 24] = core.linear_q(%x, @q, @s, @b)
      output %y
    """)
    g.param_data.update(q=q, s=s, b=b)
    (y,) = interpret(g, [x])
    ref = x.astype(np.float64) @ (q.astype(np.float64) * s).T + b
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    # int8 per output channel: within half a step of each channel's scale of the float linear
    err = np.abs(q * s - w).max(axis=1)
    assert np.all(err <= 0.5 * s[:, 0] + 1e-7)


def test_linear_q_types_checked():
    with pytest.raises(IRError, match="want i8"):
        parse("""
          dim T: 0..8
          input %x: f32[T, 40]
          param @q: f32[24, 40]
          param @s: f32[24, 1]
          %y: f32[T, 24] = core.linear_q(%x, @q, @s)
          output %y
        """)


def _mlp():
    import torch

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 200), torch.nn.GELU(),
                            torch.nn.Linear(200, 150, bias=False)).eval()
    return m, (torch.randn(8, 64),)


@pytest.fixture(scope="module")
def quantized_mlp(tmp_path_factory):
    import moec

    model, ex = _mlp()
    out = tmp_path_factory.mktemp("q") / "q.moec"
    moec.compile(model, ex, max_tokens=64, quantize_dense=True).save(out)
    return moec.load(out)


@pytest.mark.parametrize("t", [0, 1, 2, 37])
def test_compiled_quantized_linears_match_the_interpreter(quantized_mlp, t):
    """Dense linears (with and without bias, a partial last panel of 150 columns) as int8:
    the CPU kernels against the reference interpreter of the same quantised graph (float32
    tolerance), at 0, 1, 2 (the decode path) and 37 tokens."""
    from moec.compiler import to_graph

    model, ex = _mlp()
    g = to_graph(model, ex, 64)
    PassManager(parse_pipeline("default") + [QuantizeLinears()]).run(g)
    assert len(g.find("core.linear_q")) == 2 and not g.find("core.linear")
    xt = np.random.default_rng(t).standard_normal((t, 64)).astype(np.float32)
    (ref,) = interpret(g, [xt])
    y = np.asarray(quantized_mlp(xt))
    np.testing.assert_allclose(y, ref, rtol=2e-4, atol=2e-5)
    # and int8 is close to the float model: per-channel rounding, ~1e-2 relative
    import torch

    with torch.no_grad():
        fp = model(torch.from_numpy(xt)).numpy()
    if t:
        assert np.linalg.norm(y - fp) / np.linalg.norm(fp) < 2e-2


def test_quantize_dense_refused_for_cuda():
    import moec
    from moec.errors import InputError
    from moec.models.reference import demo_model

    model, (x,) = demo_model(hidden=64, intermediate=96, tokens=8)
    with pytest.raises(InputError, match="CPU kernels only"):
        moec.compile(model, (x,), target="cuda", quantize="int8", quantize_dense=True)


def test_a_projection_before_a_fused_router_is_quantised():
    """The attention output projection reaches the next MoE's router through the residual and
    a norm: it is not a router's linear (the fused moe.router holds its own weight)."""
    head = """
      dim T: 0..8
      input %x: f32[T, 16]
      param @r: f32[4, 16]
      param @nw: f32[16]
    """
    body = """
      %b: f32[T, 16] = core.add(%a, %x)
      %n: f32[T, 16] = core.rmsnorm(%b, @nw) {eps=1e-06}
      %w: f32[T, 2], %i: i32[T, 2] = moe.router(%n, @r) {k=2}
      output %w, %i
    """
    before = _with_data(parse(head + "param @o: f32[16, 16]\n"
                              "%a: f32[T, 16] = core.linear(%x, @o)\n" + body))
    assert_ir_equal(run_pass(QuantizeLinears(), before), head + """
      param @o.q8: i8[16, 16]
      param @o.scale: f32[16, 1]
      %a: f32[T, 16] = core.linear_q(%x, @o.q8, @o.scale)
    """ + body)
