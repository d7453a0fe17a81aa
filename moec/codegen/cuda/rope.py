"""CUDA kernel of `core.rope` (rotate-half rotary embedding), same builder and signature as
moec.codegen.kernels.nn.rope: a te definition under the injective schedule (one element per
thread)."""

from __future__ import annotations

from collections.abc import Sequence

from tvm import te, tirx

from moec.codegen.cuda.base import Dim, Kernel, Shapes, cast, check_dtype, f32, finalize
from moec.codegen.cuda.elementwise import schedule_injective
from moec.errors import CodegenError


def define_rope(x_shape: Sequence[Dim], c_shape: Sequence[Dim],
                dtype: str = "float32") -> tirx.PrimFunc:
    """Unscheduled te definition of `rope` (float32 math)."""
    check_dtype(dtype)
    d, dc = x_shape[-1], c_shape[-1]
    if not isinstance(d, int) or d % 2 or dc not in (d, d // 2):
        raise CodegenError(f"rope: want an even static last dim and tables of D or D/2, got "
                           f"{list(x_shape)} and {list(c_shape)}")
    h = d // 2
    sh = Shapes()
    x = te.placeholder(sh.shape(x_shape), dtype, name="x")
    c = te.placeholder(sh.shape(c_shape), dtype, name="cos")
    s = te.placeholder(sh.shape(c_shape), dtype, name="sin")
    bcast = [cd == 1 and xd != 1 for cd, xd in zip(c_shape[:-1], x_shape[:-1], strict=True)]

    def table(t, i, j):
        lead = [tirx.IntImm("int64", 0) if b else v for b, v in zip(bcast, i, strict=True)]
        return f32(t(*lead, j % dc if dc != d else j))

    def body(*idx):
        *i, j = idx
        first = j < h
        other = tirx.Select(first, j + h, j - h)
        sign = tirx.Select(first, tirx.const(-1.0, "float32"), tirx.const(1.0, "float32"))
        v = f32(x(*i, j)) * table(c, i, j) + sign * f32(x(*i, other)) * table(s, i, j)
        return cast(v, dtype)

    y = te.compute(x.shape, body, name="y")
    return te.create_prim_func([x, c, s, y])


def rope(x_shape: Sequence[Dim], c_shape: Sequence[Dim], dtype: str = "float32") -> Kernel:
    """`y = x * cos + rotate_half(x) * sin`. Kernel args `(x, cos, sin, y)`."""
    name = f"rope_{dtype}"
    return Kernel(finalize(schedule_injective(define_rope(x_shape, c_shape, dtype)), name),
                  name, {})


def define_linear_heads(lead: Sequence[Dim], H: int, N: int, K: int,
                        dtype: str = "float32") -> tirx.PrimFunc:
    """Unscheduled te definition of `linear_heads` (float32 accumulation)."""
    check_dtype(dtype)
    sh = Shapes()
    ls = sh.shape(lead)
    x = te.placeholder((*ls, H, K), dtype, name="x")
    w = te.placeholder((H, N, K), dtype, name="w")
    k = te.reduce_axis((0, K), name="k")
    acc = te.compute((*ls, H, N), lambda *i: te.sum(
        f32(x(*i[:-1], k)) * f32(w(i[-2], i[-1], k)), axis=k), name="acc")
    y = te.compute(acc.shape, lambda *i: cast(acc(*i), dtype), name="y")
    return te.create_prim_func([x, w, y])


def linear_heads(lead: Sequence[Dim], H: int, N: int, K: int, dtype: str = "float32",
                 w_dtype: str | None = None) -> Kernel:
    """`y[..., h, :] = w[h] @ x[..., h, :]`: one output per thread, K in a loop, float32
    accumulation (the absorbed MLA projections: small next to the rest of a layer).
    Args `(x [*lead, H, K], w [H, N, K], y [*lead, H, N])`."""
    from tvm.script import tirx as T

    from moec.codegen.cuda.elementwise import THREADS

    check_dtype(dtype)
    if w_dtype not in (None, dtype):
        raise CodegenError(f"linear_heads: {w_dtype} weights with {dtype} activations")
    sh = Shapes()
    ls = sh.shape(lead)
    rows = 1
    for d in ls:
        rows = rows * d
    total = rows * (H * N)
    blocks = (total + (THREADS - 1)) // THREADS

    @T.prim_func
    def func(x: T.handle, w: T.handle, y: T.handle):
        X = T.match_buffer(x, [*ls, H, K], dtype)
        W = T.match_buffer(w, (H, N, K), dtype)
        Y = T.match_buffer(y, [*ls, H, N], dtype)
        Xf = T.decl_buffer((rows * H * K,), dtype, data=X.data)
        Yf = T.decl_buffer((total,), dtype, data=Y.data)
        for bx in T.thread_binding(blocks, thread="blockIdx.x"):
            for tx in T.thread_binding(THREADS, thread="threadIdx.x"):
                acc = T.alloc_buffer((1,), "float32", scope="local")
                i: T.let = bx * THREADS + tx
                if i < total:
                    rh: T.let = i // N
                    h: T.let = rh % H
                    n: T.let = i % N
                    acc[0] = T.float32(0)
                    for k in range(K):
                        acc[0] = acc[0] + T.Cast("float32", Xf[rh * K + k]) * T.Cast(
                            "float32", W[h, n, k])
                    Yf[i] = T.Cast(dtype, acc[0])

    name = f"linear_heads_{dtype}"
    return Kernel(finalize(func, name), name, {})
