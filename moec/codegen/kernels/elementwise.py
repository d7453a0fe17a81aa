"""Elementwise kernels: unary math and numpy-broadcasting binary ops.

Both go through one pointwise template. The output is viewed as `rows x inner` after dropping
size-1 dims and merging neighbouring dims that every operand broadcasts the same way (so
`[T, 8, 64] + [64]` becomes `[T*8, 64] + [64]` and `[T, H] + [T, H]` one flat run). Tasks are
(row, chunk of `inner`), run in parallel; each chunk is a vector loop plus a scalar tail.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tvm import tirx
from tvm.script import tirx as T

from moec.codegen.kernels import fmath
from moec.codegen.kernels.base import (
    FLOAT_DTYPES,
    Dims,
    Kernel,
    Shape,
    ceildiv,
    check_dtype,
    finish,
    i64,
    kernel_name,
    par_min,
    prod,
    static,
    vector_lanes,
)
from moec.errors import CodegenError

CHUNK = 8192  # elements per parallel task when a row is long: enough to amortise the task

CAST_DTYPES = (*FLOAT_DTYPES, "int32", "int64")


def _unary_fn(op: str, attrs: dict) -> Callable[[tirx.Expr], tirx.Expr]:
    """The float32 expression of a unary op."""
    c = fmath.c
    if op == "gelu":
        approximate = attrs.get("approximate", "none")
        if approximate not in ("none", "tanh"):
            raise CodegenError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
        return fmath.gelu if approximate == "none" else fmath.gelu_tanh
    if op in ("silu", "relu", "sigmoid", "tanh"):
        return fmath.activation(op)
    if op == "exp":
        return fmath.exp
    if op == "neg":
        return lambda v: -v
    if op == "sqrt":
        return tirx.sqrt
    if op == "softplus":
        return fmath.softplus
    if op == "rsqrt":
        return lambda v: c(1.0) / tirx.sqrt(v)
    if op == "scale":
        if "value" not in attrs:
            raise CodegenError("scale: missing attribute 'value'")
        value = float(attrs["value"])
        return lambda v: v * c(value)
    if op == "clamp":
        lo, hi = attrs.get("min"), attrs.get("max")

        def clamp(v: tirx.Expr) -> tirx.Expr:
            if lo is not None:
                v = fmath.fmax(v, c(float(lo)))
            if hi is not None:
                v = fmath.fmin(v, c(float(hi)))
            return v

        return clamp
    raise CodegenError(f"elementwise_unary: unknown op {op!r}")


UNARY_OPS = ("silu", "gelu", "relu", "sigmoid", "tanh", "exp", "neg", "sqrt", "rsqrt", "softplus",
             "clamp", "scale", "cast")
BINARY_OPS: dict[str, Callable[[tirx.Expr, tirx.Expr], tirx.Expr]] = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b,
    "maximum": fmath.fmax,
    "minimum": fmath.fmin,
}


def elementwise_unary(op: str, shape: Shape, dtype: str = "float32", **attrs: object) -> Kernel:
    """`y = op(x)` over `shape` (ints and symbolic names). Kernel args: `(x, y)`.

    op: silu, gelu (`approximate="none"|"tanh"`), relu, sigmoid, tanh, exp, neg, sqrt, rsqrt,
    softplus, clamp (`min`, `max`: float or None), scale (`value`), cast (`to`: dtype of y).
    Math runs in float32 (f16/bf16 inputs are widened, the result rounded back)."""
    if op not in UNARY_OPS:
        raise CodegenError(f"elementwise_unary: unknown op {op!r}; known: {UNARY_OPS}")
    if op == "cast":
        to = str(attrs.get("to", ""))
        check_dtype("cast", dtype, CAST_DTYPES)
        check_dtype("cast", to, CAST_DTYPES)
        fn = lambda vals: tirx.Cast(to, vals[0])  # noqa: E731
        out_dtype, widen = to, False
    else:
        check_dtype(f"elementwise_unary({op})", dtype, FLOAT_DTYPES)
        f = _unary_fn(op, attrs)
        fn = lambda vals: f(vals[0])  # noqa: E731
        out_dtype, widen = dtype, True
    tag = "_".join(f"{k}{v}" for k, v in sorted(attrs.items()))
    name = kernel_name(op, dtype, tag, *shape)
    return _pointwise(name, list(shape), out_dtype, [(list(shape), dtype)], fn, widen)


def elementwise_binary(op: str, shape_a: Shape, shape_b: Shape, dtype: str = "float32") -> Kernel:
    """`y = op(a, b)` with numpy broadcasting. Kernel args: `(a, b, y)`.

    op: add, sub, mul, div, maximum, minimum. A symbolic dim broadcasts only against 1 or the
    same name (anything else cannot be checked at build time and raises CodegenError)."""
    if op not in BINARY_OPS:
        raise CodegenError(f"elementwise_binary: unknown op {op!r}; known: {list(BINARY_OPS)}")
    check_dtype(f"elementwise_binary({op})", dtype, FLOAT_DTYPES)
    out = broadcast_shapes(shape_a, shape_b)
    f = BINARY_OPS[op]
    name = kernel_name(op, dtype, *shape_a, "by", *shape_b)
    operands = [(list(shape_a), dtype), (list(shape_b), dtype)]
    return _pointwise(name, out, dtype, operands, lambda v: f(v[0], v[1]), True)


def broadcast_shapes(a: Shape, b: Shape) -> list:
    """numpy broadcasting on shape specs."""
    rank = max(len(a), len(b))
    pa = [1] * (rank - len(a)) + list(a)
    pb = [1] * (rank - len(b)) + list(b)
    out = []
    for x, y in zip(pa, pb, strict=True):
        if x == y or y == 1:
            out.append(x)
        elif x == 1:
            out.append(y)
        else:
            raise CodegenError(f"shapes {list(a)} and {list(b)} do not broadcast ({x} vs {y})")
    return out


def _merge_dims(out: Sequence, operands: Sequence[Sequence]) -> tuple[list[list], list[list]]:
    """Group output dims: drop static 1s, merge neighbours with the same broadcast pattern.
    Returns the groups (lists of dim specs) and, per operand, a broadcast flag per group."""
    rank = len(out)
    padded = [[1] * (rank - len(s)) + list(s) for s in operands]
    groups: list[list] = []
    flags: list[list[bool]] = [[] for _ in operands]
    prev = None
    for i, d in enumerate(out):
        if d == 1:
            continue
        pattern = tuple(p[i] == 1 for p in padded)
        if pattern == prev:
            groups[-1].append(d)
        else:
            groups.append([d])
            for fl, b in zip(flags, pattern, strict=True):
                fl.append(b)
        prev = pattern
    if not groups:  # every dim is 1 (or rank 0): one element
        groups, flags = [[1]], [[False] for _ in operands]
    return groups, flags


def _pointwise(
    name: str,
    out_spec: list,
    out_dtype: str,
    operands: list[tuple[list, str]],
    fn: Callable[[list[tirx.Expr]], tirx.Expr],
    widen: bool,
) -> Kernel:
    dims = Dims()
    groups, flags = _merge_dims(out_spec, [s for s, _ in operands])
    sizes = [prod(dims.shape(g)) for g in groups]
    # Per operand: element stride of each group (0 where it broadcasts).
    strides = []
    for fl in flags:
        run, st = i64(1), []
        for size, bcast in zip(reversed(sizes), reversed(fl), strict=True):
            st.append(i64(0) if bcast else run)
            run = run if bcast else prod([run, size])
        strides.append(st[::-1])
    inner = sizes[-1]
    rows = prod(sizes[:-1])
    in_dtype = operands[0][1]
    vl = vector_lanes(out_dtype if static(inner) is None else in_dtype)
    inner_static = static(inner)
    if inner_static is not None and inner_static <= CHUNK:
        chunk, nch = max(inner_static, 1), i64(1)
    else:
        chunk, nch = CHUNK, ceildiv(inner, CHUNK)

    def row_offset(k: int, r: tirx.Expr) -> tirx.Expr:
        off, rem = i64(0), r
        for g in range(len(sizes) - 2, -1, -1):
            idx = rem if g == 0 else rem % sizes[g]
            rem = rem // sizes[g]
            off = off + idx * strides[k][g]
        return off

    def load(buf: tirx.Buffer, k: int, off: tirx.Expr, j: tirx.Expr) -> tirx.Expr:
        v = buf[off + i64(j) * strides[k][-1]]
        return tirx.Cast("float32", v) if widen and operands[k][1] != "float32" else v

    def value(bufs: list, offs: list, j: tirx.Expr) -> tirx.Expr:
        n = len(operands)  # unary kernels carry a placeholder B that is never read
        v = fn([load(bufs[k], k, offs[k], j) for k in range(n)])
        return v if str(v.ty.dtype) == out_dtype else tirx.Cast(out_dtype, v)

    def staged_value(st: tirx.Buffer, lane: tirx.Expr) -> tirx.Expr:
        return fn([st[k, lane] for k in range(len(operands))])

    two = len(operands) == 2
    a_shape = dims.shape(operands[0][0])
    b_shape = dims.shape(operands[1][0]) if two else [i64(1)]
    b_dtype = operands[1][1] if two else in_dtype
    y_shape = dims.shape(out_spec)
    a_n, b_n, y_n = prod(a_shape), prod(b_shape), prod(y_shape)
    exact = inner_static is not None and inner_static % vl == 0 and nch.value == 1
    # f16/bf16 math goes through an f32 register stage: TVM legalises bf16 casts into bit ops
    # that break on let-expressions (the vectoriser then sees one let var bound twice).
    staged = widen and any(d != "float32" for d in (in_dtype, b_dtype, out_dtype))

    def second(a_buf: tirx.Buffer, b_buf: tirx.Buffer) -> tirx.Buffer:
        # Unary kernels drop the placeholder B from the signature: alias A so B is unused.
        return b_buf if two else a_buf

    @T.prim_func
    def func(a: T.handle, b: T.handle, y: T.handle):
        A = T.match_buffer(a, a_shape, in_dtype)
        B = T.match_buffer(b, b_shape, b_dtype)
        Y = T.match_buffer(y, y_shape, out_dtype)
        Af = T.decl_buffer((a_n,), in_dtype, data=A.data)
        Bf = T.decl_buffer((b_n,), b_dtype, data=second(A, B).data)
        Yf = T.decl_buffer((y_n,), out_dtype, data=Y.data)
        for task in T.parallel(rows * nch):
            r: T.let = task // nch
            j0: T.let = task % nch * chunk
            jn: T.let = T.min(inner - j0, i64(chunk))
            oa: T.let = row_offset(0, r)
            ob: T.let = row_offset(1, r) if two else i64(0)
            oy: T.let = r * inner
            st = T.alloc_buffer((2, vl), "float32")
            for v in range(jn // vl):
                if staged:
                    for lane in T.vectorized(vl):
                        st[0, lane] = load(Af, 0, oa, j0 + v * vl + lane)
                        if two:
                            st[1, lane] = load(Bf, 1, ob, j0 + v * vl + lane)
                    for lane in T.vectorized(vl):
                        st[0, lane] = staged_value(st, lane)
                    for lane in T.vectorized(vl):
                        Yf[oy + j0 + v * vl + lane] = T.Cast(out_dtype, st[0, lane])
                else:
                    for lane in T.vectorized(vl):
                        Yf[oy + j0 + v * vl + lane] = value([Af, Bf], [oa, ob],
                                                            j0 + v * vl + lane)
            if not exact:
                for t in range(jn % vl):
                    if staged:
                        st[0, 0] = load(Af, 0, oa, j0 + jn // vl * vl + t)
                        if two:
                            st[1, 0] = load(Bf, 1, ob, j0 + jn // vl * vl + t)
                        st[0, 0] = staged_value(st, 0)
                        Yf[oy + j0 + jn // vl * vl + t] = T.Cast(out_dtype, st[0, 0])
                    else:
                        Yf[oy + j0 + jn // vl * vl + t] = value([Af, Bf], [oa, ob],
                                                                j0 + jn // vl * vl + t)

    return finish(func, name, drop=() if two else ("B",), min_parallel=par_min(chunk))
