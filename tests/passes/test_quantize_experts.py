"""quantize-experts: Before/Expected IR, the quantisers, and the error int8/int4 cost."""

import numpy as np
import pytest

from moec.errors import PassError
from moec.ir import interpret, parse
from moec.ir.quant_ops import dequantize, quantize
from moec.passes import PassManager, parse_pipeline
from moec.passes.quantize_experts import QuantizeExperts
from moec.testing import assert_ir_equal, run_pass

HEAD = """
dim T: 0..64
input %x: f32[T, 16]
param @r: f32[4, 16]
"""
GEMMS = """
%w: f32[T, 2], %i: i32[T, 2] = moe.router(%x, @r) {k=2}
%s: i32[(T//4+4)*8], %te: i32[T//4+4], %sr: i32[T, 2] = moe.align(%i) {block_m=8, num_experts=4}
"""


def _with_data(g):
    rng = np.random.default_rng(0)
    for name, v in g.params.items():
        g.param_data[name] = rng.standard_normal([int(d) for d in v.shape]).astype(np.float32)
    return g


def test_quantize_experts_int8_ir():
    before = _with_data(parse(HEAD + """
      param @wg: f32[4, 8, 16]
      param @wu: f32[4, 8, 16]
      param @wd: f32[4, 16, 8]
    """ + GEMMS + """
      %h: f32[(T//4+4)*8, 8] = moe.grouped_matmul(%x, @wg, @wu, %s, %te) {block_m=8, top_k=2, gather=true, activation=silu_mul}
      %y: f32[(T//4+4)*8, 16] = moe.grouped_matmul(%h, @wd, %s, %te) {block_m=8, top_k=2}
      %o: f32[T, 16] = moe.combine(%y, %w, %sr)
      output %o
    """))
    assert_ir_equal(run_pass(QuantizeExperts(), before), HEAD + """
      param @wg.q8: i8[4, 8, 16]
      param @wg.scale: f32[4, 8, 1]
      param @wu.q8: i8[4, 8, 16]
      param @wu.scale: f32[4, 8, 1]
      param @wd.q8: i8[4, 16, 8]
      param @wd.scale: f32[4, 16, 1]
    """ + GEMMS + """
      %h: f32[(T//4+4)*8, 8] = moe.grouped_matmul_q(%x, @wg.q8, @wg.scale, @wu.q8, @wu.scale, %s, %te) {block_m=8, top_k=2, gather=true, activation=silu_mul, bits=8, group_size=16}
      %y: f32[(T//4+4)*8, 16] = moe.grouped_matmul_q(%h, @wd.q8, @wd.scale, %s, %te) {block_m=8, top_k=2, bits=8, group_size=8}
      %o: f32[T, 16] = moe.combine(%y, %w, %sr)
      output %o
    """)


def test_quantize_experts_int4_ir():
    before = _with_data(parse(HEAD + """
      param @wd: f32[4, 8, 16]
    """ + GEMMS + """
      %y: f32[(T//4+4)*8, 8] = moe.grouped_matmul(%x, @wd, %s, %te) {block_m=8, top_k=2, gather=true}
      output %y
    """))
    assert_ir_equal(run_pass(QuantizeExperts(bits=4, group_size=8), before), HEAD + """
      param @wd.q4: u8[4, 8, 8]
      param @wd.scale: f32[4, 8, 2]
      param @wd.zero: f32[4, 8, 2]
    """ + GEMMS + """
      %y: f32[(T//4+4)*8, 8] = moe.grouped_matmul_q(%x, @wd.q4, @wd.scale, @wd.zero, %s, %te) {block_m=8, top_k=2, gather=true, bits=4, group_size=8}
      output %y
    """)


@pytest.mark.parametrize("bits,k,tol", [(8, 300, 0.5 / 127), (4, 300, 0.5 / 15 + 1e-6),
                                        (4, 64, 0.5 / 15 + 1e-6)])
def test_quantize_round_trip(bits, k, tol):
    w = np.random.default_rng(bits).standard_normal((3, 5, k)).astype(np.float32)
    parts = quantize(w, bits)
    back = dequantize(list(parts), bits, 128, k)
    if bits == 8:  # per output channel: error <= half a step of that channel's scale
        step = np.abs(w).max(axis=-1, keepdims=True)
        assert np.all(np.abs(back - w) <= tol * step + 1e-7)
    else:
        assert parts[0].dtype == np.uint8 and parts[0].shape == (3, 5, k // 2)
        assert parts[1].shape == (3, 5, -(-k // 128))
        rng = np.ptp(w, axis=-1, keepdims=True)
        assert np.all(np.abs(back - w) <= tol * rng * 1.01)


def test_quantize_experts_bad_bits():
    with pytest.raises(PassError, match="bits"):
        run_pass(QuantizeExperts(bits=3), parse(HEAD + "output %x"))


def _moe_out(g, x):
    seen = {}
    y = interpret(g, [x], observer=lambda n, o: seen.update({"moe": o[0]}) if n.op ==
                  "moe.combine" else None)[0]
    return y, seen["moe"]


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _layer_error(bits: int) -> tuple[float, float]:
    """(relative error of the decoder layer output, of the MoE block output)."""
    from moec.compiler import to_graph
    from moec.models.reference import demo_model

    model, (x,) = demo_model(hidden=128, intermediate=256, tokens=32)
    g = to_graph(model, (x,), 64)
    PassManager(parse_pipeline("default")).run(g)
    ref, ref_moe = _moe_out(g, x.numpy())
    PassManager([QuantizeExperts(bits=bits)]).run(g)
    assert not g.find("moe.grouped_matmul") and g.find("moe.grouped_matmul_q")
    assert "mlp.experts.w_gate" not in g.params
    y, moe = _moe_out(g, x.numpy())
    return _rel(y, ref), _rel(moe, ref_moe)


def test_int8_layer_error_within_1e_2():
    layer, moe = _layer_error(8)
    assert layer < 1e-2 and moe < 1e-2


def test_int8_groups_along_k_cut_the_error():
    """int8 with a scale per 32 values of K (`int8-g32`) errs less than one scale per channel."""
    from moec.passes.quantize_experts import parse_mode

    assert parse_mode("int8") == (8, 0) and parse_mode("int8-g32") == (8, 32)
    assert parse_mode("int4-g64") == (4, 64)
    for bad in ("int8-g3", "int16", "int8-g"):
        with pytest.raises(PassError, match="int8-g32"):
            parse_mode(bad)
    rng = np.random.default_rng(0)
    w = rng.standard_normal((2, 16, 256)).astype(np.float32)
    errs = {}
    for g in (256, 32):
        parts = quantize(w, 8, g)
        assert parts[1].shape == (2, 16, 256 // g)
        errs[g] = float(np.linalg.norm(dequantize(list(parts), 8, g, 256) - w) / np.linalg.norm(w))
    assert errs[32] < 0.85 * errs[256]


def test_int4_layer_error_bounded():
    layer, moe = _layer_error(4)
    assert layer < 0.05 and moe < 0.2


def test_int8_artifact_round_trip(tmp_path):
    """weights.safetensors keeps the int8 weights; the loaded kernels match the interpreter."""
    import safetensors.numpy

    import moec
    from moec.compiler import to_graph
    from moec.models.reference import demo_model

    model, (x,) = demo_model(hidden=64, intermediate=128, tokens=16)
    moec.compile(model, (x,), max_tokens=64, quantize="int8").save(tmp_path / "q.moec")
    stored = safetensors.numpy.load_file(str(tmp_path / "q.moec" / "weights.safetensors"))
    assert {a.dtype for n, a in stored.items() if ".q8" in n} == {np.dtype(np.int8)}
    assert not any(n.startswith("mlp.experts.w_up@") for n in stored)
    g = to_graph(model, (x,), 64)
    PassManager([*parse_pipeline("default"), QuantizeExperts()]).run(g)
    want = interpret(g, [x.numpy()])[0]
    got = np.asarray(moec.load(tmp_path / "q.moec")(x.numpy()))
    np.testing.assert_allclose(got.reshape(want.shape), want, rtol=1e-4, atol=1e-4)
