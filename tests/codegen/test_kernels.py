"""Dense CPU kernels against numpy references: elementwise, reductions, top-k, linear.

Tolerance: float32 results must match a float64 numpy reference within rtol=1e-4, atol=1e-4
(inputs are O(1); GEMM weights are scaled by 1/sqrt(K) so outputs are O(1) too). Integer outputs
(top-k indices) must match exactly. Every kernel with a symbolic T runs at T in TOKENS, each on
fresh random inputs; all kernels of this file are compiled once, in one module.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

from moec.codegen.kernels import (
    elementwise_binary,
    elementwise_unary,
    layernorm,
    linear,
    reduce,
    rmsnorm,
    softmax,
    topk,
)
from moec.errors import CodegenError

TOKENS = [0, 1, 7, 64, 300]
RTOL = ATOL = 1e-4
rng = np.random.default_rng(20240601)


def _erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[np.float64])(x)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


UNARY_REF = {
    "silu": lambda x: x * _sigmoid(x),
    "gelu": lambda x: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0))),
    "relu": lambda x: np.maximum(x, 0.0),
    "sigmoid": _sigmoid,
    "tanh": np.tanh,
    "exp": np.exp,
    "neg": np.negative,
    "sqrt": np.sqrt,
    "rsqrt": lambda x: 1.0 / np.sqrt(x),
    "softplus": lambda x: np.logaddexp(0.0, x),
}
POSITIVE_ONLY = {"sqrt", "rsqrt"}
UNARY_SHAPES = [("T", 64), ("T", 3, 37)]  # vector-exact rows; merged dims with a scalar tail

# (name, attrs, reference)
UNARY_ATTR_CASES = [
    ("gelu", {"approximate": "tanh"},
     lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))),
    ("gelu", {"approximate": "none"}, UNARY_REF["gelu"]),
    ("clamp", {"min": -0.5, "max": 0.75}, lambda x: np.clip(x, -0.5, 0.75)),
    ("clamp", {"min": None, "max": 0.25}, lambda x: np.minimum(x, 0.25)),
    ("scale", {"value": -2.5}, lambda x: x * -2.5),
]

# (shape_a, shape_b): numpy broadcasting, with symbolic T
BINARY_SHAPES = [
    (("T", 64), ("T", 64)),
    (("T", 37), (37,)),
    (("T", 8, 37), (8, 1)),
    (("T", 1), ("T", 40)),
    ((1,), ("T", 5)),
    (("T", 3, 16), (1, 3, 1)),
]
BINARY_REF = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide,
              "maximum": np.maximum, "minimum": np.minimum}


def _unary_kernels():
    ks = {(op, shape): elementwise_unary(op, shape, "float32") for op in UNARY_REF
          for shape in UNARY_SHAPES}
    for i, (op, attrs, _) in enumerate(UNARY_ATTR_CASES):
        ks[("attr", i)] = elementwise_unary(op, ("T", 37), "float32", **attrs)
    for dt in ("float16", "bfloat16"):
        ks[("silu", dt)] = elementwise_unary("silu", ("T", 37), dt)
        ks[("cast_from", dt)] = elementwise_unary("cast", ("T", 37), "float32", to=dt)
    ks[("cast", "int32")] = elementwise_unary("cast", ("T", 37), "float32", to="int32")
    return ks


def _binary_kernels():
    return {(op, sa, sb): elementwise_binary(op, sa, sb, "float32") for op in BINARY_REF
            for sa, sb in BINARY_SHAPES}


NORM_H = [64, 37]
REDUCE_CASES = [  # (op, shape, axis, keepdim)
    ("sum", ("T", 64), -1, False),
    ("mean", ("T", 37), 1, True),
    ("sum", ("T", 6, 37), 1, False),
    ("mean", ("T", 6, 37), (0, 1), False),
    ("sum", ("T", 4, 5), 0, True),
]
SOFTMAX_CASES = [(("T", 64), -1), (("T", 37), -1), (("T", 6, 11), 1), (("T", 5), 0)]
TOPK_CASES = [(8, 2), (37, 1), (37, 8), (64, 4)]  # (n, k)
LINEAR_CASES = [  # (K, N, bias): vector-exact, N tail + bias, K split into chunks + N tail
    (64, 48, False),
    (100, 40, True),
    (1500, 33, True),
]
# At most 2 rows take linear's decode path. N=150: a partial last panel, and 10 (AVX2) or 5
# (AVX-512) panels, so the last block of 4 panels is partial.
LINEAR_DECODE_CASES = [(200, 150, True), (200, 150, False)]
LINEAR_DECODE_LEADS = [(0, 4), (1, 1), (2, 1), (1, 2), (3, 1), (1, 3)]  # x [B, T, K]
LINEAR_STATIC_M = [1, 2, 3]
LINEAR_HALF_CASES = [(1500, 33, True), (200, 150, False)]  # K in chunks + N tail; decode blocks
HALF_WEIGHTS = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


@pytest.fixture(scope="module")
def lib(kernel_lib):
    ks = {**_unary_kernels(), **_binary_kernels()}
    for h in NORM_H:
        ks[("rmsnorm", h)] = rmsnorm(("T", h), 1e-6)
        ks[("layernorm", h)] = layernorm(("T", h), 1e-5)
    for c in REDUCE_CASES:
        ks[("reduce", c)] = reduce(c[0], c[1], c[2], c[3])
    for shape, axis in SOFTMAX_CASES:
        ks[("softmax", shape, axis)] = softmax(shape, axis)
    for n, k in TOPK_CASES:
        ks[("topk", n, k)] = topk(("T", n), k)
    for case in LINEAR_CASES:
        ks[("linear", case)] = linear("T", *case[:2], "float32", case[2])
    ks[("linear3d",)] = linear(("B", "T"), 64, 48)
    for case in LINEAR_HALF_CASES:
        for wdt in HALF_WEIGHTS:
            ks[("linear", case, wdt)] = linear("T", *case[:2], "float32", case[2], w_dtype=wdt)
    for case in LINEAR_HALF_CASES:
        ks[("linear", case, "int8")] = linear("T", *case[:2], "float32", case[2], w_dtype="int8")
    for case in LINEAR_DECODE_CASES:
        ks[("linear", case)] = linear("T", *case[:2], "float32", case[2])
        ks[("linear3d", case)] = linear(("B", "T"), *case[:2], "float32", case[2])
        for m in LINEAR_STATIC_M:
            ks[("linear", m, case)] = linear(m, *case[:2], "float32", case[2])
    lib = kernel_lib(ks.values())
    lib.k = ks
    return lib


def _shape(spec, t):
    return tuple(t if d == "T" else d for d in spec)


def _close(got, ref, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(got.astype(np.float64), ref, rtol=rtol, atol=atol)


@pytest.mark.parametrize("t", TOKENS)
@pytest.mark.parametrize("shape", UNARY_SHAPES)
@pytest.mark.parametrize("op", list(UNARY_REF))
def test_unary(lib, op, shape, t):
    x = rng.standard_normal(_shape(shape, t)).astype(np.float32) * 3
    if op in POSITIVE_ONLY:
        x = np.abs(x) + 0.1
    (y,) = lib(lib.k[(op, shape)], x, outs=[(x.shape, "float32")])
    _close(y, UNARY_REF[op](x.astype(np.float64)))


def test_softplus_is_accurate_in_its_tails(lib):
    """log(1 + e^x) is e^x where x << 0 (a naive log(1 + e^x) rounds it to 0) and x where
    x >> 0 (e^x overflows at 89): relative error <= 1e-6 over [-80, 80]."""
    x = np.linspace(-80, 80, 64 * 7, dtype=np.float32).reshape(7, 64)
    (y,) = lib(lib.k[("softplus", ("T", 64))], x, outs=[(x.shape, "float32")])
    want = np.logaddexp(0.0, x.astype(np.float64))
    assert float(np.max(np.abs(y - want) / want)) <= 1e-6


@pytest.mark.parametrize("t", TOKENS)
@pytest.mark.parametrize("case", range(len(UNARY_ATTR_CASES)))
def test_unary_attrs(lib, case, t):
    x = rng.standard_normal((t, 37)).astype(np.float32) * 3
    (y,) = lib(lib.k[("attr", case)], x, outs=[(x.shape, "float32")])
    _close(y, UNARY_ATTR_CASES[case][2](x.astype(np.float64)))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_unary_low_precision(lib, dtype):
    np_dt = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    x32 = rng.standard_normal((64, 37)).astype(np.float32) * 3
    x = x32.astype(np_dt)
    (y,) = lib(lib.k[("silu", dtype)], x, outs=[(x.shape, dtype)])
    xd = x.astype(np.float64)
    # math in f32, one rounding to the storage type: error <= 1 ulp of that type
    tol = 1e-3 if dtype == "float16" else 8e-3
    _close(y.astype(np.float64), xd * _sigmoid(xd), rtol=tol, atol=tol)
    (c,) = lib(lib.k[("cast_from", dtype)], x32, outs=[(x.shape, dtype)])
    np.testing.assert_array_equal(c.astype(np.float32), x32.astype(np_dt).astype(np.float32))


def test_cast_to_int(lib):
    x = rng.standard_normal((7, 37)).astype(np.float32) * 50
    (y,) = lib(lib.k[("cast", "int32")], x, outs=[(x.shape, "int32")])
    np.testing.assert_array_equal(y, x.astype(np.int32))  # truncation toward zero


@pytest.mark.parametrize("t", TOKENS)
@pytest.mark.parametrize("shapes", BINARY_SHAPES)
@pytest.mark.parametrize("op", list(BINARY_REF))
def test_binary(lib, op, shapes, t):
    sa, sb = shapes
    a = rng.standard_normal(_shape(sa, t)).astype(np.float32)
    b = rng.standard_normal(_shape(sb, t)).astype(np.float32)
    if op == "div":
        b = np.where(np.abs(b) < 0.1, 0.5, b).astype(np.float32)
    ref = BINARY_REF[op](a.astype(np.float64), b.astype(np.float64))
    (y,) = lib(lib.k[(op, sa, sb)], a, b, outs=[(ref.shape, "float32")])
    _close(y, ref)


def test_binary_rejects_unknowable_broadcast():
    with pytest.raises(CodegenError):
        elementwise_binary("add", ("T", 4), ("S", 4))
    with pytest.raises(CodegenError):
        elementwise_binary("add", (3, 4), (2, 4))


def _softmax_ref(x, axis):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


@pytest.mark.parametrize("t", TOKENS)
@pytest.mark.parametrize("case", SOFTMAX_CASES)
def test_softmax(lib, case, t):
    shape, axis = case
    if axis == 0 and t == 0:
        pytest.skip("softmax over an empty axis is 0/0")
    x = rng.standard_normal(_shape(shape, t)).astype(np.float32) * 4
    (y,) = lib(lib.k[("softmax", shape, axis)], x, outs=[(x.shape, "float32")])
    _close(y, _softmax_ref(x.astype(np.float64), axis))


@pytest.mark.parametrize("t", TOKENS)
@pytest.mark.parametrize("case", REDUCE_CASES)
def test_reduce(lib, case, t):
    op, shape, axis, keepdim = case
    if t == 0 and op == "mean" and 0 in np.atleast_1d(axis):
        pytest.skip("mean over an empty axis is nan")
    x = rng.standard_normal(_shape(shape, t)).astype(np.float32)
    ref = getattr(np, op)(x.astype(np.float64), axis=axis, keepdims=keepdim)
    (y,) = lib(lib.k[("reduce", case)], x, outs=[(ref.shape, "float32")])
    _close(y, ref)


@pytest.mark.parametrize("t", TOKENS)
@pytest.mark.parametrize("h", NORM_H)
def test_rmsnorm(lib, h, t):
    x = rng.standard_normal((t, h)).astype(np.float32) * 2
    w = rng.standard_normal(h).astype(np.float32)
    (y,) = lib(lib.k[("rmsnorm", h)], x, w, outs=[(x.shape, "float32")])
    xd = x.astype(np.float64)
    _close(y, xd / np.sqrt((xd * xd).mean(-1, keepdims=True) + 1e-6) * w)


@pytest.mark.parametrize("t", TOKENS)
@pytest.mark.parametrize("h", NORM_H)
def test_layernorm(lib, h, t):
    x = (rng.standard_normal((t, h)) * 2 + 3).astype(np.float32)  # offset mean: tests 2 passes
    w, b = rng.standard_normal((2, h)).astype(np.float32)
    (y,) = lib(lib.k[("layernorm", h)], x, w, b, outs=[(x.shape, "float32")])
    xd = x.astype(np.float64)
    mu = xd.mean(-1, keepdims=True)
    var = ((xd - mu) ** 2).mean(-1, keepdims=True)
    _close(y, (xd - mu) / np.sqrt(var + 1e-5) * w + b)


def _topk_ref(x, k):
    idx = np.argsort(-x, axis=-1, kind="stable")[..., :k]
    return np.take_along_axis(x, idx, -1), idx.astype(np.int32)


@pytest.mark.parametrize("t", TOKENS)
@pytest.mark.parametrize("case", TOPK_CASES)
def test_topk(lib, case, t):
    n, k = case
    x = rng.standard_normal((t, n)).astype(np.float32)
    x[: t // 2] = np.round(x[: t // 2])  # many ties in half of the rows
    if t:
        x[0, : min(n, 3)] = -np.inf  # -inf may be selected, with its index
    v, i = lib(lib.k[("topk", n, k)], x, outs=[((t, k), "float32"), ((t, k), "int32")])
    rv, ri = _topk_ref(x, k)
    np.testing.assert_array_equal(i, ri)
    np.testing.assert_array_equal(v, rv)


def test_topk_nan_ranks_first(lib):
    x = np.array([[1.0, np.nan, 3.0, 2.0, 0.0, 5.0, 4.0, -1.0]], np.float32)
    v, i = lib(lib.k[("topk", 8, 2)], x, outs=[((1, 2), "float32"), ((1, 2), "int32")])
    assert i.tolist() == [[1, 5]] and np.isnan(v[0, 0]) and v[0, 1] == 5.0


@pytest.mark.parametrize("t", TOKENS)
@pytest.mark.parametrize("case", LINEAR_CASES)
def test_linear(lib, case, t):
    kdim, n, bias = case
    x = rng.standard_normal((t, kdim)).astype(np.float32)
    w = (rng.standard_normal((n, kdim)) / math.sqrt(kdim)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    args = [x, w, b] if bias else [x, w]
    (y,) = lib(lib.k[("linear", case)], *args, outs=[((t, n), "float32")])
    _close(y, x.astype(np.float64) @ w.T.astype(np.float64) + (b if bias else 0))


def test_linear_leading_dims(lib):
    x = rng.standard_normal((3, 5, 64)).astype(np.float32)
    w = (rng.standard_normal((48, 64)) / 8).astype(np.float32)
    (y,) = lib(lib.k[("linear3d",)], x, w, outs=[((3, 5, 48), "float32")])
    _close(y, x.astype(np.float64) @ w.T)


def _linear_check(lib, kern, case, lead):
    kdim, n, bias = case
    x = rng.standard_normal((*lead, kdim)).astype(np.float32)
    w = (rng.standard_normal((n, kdim)) / math.sqrt(kdim)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    args = [x, w, b] if bias else [x, w]
    (y,) = lib(kern, *args, outs=[((*lead, n), "float32")], fill=np.nan)
    _close(y, x.astype(np.float64) @ w.T.astype(np.float64) + (b if bias else 0))


@pytest.mark.parametrize("m", [0, 1, 2, 3])
@pytest.mark.parametrize("case", LINEAR_DECODE_CASES)
def test_linear_decode_path(lib, case, m):
    """m <= 2 rows take the decode path (rows one at a time, 4 panels interleaved), 3 rows the
    GEMM path: the same values, for a symbolic and a static row count (leading dims below)."""
    _linear_check(lib, lib.k[("linear", case)], case, (m,))
    if m in LINEAR_STATIC_M:
        _linear_check(lib, lib.k[("linear", m, case)], case, (m,))


@pytest.mark.parametrize("t", [0, 1, 2, 3, 64])
@pytest.mark.parametrize("wdt", list(HALF_WEIGHTS))
@pytest.mark.parametrize("case", LINEAR_HALF_CASES)
def test_linear_half_weights(lib, case, wdt, t):
    """float16 / bfloat16 weights under float32 x (widen-activations' GEMMs): the kernel widens
    each weight as it reads it, so it computes the float32 product of the weights' exact
    values (the float32 test's tolerance), on the decode path (t <= 2) and the GEMM path."""
    kdim, n, bias = case
    x = rng.standard_normal((t, kdim)).astype(np.float32)
    w = (rng.standard_normal((n, kdim)) / math.sqrt(kdim)).astype(HALF_WEIGHTS[wdt])
    b = rng.standard_normal(n).astype(np.float32)
    args = [x, w, b] if bias else [x, w]
    (y,) = lib(lib.k[("linear", case, wdt)], *args, outs=[((t, n), "float32")], fill=np.nan)
    _close(y, x.astype(np.float64) @ w.T.astype(np.float64) + (b if bias else 0))


@pytest.mark.parametrize("t", [0, 1, 2, 3, 64])
@pytest.mark.parametrize("case", LINEAR_HALF_CASES)
def test_linear_int8_weights(lib, case, t):
    """int8 weights with one scale per output channel (core.linear_q): the float32 product of
    the dequantised weights' values (the float32 test's tolerance), on the decode path (t <= 2)
    and the GEMM path, with a partial last panel."""
    from moec.ir.quant_ops import quantize

    kdim, n, bias = case
    x = rng.standard_normal((t, kdim)).astype(np.float32)
    w = (rng.standard_normal((n, kdim)) / math.sqrt(kdim)).astype(np.float32)
    q, s = quantize(w, 8, kdim + kdim % 2)
    b = rng.standard_normal(n).astype(np.float32)
    args = [x, q, s, b] if bias else [x, q, s]
    (y,) = lib(lib.k[("linear", case, "int8")], *args, outs=[((t, n), "float32")], fill=np.nan)
    wq = q.astype(np.float64) * s.astype(np.float64)
    _close(y, x.astype(np.float64) @ wq.T + (b if bias else 0))


def test_linear_rejects_other_weight_dtypes():
    with pytest.raises(CodegenError, match="half weights take float32 activations"):
        linear("T", 64, 48, "float32", w_dtype="int16")


@pytest.mark.parametrize("lead", LINEAR_DECODE_LEADS)
@pytest.mark.parametrize("case", LINEAR_DECODE_CASES)
def test_linear_decode_path_leading_dims(lib, case, lead):
    _linear_check(lib, lib.k[("linear3d", case)], case, lead)


def _scratch_cases():
    from moec.codegen import kernels as K
    from moec.codegen.kernels.grouped_matmul_quant import grouped_matmul_quant
    from moec.codegen.kernels.nn import attention, embedding
    from moec.codegen.kernels.routing import align, combine, permute

    return {
        "unary": lambda: elementwise_unary("silu", ("T", 64)),
        "binary": lambda: elementwise_binary("add", ("T", 64), (64,)),
        "softmax": lambda: softmax(("T", 64)),
        "reduce_cols": lambda: reduce("sum", ("T", 8, 64), 1),
        "rmsnorm": lambda: rmsnorm(("T", 64), 1e-6),
        "topk": lambda: topk(("T", 16), 4),
        "linear": lambda: linear("T", 64, 48),
        "router_grouped": lambda: K.router(64, 16, 4, scoring="sigmoid", has_bias=True,
                                           n_groups=4, topk_groups=2, norm_topk=True),
        "grouped_gated": lambda: K.grouped_matmul(8, 64, 32, 16, 2, True, "silu_mul"),
        "grouped_down": lambda: K.grouped_matmul(8, 32, 64, 16, 2, False),
        "grouped_int8": lambda: grouped_matmul_quant(8, 64, 32, 16, 2, True, "silu_mul"),
        "align": lambda: align(8, 2, 16),
        "permute": lambda: permute(64, 2),
        "combine": lambda: combine(64, 2),
        "attention": lambda: attention(1, 4, 2, 16, 16, 0.25),
        "embedding": lambda: embedding(96, 64, ("T",)),
    }


@pytest.mark.parametrize("case", list(_scratch_cases()))
def test_small_scratch_lives_on_the_stack(case):
    """Scratch under 1 KiB must be stack memory: heap workspace per parallel task also stops LLVM
    from keeping accumulators and indices in registers (an 8x slowdown of the grouped GEMM
    inside a Relax module, base.py's docstring)."""
    from moec.codegen.kernels.base import heap_scratch

    small = [(name, n) for name, n in heap_scratch(_scratch_cases()[case]()) if n < 1024]
    assert small == [], f"{case}: scratch on the heap: {small}"
