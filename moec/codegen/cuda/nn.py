"""CUDA kernels for whole transformer models (moec/ir/nn_ops.py): embedding gather, positions,
cos/sin, data movement (permute, slice, concat, broadcast) and fused causal attention with
grouped-query heads. Same builders, signatures and `Kernel` results as moec.codegen.kernels.nn
(and, for generation with a paged KV cache, as moec.codegen.kernels.attention:
`cache_write`, `paged_attention`, `MAX_SPLITS`; paged_attention.py).

The gather, position and copy kernels are te definitions (`define_*`, which also build for the
CPU) under the injective schedule of elementwise.py: one element per thread, 256 threads per
block. `attention` is hand-written TIR, flash-attention style (flash_attention.py).
"""

from __future__ import annotations

from collections.abc import Sequence

from tvm import te, tirx

from moec.codegen.cuda.base import FLOATS, Dim, Kernel, Shapes, cast, check_dtype, f32, finalize
from moec.codegen.cuda.elementwise import _bcast_index, schedule_injective
from moec.codegen.cuda.flash_attention import attention
from moec.codegen.cuda.paged_attention import MAX_SPLITS, cache_write, paged_attention
from moec.errors import CodegenError

__all__ = ["MAX_SPLITS", "arange", "attention", "broadcast_to", "cache_write", "concat2",
           "embedding", "paged_attention", "permute_dims", "slice_axis", "unary_trig"]

COPY_DTYPES = (*FLOATS, "int32", "int64")


def _axis(axis: int, rank: int, op: str) -> int:
    if not -rank <= axis < rank:
        raise CodegenError(f"{op}: axis {axis} out of range for rank {rank}")
    return axis % rank


def _injective(func: tirx.PrimFunc, name: str) -> Kernel:
    return Kernel(finalize(schedule_injective(func), name), name, {})


# --------------------------------------------------------------------------- pointwise, copies


def define_unary_trig(op: str, shape: Sequence[Dim], dtype: str = "float32") -> tirx.PrimFunc:
    """Unscheduled te definition of `unary_trig`."""
    fn = {"cos": tirx.cos, "sin": tirx.sin}.get(op)
    if fn is None:
        raise CodegenError(f"unary_trig: op must be cos or sin, got {op!r}")
    check_dtype(dtype, FLOATS)
    x = te.placeholder(Shapes().shape(shape), dtype, name="x")
    y = te.compute(x.shape, lambda *i: cast(fn(f32(x(*i))), dtype), name="y")
    return te.create_prim_func([x, y])


def unary_trig(op: str, shape: Sequence[Dim], dtype: str = "float32") -> Kernel:
    """`y = cos(x)` or `sin(x)` in float32 (accurate cosf/sinf: no fast math). Args `(x, y)`."""
    return _injective(define_unary_trig(op, shape, dtype), f"{op}_{dtype}")


def define_broadcast_to(in_shape: Sequence[Dim], out_shape: Sequence[Dim],
                        dtype: str = "float32") -> tirx.PrimFunc:
    """Unscheduled te definition of `broadcast_to`."""
    check_dtype(dtype, COPY_DTYPES)
    if len(in_shape) != len(out_shape):
        raise CodegenError(f"broadcast_to: {tuple(in_shape)} -> {tuple(out_shape)} changes rank")
    sh = Shapes()
    x = te.placeholder(sh.shape(in_shape), dtype, name="x")
    y = te.compute(sh.shape(out_shape), lambda *i: x(*_bcast_index(in_shape, out_shape, i)),
                   name="y")
    return te.create_prim_func([x, y])


def broadcast_to(in_shape: Sequence[Dim], out_shape: Sequence[Dim],
                 dtype: str = "float32") -> Kernel:
    """Size-1 dims of x repeated to `out_shape`. Kernel args: `(x, y)`."""
    return _injective(define_broadcast_to(in_shape, out_shape, dtype), f"broadcast_{dtype}")


def define_permute_dims(in_shape: Sequence[Dim], perm: Sequence[int],
                        dtype: str = "float32") -> tirx.PrimFunc:
    """Unscheduled te definition of `permute_dims`."""
    check_dtype(dtype, COPY_DTYPES)
    perm = [int(p) for p in perm]
    if sorted(perm) != list(range(len(in_shape))):
        raise CodegenError(f"permute_dims: {perm} is not a permutation of {len(in_shape)} axes")
    sh = Shapes()
    x = te.placeholder(sh.shape(in_shape), dtype, name="x")
    inv = [perm.index(a) for a in range(len(perm))]  # output axis holding input axis a
    y = te.compute([x.shape[p] for p in perm], lambda *i: x(*[i[inv[a]] for a in range(len(inv))]),
                   name="y")
    return te.create_prim_func([x, y])


def permute_dims(in_shape: Sequence[Dim], perm: Sequence[int], dtype: str = "float32") -> Kernel:
    """`y = x.transpose(perm)`, materialised. Kernel args: `(x, y)`. Threads run along y, so
    writes are coalesced, and reads too when the last axis stays last (the usual head split
    [B, T, H, D] -> [B, H, T, D])."""
    return _injective(define_permute_dims(in_shape, perm, dtype), f"permute_dims_{dtype}")


def define_slice_axis(in_shape: Sequence[Dim], out_shape: Sequence[Dim], axis: int, start: int,
                      step: int, dtype: str = "float32") -> tirx.PrimFunc:
    """Unscheduled te definition of `slice_axis`."""
    check_dtype(dtype, COPY_DTYPES)
    ax = _axis(axis, len(in_shape), "slice_axis")
    if start < 0 or step < 1 or len(out_shape) != len(in_shape):
        raise CodegenError(f"slice_axis: start={start}, step={step}, {tuple(in_shape)} -> "
                           f"{tuple(out_shape)}")
    sh = Shapes()
    x = te.placeholder(sh.shape(in_shape), dtype, name="x")

    def body(*i):
        idx = list(i)
        idx[ax] = tirx.const(start, "int64") + i[ax] * tirx.const(step, "int64")
        return x(*idx)

    y = te.compute(sh.shape(out_shape), body, name="y")
    return te.create_prim_func([x, y])


def slice_axis(in_shape: Sequence[Dim], out_shape: Sequence[Dim], axis: int, start: int,
               step: int, dtype: str = "float32") -> Kernel:
    """`y = x[start::step]` along `axis` (the length is `out_shape[axis]`). Args: `(x, y)`."""
    return _injective(define_slice_axis(in_shape, out_shape, axis, start, step, dtype),
                      f"slice_{dtype}")


def define_concat2(shape_a: Sequence[Dim], shape_b: Sequence[Dim], axis: int,
                   dtype: str = "float32") -> tirx.PrimFunc:
    """Unscheduled te definition of `concat2`."""
    check_dtype(dtype, COPY_DTYPES)
    ax = _axis(axis, len(shape_a), "concat")
    if len(shape_b) != len(shape_a):
        raise CodegenError(f"concat: ranks of {tuple(shape_a)} and {tuple(shape_b)} differ")
    sh = Shapes()
    a = te.placeholder(sh.shape(shape_a), dtype, name="a")
    b = te.placeholder(sh.shape(shape_b), dtype, name="b")
    na = a.shape[ax]
    out = list(a.shape)
    out[ax] = na + b.shape[ax]

    def body(*i):
        ia, ib = list(i), list(i)
        # clamped, so neither side is ever indexed out of its bounds
        ia[ax] = tirx.min(i[ax], na - 1)
        ib[ax] = tirx.max(i[ax] - na, tirx.const(0, "int64"))
        return tirx.if_then_else(i[ax] < na, a(*ia), b(*ib))

    y = te.compute(out, body, name="y")
    return te.create_prim_func([a, b, y])


def concat2(shape_a: Sequence[Dim], shape_b: Sequence[Dim], axis: int,
            dtype: str = "float32") -> Kernel:
    """`y = concat([a, b], axis)`. Kernel args: `(a, b, y)`."""
    return _injective(define_concat2(shape_a, shape_b, axis, dtype), f"concat_{dtype}")


def define_embedding(V: Dim, H: int, ids_shape: Sequence[Dim], dtype: str = "float32",
                     id_dtype: str = "int64") -> tirx.PrimFunc:
    """Unscheduled te definition of `embedding`."""
    check_dtype(dtype, COPY_DTYPES)
    check_dtype(id_dtype, ("int32", "int64"))
    if (isinstance(V, int) and V < 1) or H < 1:
        raise CodegenError(f"embedding: table [{V}, {H}] is empty")
    sh = Shapes()
    w = te.placeholder((sh.dim(V), sh.dim(H)), dtype, name="w")
    ids = te.placeholder(sh.shape(ids_shape), id_dtype, name="ids")

    def body(*i):
        r = tirx.max(tirx.min(cast(ids(*i[:-1]), "int64"), w.shape[0] - 1),
                     tirx.const(0, "int64"))
        return w[r, i[-1]]

    y = te.compute((*ids.shape, sh.dim(H)), body, name="y")
    return te.create_prim_func([w, ids, y])


def embedding(V: Dim, H: int, ids_shape: Sequence[Dim], dtype: str = "float32",
              id_dtype: str = "int64") -> Kernel:
    """`y[..., :] = w[ids[...], :]`. Kernel args: `(w [V, H], ids, y [..., H])`. Ids outside
    [0, V) are clamped (never an out-of-bounds read). V may be symbolic (rows of an activation:
    the hidden states of the rows whose logits a generation step returns)."""
    return _injective(define_embedding(V, H, ids_shape, dtype, id_dtype),
                      f"embedding_{dtype}_{id_dtype}")


def define_arange(like_shape: Sequence[Dim], axis: int, dtype: str = "int64",
                  like_dtype: str = "int64") -> tirx.PrimFunc:
    """Unscheduled te definition of `arange` (the operand is only read for its shape)."""
    check_dtype(dtype, ("int32", "int64"))
    ax = _axis(axis, len(like_shape), "arange")
    like = te.placeholder(Shapes().shape(like_shape), like_dtype, name="like")
    y = te.compute((like.shape[ax],), lambda i: cast(i, dtype), name="y")
    return te.create_prim_func([like, y])


def arange(like_shape: Sequence[Dim], axis: int, dtype: str = "int64",
           like_dtype: str = "int64") -> Kernel:
    """`y = [0, 1, ..., n-1]`, n = dim `axis` of the operand. Kernel args: `(like, y)`."""
    return _injective(define_arange(like_shape, axis, dtype, like_dtype), f"arange_{dtype}")
