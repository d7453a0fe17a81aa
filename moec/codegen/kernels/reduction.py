"""Reductions along one axis: softmax, sum/mean, rmsnorm, layernorm. Parallel over rows.

A tensor is viewed as `[outer, n, inner]` around the reduced axis. When the axis is the last one
(`inner == 1`, the common case), each row is reduced in `vl` SIMD lanes plus a scalar tail, then
the lanes are summed; the summation order therefore differs from numpy's pairwise sum by normal
float32 rounding only. All math is float32.
"""

from __future__ import annotations

from collections.abc import Sequence

from tvm import tirx
from tvm.script import tirx as T

from moec.codegen.kernels import fmath
from moec.codegen.kernels.base import (
    Dims,
    Kernel,
    Shape,
    ceildiv,
    check_dtype,
    finish,
    i64,
    kernel_name,
    normalize_axis,
    par_min,
    prod,
    static,
    vector_lanes,
)
from moec.errors import CodegenError

CHUNK = 4096  # columns per task when reducing a non-last axis: a [CHUNK] f32 row stays in L1
NEG_INF = float("-inf")


def _split(dims: Dims, shape: Shape, axes: Sequence[int]):
    sh = dims.shape(shape)
    lo, hi = min(axes), max(axes) + 1
    return sh, prod(sh[:lo]), prod(sh[lo:hi]), prod(sh[hi:])


def softmax(shape: Shape, axis: int = -1, dtype: str = "float32") -> Kernel:
    """`y = softmax(x, axis)` (max-subtracted, float32). Kernel args: `(x, y)`.
    Last axis: vectorised rows; other axes: one scalar column per task."""
    check_dtype("softmax", dtype)
    ax = normalize_axis(axis, len(shape), "softmax")
    dims = Dims()
    sh, outer, n, inner = _split(dims, shape, [ax])
    numel = prod(sh)
    name = kernel_name("softmax", dtype, "ax", ax, *shape)
    vl = vector_lanes(dtype)
    if static(inner) != 1:
        return finish(_softmax_columns(sh, numel, outer, n, inner, dtype), name)

    @T.prim_func
    def func(x: T.handle, y: T.handle):
        X = T.match_buffer(x, sh, dtype)
        Y = T.match_buffer(y, sh, dtype)
        Xf = T.decl_buffer((numel,), dtype, data=X.data)
        Yf = T.decl_buffer((numel,), dtype, data=Y.data)
        for r in T.parallel(outer):
            acc = T.alloc_buffer((vl,), "float32")
            red = T.alloc_buffer((1,), "float32")
            base: T.let = r * n
            tail: T.let = base + n // vl * vl
            for lane in T.vectorized(vl):
                acc[lane] = T.float32(NEG_INF)
            for v in range(n // vl):
                for lane in T.vectorized(vl):
                    acc[lane] = T.max(acc[lane], Xf[base + v * vl + lane])
            for t in range(n % vl):
                acc[0] = T.max(acc[0], Xf[tail + t])
            red[0] = T.float32(NEG_INF)
            for lane in range(vl):
                red[0] = T.max(red[0], acc[lane])
            # exp(x - max) goes to y once, then y is rescaled: two passes over x, one over y.
            for lane in T.vectorized(vl):
                acc[lane] = T.float32(0)
            for v in range(n // vl):
                for lane in T.vectorized(vl):
                    Yf[base + v * vl + lane] = fmath.exp(Xf[base + v * vl + lane] - red[0])
                    acc[lane] = acc[lane] + Yf[base + v * vl + lane]
            for t in range(n % vl):
                Yf[tail + t] = fmath.exp(Xf[tail + t] - red[0])
                acc[0] = acc[0] + Yf[tail + t]
            red[0] = T.float32(0)
            for lane in range(vl):
                red[0] = red[0] + acc[lane]
            red[0] = T.float32(1) / red[0]
            for v in range(n // vl):
                for lane in T.vectorized(vl):
                    Yf[base + v * vl + lane] = Yf[base + v * vl + lane] * red[0]
            for t in range(n % vl):
                Yf[tail + t] = Yf[tail + t] * red[0]

    return finish(func, name, min_parallel=par_min(static(n) or 1))


def _softmax_columns(sh, numel, outer, n, inner, dtype) -> tirx.PrimFunc:
    @T.prim_func
    def func(x: T.handle, y: T.handle):
        X = T.match_buffer(x, sh, dtype)
        Y = T.match_buffer(y, sh, dtype)
        Xf = T.decl_buffer((numel,), dtype, data=X.data)
        Yf = T.decl_buffer((numel,), dtype, data=Y.data)
        for task in T.parallel(outer * inner):
            red = T.alloc_buffer((2,), "float32")
            base: T.let = task // inner * n * inner + task % inner
            red[0] = T.float32(NEG_INF)
            for k in range(n):
                red[0] = T.max(red[0], Xf[base + k * inner])
            red[1] = T.float32(0)
            for k in range(n):
                Yf[base + k * inner] = fmath.exp(Xf[base + k * inner] - red[0])
                red[1] = red[1] + Yf[base + k * inner]
            red[1] = T.float32(1) / red[1]
            for k in range(n):
                Yf[base + k * inner] = Yf[base + k * inner] * red[1]

    return func


def reduce(
    op: str, shape: Shape, axis: int | Sequence[int], keepdim: bool = False, dtype: str = "float32"
) -> Kernel:
    """`y = sum|mean(x, axis, keepdim)`. Kernel args: `(x, y)`.

    `axis` is an int or a sequence of neighbouring axes. Last axis: vectorised row sums;
    otherwise each task accumulates a chunk of the trailing columns over the reduced rows."""
    if op not in ("sum", "mean"):
        raise CodegenError(f"reduce: op must be 'sum' or 'mean', got {op!r}")
    check_dtype(f"reduce({op})", dtype)
    axes = sorted({normalize_axis(a, len(shape), "reduce") for a in
                   ([axis] if isinstance(axis, int) else axis)})
    if not axes or axes != list(range(axes[0], axes[-1] + 1)):
        raise CodegenError(f"reduce: axes {axis} must be non-empty and neighbouring")
    out_spec = [d for i, d in enumerate(shape) if i not in axes or keepdim]
    if keepdim:
        out_spec = [1 if i in axes else d for i, d in enumerate(shape)]
    dims = Dims()
    sh, outer, n, inner = _split(dims, shape, axes)
    osh = dims.shape(out_spec)
    numel, onumel = prod(sh), prod(osh)
    vl = vector_lanes(dtype)
    mean = op == "mean"
    name = kernel_name(op, dtype, "ax", *axes, "keep" if keepdim else "", *shape)

    def finish_value(v: tirx.Expr) -> tirx.Expr:
        # mean of an empty axis is 0/0 = nan, as in numpy
        return v / tirx.Cast("float32", n) if mean else v

    if static(inner) == 1:

        @T.prim_func
        def func(x: T.handle, y: T.handle):
            X = T.match_buffer(x, sh, dtype)
            Y = T.match_buffer(y, osh, dtype)
            Xf = T.decl_buffer((numel,), dtype, data=X.data)
            Yf = T.decl_buffer((onumel,), dtype, data=Y.data)
            for r in T.parallel(outer):
                acc = T.alloc_buffer((vl,), "float32")
                red = T.alloc_buffer((1,), "float32")
                base: T.let = r * n
                for lane in T.vectorized(vl):
                    acc[lane] = T.float32(0)
                for v in range(n // vl):
                    for lane in T.vectorized(vl):
                        acc[lane] = acc[lane] + Xf[base + v * vl + lane]
                for t in range(n % vl):
                    acc[0] = acc[0] + Xf[base + n // vl * vl + t]
                red[0] = T.float32(0)
                for lane in range(vl):
                    red[0] = red[0] + acc[lane]
                Yf[r] = finish_value(red[0])

        return finish(func, name, min_parallel=par_min(static(n) or 1))

    nch = ceildiv(inner, CHUNK)

    @T.prim_func
    def func_cols(x: T.handle, y: T.handle):
        X = T.match_buffer(x, sh, dtype)
        Y = T.match_buffer(y, osh, dtype)
        Xf = T.decl_buffer((numel,), dtype, data=X.data)
        Yf = T.decl_buffer((onumel,), dtype, data=Y.data)
        for task in T.parallel(outer * nch):
            o: T.let = task // nch
            j0: T.let = task % nch * CHUNK
            jn: T.let = T.min(inner - j0, i64(CHUNK))
            ob: T.let = o * inner + j0
            jt: T.let = jn // vl * vl
            for v in range(jn // vl):
                for lane in T.vectorized(vl):
                    Yf[ob + v * vl + lane] = T.float32(0)
            for t in range(jn % vl):
                Yf[ob + jt + t] = T.float32(0)
            for k in range(n):
                for v in range(jn // vl):
                    for lane in T.vectorized(vl):
                        Yf[ob + v * vl + lane] = (Yf[ob + v * vl + lane]
                                                  + Xf[(o * n + k) * inner + j0 + v * vl + lane])
                for t in range(jn % vl):
                    Yf[ob + jt + t] = Yf[ob + jt + t] + Xf[(o * n + k) * inner + j0 + jt + t]
            if mean:
                for v in range(jn // vl):
                    for lane in T.vectorized(vl):
                        Yf[ob + v * vl + lane] = finish_value(Yf[ob + v * vl + lane])
                for t in range(jn % vl):
                    Yf[ob + jt + t] = finish_value(Yf[ob + jt + t])

    return finish(func_cols, name)


def rmsnorm(shape: Shape, eps: float, dtype: str = "float32") -> Kernel:
    """`y = x / sqrt(mean(x**2, -1) + eps) * w`, w `[H]`. Kernel args: `(x, w, y)`."""
    return _norm("rmsnorm", shape, eps, dtype)


def layernorm(shape: Shape, eps: float, dtype: str = "float32") -> Kernel:
    """`y = (x - mean) / sqrt(var + eps) * w + b` over the last axis (biased variance, computed
    in a second pass around the mean for accuracy). Kernel args: `(x, w, b, y)`."""
    return _norm("layernorm", shape, eps, dtype)


def _norm(kind: str, shape: Shape, eps: float, dtype: str) -> Kernel:
    check_dtype(kind, dtype)
    if not shape:
        raise CodegenError(f"{kind}: needs at least one axis")
    dims = Dims()
    sh = dims.shape(shape)
    rows, n = prod(sh[:-1]), sh[-1]
    numel = prod(sh)
    vl = vector_lanes(dtype)
    ln = kind == "layernorm"
    name = kernel_name(kind, dtype, *shape)
    fn = tirx.Cast("float32", n)

    def affine(v: tirx.Expr, w: tirx.Buffer, b: tirx.Buffer, j: tirx.Expr) -> tirx.Expr:
        return v * w[j] + b[j] if ln else v * w[j]

    @T.prim_func
    def func(x: T.handle, w: T.handle, b: T.handle, y: T.handle):
        X = T.match_buffer(x, sh, dtype)
        W = T.match_buffer(w, (n,), dtype)
        B = T.match_buffer(b, (n,), dtype)
        Y = T.match_buffer(y, sh, dtype)
        Xf = T.decl_buffer((numel,), dtype, data=X.data)
        Yf = T.decl_buffer((numel,), dtype, data=Y.data)
        for r in T.parallel(rows):
            acc = T.alloc_buffer((vl,), "float32")
            red = T.alloc_buffer((2,), "float32")  # [mean, 1/std]
            base: T.let = r * n
            tail: T.let = n // vl * vl
            red[0] = T.float32(0)
            if ln:
                for lane in T.vectorized(vl):
                    acc[lane] = T.float32(0)
                for v in range(n // vl):
                    for lane in T.vectorized(vl):
                        acc[lane] = acc[lane] + Xf[base + v * vl + lane]
                for t in range(n % vl):
                    acc[0] = acc[0] + Xf[base + tail + t]
                for lane in range(vl):
                    red[0] = red[0] + acc[lane]
                red[0] = red[0] / fn
            for lane in T.vectorized(vl):
                acc[lane] = T.float32(0)
            for v in range(n // vl):
                for lane in T.vectorized(vl):
                    acc[lane] = acc[lane] + (Xf[base + v * vl + lane] - red[0]) * (
                        Xf[base + v * vl + lane] - red[0])
            for t in range(n % vl):
                acc[0] = acc[0] + (Xf[base + tail + t] - red[0]) * (Xf[base + tail + t] - red[0])
            red[1] = T.float32(0)
            for lane in range(vl):
                red[1] = red[1] + acc[lane]
            red[1] = T.float32(1) / T.sqrt(red[1] / fn + T.float32(eps))
            for v in range(n // vl):
                for lane in T.vectorized(vl):
                    Yf[base + v * vl + lane] = affine(
                        (Xf[base + v * vl + lane] - red[0]) * red[1], W, B, v * vl + lane)
            for t in range(n % vl):
                Yf[base + tail + t] = affine((Xf[base + tail + t] - red[0]) * red[1], W, B,
                                             tail + t)

    return finish(func, name, drop=() if ln else ("B",), min_parallel=par_min(static(n) or 1))
