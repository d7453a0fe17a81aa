"""The te definitions behind the CUDA kernels, run on the CPU against moec's reference ops.

The CUDA kernels are schedules of these definitions (gather, gate/up interleave, epilogues,
padding, index math are all in the definition), so this checks their semantics without a GPU;
the hand-written TIR kernels (topk, router, align) are checked on a GPU only."""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from moec.codegen.cuda.dispatch import define_combine, define_permute, define_unpermute
from moec.codegen.cuda.elementwise import define_binary, define_unary
from moec.codegen.cuda.gemm import define_grouped_matmul, define_linear
from moec.codegen.cuda.reduction import define_norm, define_reduce, define_softmax
from moec.ir.moe_ops import align_ref
from moec.ir.registry import get_op

_CPU = tvm.target.Target({"kind": "llvm"})


def ref(op: str, xs: list[np.ndarray], **attrs) -> list[np.ndarray]:
    d = get_op(op)
    return d.reference(xs, d.check_attrs(attrs))


def cpu_run(func, inputs: list[np.ndarray], outputs: list[tuple[tuple, str]]) -> list[np.ndarray]:
    ex = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), _CPU)
    args = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in inputs]
    args += [tvm.runtime.empty(s, d, tvm.cpu()) for s, d in outputs]
    ex["main"](*args)
    return [a.numpy() for a in args[len(inputs):]]


def close(got: np.ndarray, want: np.ndarray, dtype: str) -> None:
    tol = 1e-2 if dtype != "float32" else 2e-5
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=tol,
                               atol=tol)


def routing(t: int, e: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Random distinct expert choices, skewed so some experts get several tiles."""
    p = rng.dirichlet(np.ones(e) * 0.3)
    ids = np.stack([rng.choice(e, k, replace=False, p=p) for _ in range(t)]) if t else \
        np.zeros((0, k), np.int64)
    return ids.astype(np.int32).reshape(t, k)


@pytest.mark.parametrize("act,bias", [("silu_mul", False), ("gelu_mul", False), ("none", False),
                                      ("relu", True), ("clamped_swiglu_mul", True)])
@pytest.mark.parametrize("gather", [True, False])
@pytest.mark.parametrize("tokens", [0, 1, 37])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_grouped_matmul_definition(act, bias, gather, tokens, dtype):
    rng = np.random.default_rng(tokens)
    e, n, kd, bm, top = 5, 32, 48, 16, 2
    ids = routing(tokens, e, top, rng)
    sid, eid, _ = align_ref(ids, e, bm)
    s = len(sid)
    nw = 2 if act.endswith("_mul") else 1
    x = rng.standard_normal((tokens if gather else s, kd)).astype(dtype)
    ws = [(rng.standard_normal((e, n, kd)) / 4).astype(dtype) for _ in range(nw)]
    bs = [rng.standard_normal((e, n)).astype(dtype) for _ in range(nw if bias else 0)]
    func = define_grouped_matmul(e, n, kd, bm, top, gather, act, dtype, bias=bias)
    (got,) = cpu_run(func, [x, *ws, *bs, sid, eid], [((s, n), dtype)])
    (want,) = ref("moe.grouped_matmul", [x, *ws, *bs, sid, eid], block_m=bm, top_k=top,
                  gather=gather, activation=act, bias=bias)
    rows = np.repeat(eid >= 0, bm)  # rows of unused tiles are unspecified,
    if gather:  # and so are padding rows (the reference writes 0, the kernel act(bias))
        rows &= sid < tokens * top
    close(got[rows], want[rows], dtype)


@pytest.mark.parametrize("m", [0, 5, 70])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_definition(m, bias):
    rng = np.random.default_rng(m)
    x = rng.standard_normal((m, 40)).astype(np.float32)
    w = rng.standard_normal((24, 40)).astype(np.float32)
    b = [rng.standard_normal(24).astype(np.float32)] if bias else []
    (got,) = cpu_run(define_linear("T", 40, 24, "float32", bias), [x, w, *b],
                     [((m, 24), "float32")])
    close(got, ref("core.linear", [x, w, *b])[0], "float32")


@pytest.mark.parametrize("tokens", [0, 3, 20])
def test_permute_definition(tokens):
    rng = np.random.default_rng(tokens)
    sid, _, _ = align_ref(routing(tokens, 4, 2, rng), 4, 8)
    x = rng.standard_normal((tokens, 16)).astype(np.float32)
    (got,) = cpu_run(define_permute(16, 2, "float32"), [x, sid], [((len(sid), 16), "float32")])
    close(got, ref("moe.permute", [x, sid], top_k=2)[0], "float32")


@pytest.mark.parametrize("tokens", [0, 3, 20])
def test_unpermute_definition(tokens):
    rng = np.random.default_rng(tokens)
    sid, _, srow = align_ref(routing(tokens, 4, 2, rng), 4, 8)
    y = rng.standard_normal((len(sid), 16)).astype(np.float32)
    (got,) = cpu_run(define_unpermute(16, 2, "float32"), [y, srow],
                     [((tokens, 2, 16), "float32")])
    close(got, ref("moe.unpermute", [y, srow])[0], "float32")


@pytest.mark.parametrize("tokens", [0, 3, 20])
def test_combine_definition(tokens):
    rng = np.random.default_rng(tokens)
    ids = routing(tokens, 4, 2, rng)
    sid, eid, srow = align_ref(ids, 4, 8)
    y = rng.standard_normal((len(sid), 16)).astype(np.float16)
    wts = rng.random((tokens, 2)).astype(np.float32)
    (got,) = cpu_run(define_combine(16, 2, "float16"), [y, wts, srow],
                     [((tokens, 16), "float16")])
    close(got, ref("moe.combine", [y, wts, srow])[0], "float16")


UNARY = [("silu", {}), ("gelu", {"approximate": "none"}), ("gelu", {"approximate": "tanh"}),
         ("relu", {}), ("sigmoid", {}), ("tanh", {}), ("exp", {}), ("neg", {}),
         ("sqrt", {}), ("rsqrt", {}), ("scale", {"value": 0.5}),
         ("clamp", {"min": -0.5, "max": None}), ("clamp", {"min": -1.0, "max": 1.0})]


@pytest.mark.parametrize("op,attrs", UNARY, ids=lambda v: str(v))
def test_unary_definitions(op, attrs):
    x = np.random.default_rng(0).standard_normal((6, 16)).astype(np.float32)
    if op in ("sqrt", "rsqrt"):
        x = np.abs(x) + 0.1
    (got,) = cpu_run(define_unary(op, ("T", 16), "float32", **attrs), [x], [((6, 16), "float32")])
    close(got, ref(f"core.{op}", [x], **attrs)[0], "float32")


def test_cast_definition():
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float16)
    (got,) = cpu_run(define_unary("cast", ("T", 8), "float16", to="float32"), [x],
                     [((3, 8), "float32")])
    np.testing.assert_array_equal(got, x.astype(np.float32))


@pytest.mark.parametrize("op", ["add", "sub", "mul", "div", "maximum", "minimum"])
@pytest.mark.parametrize("sa,sb", [(("T", 8), (8,)), ((1, 8), ("T", 1)), (("T", 8), ("T", 8))])
def test_binary_definitions(op, sa, sb):
    rng = np.random.default_rng(1)

    def concrete(s):
        return tuple(5 if d == "T" else d for d in s)

    a = rng.standard_normal(concrete(sa)).astype(np.float32)
    b = rng.standard_normal(concrete(sb)).astype(np.float32) + 3.0
    want = ref(f"core.{op}", [a, b])[0]
    (got,) = cpu_run(define_binary(op, sa, sb, "float32"), [a, b], [(want.shape, "float32")])
    close(got, want, "float32")


@pytest.mark.parametrize("shape,axis", [(("T", 8), -1), (("T", 6, 4), 1), ((3, "T"), 0)])
@pytest.mark.parametrize("tokens", [0, 5])
def test_softmax_definition(shape, axis, tokens):
    conc = tuple(tokens if d == "T" else d for d in shape)
    x = np.random.default_rng(2).standard_normal(conc).astype(np.float16)
    (got,) = cpu_run(define_softmax(shape, axis, "float16"), [x], [(conc, "float16")])
    close(got, ref("core.softmax", [x], axis=axis)[0], "float16")


@pytest.mark.parametrize("op", ["sum", "mean"])
@pytest.mark.parametrize("axis,keepdim", [(-1, False), (1, True), (0, False)])
def test_reduce_definition(op, axis, keepdim):
    x = np.random.default_rng(3).standard_normal((5, 6, 7)).astype(np.float32)
    want = ref(f"core.{op}", [x], axis=axis, keepdim=keepdim)[0]
    (got,) = cpu_run(define_reduce(op, ("T", 6, 7), axis, keepdim, "float32"), [x],
                     [(want.shape, "float32")])
    close(got, want, "float32")


@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize("tokens", [0, 4])
def test_norm_definitions(kind, tokens):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((tokens, 64)).astype(np.float16)
    params = [rng.standard_normal(64).astype(np.float16) for _ in range(
        1 if kind == "rmsnorm" else 2)]
    (got,) = cpu_run(define_norm(kind, ("T", 64), 1e-5, "float16"), [x, *params],
                     [((tokens, 64), "float16")])
    close(got, ref(f"core.{kind}", [x, *params], eps=1e-5)[0], "float16")
