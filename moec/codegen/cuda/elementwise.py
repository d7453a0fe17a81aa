"""Elementwise CUDA kernels: unary activations/casts and broadcasting binary ops.

Math runs in float32 and is cast back to the tensor dtype (as the reference does); the schedule
is the plain injective one: every loop fused, 256 threads per block, one element per thread."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from tvm import s_tir, te, tirx

from moec.codegen.cuda.base import FLOATS, Dim, Kernel, Shapes, cast, check_dtype, f32, finalize
from moec.errors import CodegenError

THREADS = 256


def _sigmoid(x: tirx.PrimExpr) -> tirx.PrimExpr:
    return tirx.const(1.0, "float32") / (tirx.const(1.0, "float32") + tirx.exp(-x))


def _gelu(x: tirx.PrimExpr, approximate: str) -> tirx.PrimExpr:
    half = tirx.const(0.5, "float32")
    one = tirx.const(1.0, "float32")
    if approximate == "tanh":
        c = tirx.const(math.sqrt(2.0 / math.pi), "float32")
        return half * x * (one + tirx.tanh(c * (x + tirx.const(0.044715, "float32") * x * x * x)))
    return half * x * (one + tirx.erf(x * tirx.const(1.0 / math.sqrt(2.0), "float32")))


def activation(name: str, x: tirx.PrimExpr) -> tirx.PrimExpr:
    """The moe activations (`silu`, `gelu`, `gelu_tanh`, `relu`, `relu2`, `none`) on a float32
    value."""
    if name == "silu":
        return x * _sigmoid(x)
    if name == "gelu":
        return _gelu(x, "none")
    if name == "gelu_tanh":
        return _gelu(x, "tanh")
    if name == "relu":
        return tirx.max(x, tirx.const(0.0, "float32"))
    if name == "relu2":
        r = tirx.max(x, tirx.const(0.0, "float32"))
        return r * r
    if name == "none":
        return x
    raise CodegenError(f"unknown activation {name!r}")


def _fconst(v: float) -> tirx.PrimExpr:
    return tirx.const(float(v), "float32")


def _unary(op: str, attrs: dict[str, Any]) -> Callable[[tirx.PrimExpr], tirx.PrimExpr]:
    table: dict[str, Callable[[tirx.PrimExpr], tirx.PrimExpr]] = {
        "silu": lambda x: activation("silu", x),
        "gelu": lambda x: _gelu(x, attrs.get("approximate", "none")),
        "relu": lambda x: activation("relu", x),
        "sigmoid": _sigmoid,
        "tanh": tirx.tanh,
        "exp": tirx.exp,
        "neg": lambda x: -x,
        "sqrt": tirx.sqrt,
        "rsqrt": tirx.rsqrt,
        # log(1 + e^x) = max(x, 0) + log1p(e^-|x|): no overflow, accurate where it is tiny
        "softplus": lambda x: tirx.max(x, _fconst(0.0)) + tirx.log1p(tirx.exp(-tirx.abs(x))),
    }
    if op in table:
        return table[op]
    if op == "scale":
        return lambda x: x * _fconst(attrs["value"])
    if op == "clamp":
        lo, hi = attrs.get("min"), attrs.get("max")

        def clamp(x: tirx.PrimExpr) -> tirx.PrimExpr:
            if lo is not None:
                x = tirx.max(x, _fconst(lo))
            if hi is not None:
                x = tirx.min(x, _fconst(hi))
            return x
        return clamp
    raise CodegenError(f"elementwise_unary: unknown op {op!r}")


def schedule_injective(func: tirx.PrimFunc, threads: int = THREADS) -> tirx.PrimFunc:
    """Fuse every loop of every block and bind it to (blockIdx.x, threadIdx.x)."""
    sch = s_tir.Schedule(func)
    for blk in sch.get_child_blocks(sch.get_sblock("root")):
        loops = sch.get_loops(blk)
        if not loops:
            loops = [sch.add_unit_loop(blk)]
        bx, tx = sch.split(sch.fuse(*loops), [None, threads])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
    return sch.mod["main"]


def define_unary(op: str, shape: Sequence[Dim], dtype: str, **attrs: Any) -> tirx.PrimFunc:
    """The unscheduled te definition of `elementwise_unary` (tests run it on the CPU)."""
    sh = Shapes()
    x = te.placeholder(sh.shape(shape), dtype, name="x")
    if op == "cast":
        y = te.compute(x.shape, lambda *i: cast(x(*i), attrs["to"]), name="y")
    else:
        check_dtype(dtype, FLOATS)
        fn = _unary(op, attrs)
        y = te.compute(x.shape, lambda *i: cast(fn(f32(x(*i))), dtype), name="y")
    return te.create_prim_func([x, y])


def elementwise_unary(op: str, shape: Sequence[Dim], dtype: str, **attrs: Any) -> Kernel:
    """y = op(x) elementwise; `cast` takes `to=<dtype>`, the others compute in float32."""
    name = f"cast_{dtype}_{attrs['to']}" if op == "cast" else f"{op}_{dtype}"
    func = schedule_injective(define_unary(op, shape, dtype, **attrs))
    return Kernel(finalize(func, name), name, {})


_BINARY: dict[str, Callable[[tirx.PrimExpr, tirx.PrimExpr], tirx.PrimExpr]] = {
    "add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b, "maximum": tirx.max, "minimum": tirx.min,
}


def broadcast_shape(sa: Sequence[Dim], sb: Sequence[Dim]) -> tuple[Dim, ...]:
    """numpy broadcasting on static ints and dim names (equal names are equal dims)."""
    ra, rb = list(sa)[::-1], list(sb)[::-1]
    out: list[Dim] = []
    for i in range(max(len(ra), len(rb))):
        x = ra[i] if i < len(ra) else 1
        y = rb[i] if i < len(rb) else 1
        if x == y or y == 1:
            out.append(x)
        elif x == 1:
            out.append(y)
        else:
            raise CodegenError(f"shapes {tuple(sa)} and {tuple(sb)} do not broadcast")
    return tuple(out[::-1])


def _bcast_index(in_shape: Sequence[Dim], out_shape: Sequence[Dim], idx: Sequence) -> list:
    off = len(out_shape) - len(in_shape)
    return [0 if d == 1 and out_shape[off + j] != 1 else idx[off + j]
            for j, d in enumerate(in_shape)]


def define_binary(op: str, shape_a: Sequence[Dim], shape_b: Sequence[Dim],
                  dtype: str) -> tirx.PrimFunc:
    """The unscheduled te definition of `elementwise_binary`."""
    check_dtype(dtype, FLOATS)
    if op not in _BINARY:
        raise CodegenError(f"elementwise_binary: unknown op {op!r}")
    sh = Shapes()
    so = broadcast_shape(shape_a, shape_b)
    a = te.placeholder(sh.shape(shape_a), dtype, name="a")
    b = te.placeholder(sh.shape(shape_b), dtype, name="b")
    fn = _BINARY[op]

    def body(*i):
        va = a(*_bcast_index(shape_a, so, i))
        vb = b(*_bcast_index(shape_b, so, i))
        return cast(fn(f32(va), f32(vb)), dtype)

    c = te.compute(sh.shape(so), body, name="c")
    return te.create_prim_func([a, b, c])


def elementwise_binary(op: str, shape_a: Sequence[Dim], shape_b: Sequence[Dim],
                       dtype: str) -> Kernel:
    """c = a (op) b with numpy broadcasting, float32 math."""
    func = schedule_injective(define_binary(op, shape_a, shape_b, dtype))
    name = f"{op}_{dtype}"
    return Kernel(finalize(func, name), name, {})
