"""Row-wise CUDA kernels: softmax, sum/mean, rmsnorm and layernorm.

Each output row (all dims but the reduced axis) is one thread block; the reduced axis is
strided over the block's threads, and TVM lowers the reductions to warp shuffles plus a shared
staging buffer. Statistics are float32 whatever the tensor dtype (as the reference)."""

from __future__ import annotations

from collections.abc import Sequence

from tvm import s_tir, te, tirx

from moec.codegen.cuda.base import FLOATS, Dim, Kernel, Shapes, cast, check_dtype, f32, finalize
from moec.errors import CodegenError


def threads_for(n: int | None) -> int:
    """Threads per block for a reduction of length n (None: symbolic): 32 to 256."""
    if n is None:
        return 256
    t = 32
    while t < n and t < 256:
        t *= 2
    return t


def _axis(axis: int, rank: int) -> int:
    if not -rank <= axis < rank:
        raise CodegenError(f"axis {axis} out of range for rank {rank}")
    return axis % rank


def _with(idx: Sequence, ax: int, k) -> list:
    """Index of the full tensor from an index without the reduced axis."""
    return list(idx[:ax]) + [k] + list(idx[ax:])


def _without(idx: Sequence, ax: int) -> list:
    return [v for j, v in enumerate(idx) if j != ax]


def schedule_rows(func: tirx.PrimFunc, out: str, ax: int | None, stats: Sequence[str],
                  nt: int) -> tirx.PrimFunc:
    """Block per row of the elementwise block `out`, whose loop `ax` runs along the reduced
    axis (None: `out` has one element per row, as for sum/mean).

    The row statistics `stats` (reduction blocks, in dependence order) are computed inside the
    row loop with the reduction spread over `nt` threads (TVM's cross-thread allreduce)."""
    sch = s_tir.Schedule(func)
    blk = sch.get_sblock(out)
    loops = sch.get_loops(blk)
    spatial = [lp for j, lp in enumerate(loops) if j != ax]
    extents = [sch.get(lp).extent for lp in spatial]
    if sum(not (isinstance(e, tirx.IntImm) and e.value == 1) for e in extents) > 1:
        # TVM lowered the cross-thread reduction over a row made of several fused loops as a
        # racy shared-memory update (or failed to place its barriers); the lowerer hands
        # these kernels a [rows, n] view instead (moec.codegen.lower_nn.lower_rows_2d)
        raise CodegenError(f"block-per-row reduction over rows of {len(spatial)} dims: "
                           f"reduce a [rows, n] view of the tensor")
    if ax is not None:
        sch.reorder(*spatial, loops[ax])
    row = sch.fuse(*spatial) if spatial else sch.add_unit_loop(blk)
    sch.bind(row, "blockIdx.x")
    # A row of one element gets a unit loop, so that the split's predicate leaves it to thread 0.
    inner = loops[ax] if ax is not None else sch.add_unit_loop(blk)
    _, tx = sch.split(inner, [None, nt])
    sch.bind(tx, "threadIdx.x")
    for name in reversed(stats):
        st = sch.get_sblock(name)
        sch.set_scope(st, 0, "shared")  # before compute_at (TVM_NOTES §7.3): one per block
        sch.compute_at(st, row)
        _, tx = sch.split(sch.get_loops(st)[-1], [None, nt])
        sch.bind(tx, "threadIdx.x")
    return sch.mod["main"]


def schedule_columns(func: tirx.PrimFunc, out: str, ax: int | None, stats: Sequence[str],
                     nt: int = 128) -> tirx.PrimFunc:
    """Thread per row, for reductions over a non-last axis (arguments as `schedule_rows`).

    Neighbouring threads then read neighbouring elements (the rows of a non-last axis are
    interleaved in memory), and each thread reduces its row serially in registers. TVM's
    cross-thread reduction is not used here: for these loop nests it silently produced racy
    code in our tests."""
    sch = s_tir.Schedule(func)
    blk = sch.get_sblock(out)
    loops = sch.get_loops(blk)
    spatial = [lp for j, lp in enumerate(loops) if j != ax]
    if ax is not None:
        sch.reorder(*spatial, loops[ax])
    row = sch.fuse(*spatial) if spatial else sch.add_unit_loop(blk)
    bx, tx = sch.split(row, [None, nt])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    for name in reversed(stats):
        st = sch.get_sblock(name)
        sch.set_scope(st, 0, "local")
        sch.compute_at(st, tx)
    return sch.mod["main"]


def _rows(func: tirx.PrimFunc, out: str, ax: int | None, last: bool, stats: Sequence[str],
          n) -> tirx.PrimFunc:
    """Block-per-row schedule when reducing the last axis over 32 or more elements,
    thread-per-row otherwise: a row shorter than a warp (Qwen3's per-head q/k RMSNorm over 16)
    is cheap to reduce serially, and splitting it over a warp's threads puts a `threadIdx.x < n`
    predicate around TVM's cross-thread reduction, which it cannot lower (and over exactly n
    threads TVM emitted a racy shared-memory update instead of a reduction)."""
    if last and (n is None or n >= 32):
        return schedule_rows(func, out, ax, stats, threads_for(n))
    return schedule_columns(func, out, ax, stats)


def _n(d: Dim) -> int | None:
    return d if isinstance(d, int) else None


def define_softmax(shape: Sequence[Dim], axis: int, dtype: str) -> tirx.PrimFunc:
    """Unscheduled te definition of `softmax` (tests run it on the CPU)."""
    check_dtype(dtype, FLOATS)
    sh = Shapes()
    full = sh.shape(shape)
    ax = _axis(axis, len(full))
    n = full[ax]
    x = te.placeholder(full, dtype, name="x")
    rest = _without(full, ax)
    k1 = te.reduce_axis((0, n), "k1")
    k2 = te.reduce_axis((0, n), "k2")
    mx = te.compute(rest, lambda *i: te.max(f32(x(*_with(i, ax, k1))), axis=k1), name="mx")
    sm = te.compute(rest, lambda *i: te.sum(
        tirx.exp(f32(x(*_with(i, ax, k2))) - mx(*i)), axis=k2), name="sm")
    y = te.compute(full, lambda *i: cast(
        tirx.exp(f32(x(*i)) - mx(*_without(i, ax))) / sm(*_without(i, ax)), dtype), name="y")
    return te.create_prim_func([x, y])


def softmax(shape: Sequence[Dim], axis: int, dtype: str) -> Kernel:
    """softmax along `axis` in float32 (max-subtracted), cast back to dtype."""
    ax = _axis(axis, len(shape))
    func = _rows(define_softmax(shape, axis, dtype), "y", ax, ax == len(shape) - 1,
                 ["mx", "sm"], _n(shape[ax]))
    name = f"softmax_{dtype}"
    return Kernel(finalize(func, name), name, {})


def define_reduce(op: str, shape: Sequence[Dim], axis: int, keepdim: bool,
                  dtype: str) -> tirx.PrimFunc:
    """Unscheduled te definition of `reduce`."""
    check_dtype(dtype, FLOATS)
    if op not in ("sum", "mean"):
        raise CodegenError(f"reduce: unknown op {op!r}")
    sh = Shapes()
    full = sh.shape(shape)
    ax = _axis(axis, len(full))
    n = full[ax]
    x = te.placeholder(full, dtype, name="x")
    k = te.reduce_axis((0, n), "k")
    out_shape = list(full)
    if keepdim:
        out_shape[ax] = 1
    else:
        del out_shape[ax]

    def src(i):
        i = _without(i, ax) if keepdim else list(i)
        return f32(x(*_with(i, ax, k)))

    acc = te.compute(out_shape, lambda *i: te.sum(src(i), axis=k), name="acc")
    scale = tirx.const(1.0, "float32") / tirx.Cast("float32", n) if op == "mean" else None
    y = te.compute(out_shape, lambda *i: cast(acc(*i) * scale if scale is not None else acc(*i),
                                               dtype), name="y")
    return te.create_prim_func([x, y])


def reduce(op: str, shape: Sequence[Dim], axis: int, keepdim: bool, dtype: str) -> Kernel:
    """sum / mean along `axis` (float32 accumulation)."""
    ax = _axis(axis, len(shape))
    func = _rows(define_reduce(op, shape, axis, keepdim, dtype), "y", None,
                 ax == len(shape) - 1, ["acc"], _n(shape[ax]))
    name = f"{op}_{dtype}"
    return Kernel(finalize(func, name), name, {})


def define_norm(kind: str, shape: Sequence[Dim], eps: float, dtype: str) -> tirx.PrimFunc:
    """Unscheduled te definition of `rmsnorm` (operands x, w) or `layernorm` (x, w, b)."""
    check_dtype(dtype, FLOATS)
    sh = Shapes()
    full = sh.shape(shape)
    h = full[-1]
    rest = full[:-1]
    x = te.placeholder(full, dtype, name="x")
    w = te.placeholder((h,), dtype, name="w")
    inv_h = tirx.const(1.0, "float32") / tirx.Cast("float32", h)
    epsc = tirx.const(float(eps), "float32")
    if kind == "rmsnorm":
        k = te.reduce_axis((0, h), "k")
        ss = te.compute(rest, lambda *i: te.sum(f32(x(*i, k)) * f32(x(*i, k)), axis=k),
                        name="ss")
        y = te.compute(full, lambda *i: cast(
            f32(x(*i)) * tirx.rsqrt(ss(*i[:-1]) * inv_h + epsc) * f32(w(i[-1])), dtype),
            name="y")
        return te.create_prim_func([x, w, y])
    b = te.placeholder((h,), dtype, name="b")
    k1 = te.reduce_axis((0, h), "k1")
    k2 = te.reduce_axis((0, h), "k2")
    s1 = te.compute(rest, lambda *i: te.sum(f32(x(*i, k1)), axis=k1), name="s1")

    def dev(i, k):
        return f32(x(*i, k)) - s1(*i) * inv_h

    s2 = te.compute(rest, lambda *i: te.sum(dev(i, k2) * dev(i, k2), axis=k2), name="s2")
    y = te.compute(full, lambda *i: cast(
        dev(i[:-1], i[-1]) * tirx.rsqrt(s2(*i[:-1]) * inv_h + epsc) * f32(w(i[-1]))
        + f32(b(i[-1])), dtype), name="y")
    return te.create_prim_func([x, w, b, y])


def rmsnorm(shape: Sequence[Dim], eps: float, dtype: str) -> Kernel:
    """x / sqrt(mean(x^2) + eps) * w over the last axis; operands (x, w)."""
    func = _rows(define_norm("rmsnorm", shape, eps, dtype), "y", len(shape) - 1, True, ["ss"],
                 _n(shape[-1]))
    name = f"rmsnorm_{dtype}"
    return Kernel(finalize(func, name), name, {})


def layernorm(shape: Sequence[Dim], eps: float, dtype: str) -> Kernel:
    """(x - mean) / sqrt(var + eps) * w + b over the last axis (two-pass variance)."""
    func = _rows(define_norm("layernorm", shape, eps, dtype), "y", len(shape) - 1, True,
                 ["s1", "s2"], _n(shape[-1]))
    name = f"layernorm_{dtype}"
    return Kernel(finalize(func, name), name, {})
