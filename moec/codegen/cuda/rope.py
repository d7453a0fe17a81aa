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
