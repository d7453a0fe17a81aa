"""The grouped GEMM with weight-only quantised experts (`moe.grouped_matmul_q`), dequantising
inside the GEMM: weights stay int8 / packed int4 in memory and in the caches.

Same tile layout, tasks, row groups and padding rules as grouped_matmul.py (read it first). The
quantised weights, scales and zero points are packed offline into NR-wide panels like the fp32
ones (`[E, ceil(N/NR), K', NR]`, K' = K for int8, K/2 for int4, G groups for scales/zeros). The K
loop runs group by group: within a group the micro-kernel accumulates `x * (q - z)` (int8: `x *
q`, the zero point is 0) in registers, and the group's sum is scaled once by the group's scale
(int8: one group, the per-channel scale), so the dequantisation costs one convert (and for int4
a shift, a mask and a subtract) per weight element, and one multiply per group and column.

Decode path (grouped_matmul.py's, same `gemv_rows` rule): a tile of at most GEMV_ROWS rows is
computed a row at a time over the whole of K, group by group as above, with the task's PANELS
panels interleaved in one loop (a partial last panel block recomputes its last panel), so every
quantised panel is one contiguous stream and PANELS x (1 or 2) streams are in flight; padding
rows of group 0 get row 0's values. Measured on the 2-core Zen 3 VM, Qwen3-30B-A3B at 1 token,
fresh experts each call, group size 128 (both paths interleaved in one run, medians of 40-60
calls, GB/s of quantised weight bytes): int8 gate/up 13-14 -> 19-20, down 9.5 -> 15; int4 gate/up
4.5-5.3 -> 6-7.4, down 4.5 -> 6. Both stay under the ~30 GB/s the VM reads: the dequantising loop
(3 vector ops per 8 int8 weights, about 6 per 8 int4 ones) runs, weights in L2, at ~18 GB/s of
int8 and ~4.5 GB/s of int4 per core, so int4 is compute-bound and int8 about even with memory.
"""

from __future__ import annotations

from tvm.script import tirx as T

from moec.codegen.kernels import fmath
from moec.codegen.kernels.base import Dims, Kernel, check_dtype, finish, kernel_name
from moec.codegen.kernels.grouped_matmul import (
    ACTIVATIONS,
    GEMV_ROWS,
    PANELS,
    TileRows,
    alias,
    grouped_tiles,
)
from moec.codegen.kernels.linear import pack_nk
from moec.codegen.kernels.routing import check_positive
from moec.errors import CodegenError


def grouped_matmul_quant(
    E: int,
    N: int,
    K: int,
    block_m: int,
    top_k: int,
    gather: bool,
    activation: str = "none",
    bits: int = 8,
    group_size: int = 128,
    dtype: str = "float32",
    bias: bool = False,
    alpha: float = 1.702,
    limit: float = 7.0,
    offset: float = 1.0,
    gemv_rows: int | None = None,
) -> Kernel:
    """Kernel args: `(x, q, scale, [zero], [q2, scale2, [zero2]], [b], [b2], sorted_ids,
    tile_expert, out)`, the operand order of moe.grouped_matmul_q (zero points with bits=4 only;
    the second weight when the activation is gated). `arg_transforms` pack q, scales and zeros
    `[E, N, *]` into `[E, ceil(N/NR), *, NR]`. `gemv_rows` (default GEMV_ROWS, capped at MR and
    block_m - 1; 0 turns it off): tiles with at most this many rows take the decode path (module
    docstring)."""
    check_dtype("grouped_matmul_quant", dtype)
    check_positive("grouped_matmul_quant", E=E, N=N, K=K, block_m=block_m, top_k=top_k)
    if activation not in ACTIVATIONS:
        raise CodegenError(f"grouped_matmul_quant: activation {activation!r} not in "
                           f"{ACTIVATIONS}")
    if bits not in (8, 4) or (bits == 4 and (K % 2 or group_size % 2)):
        raise CodegenError(f"grouped_matmul_quant: bits={bits}, K={K}, group_size="
                           f"{group_size}: want 8, or 4 with even K and group size")
    gated = activation.endswith("_mul")
    clamped = activation == "clamped_swiglu_mul"
    bias2 = bias and gated
    int4 = bits == 4
    act = fmath.activation("none" if clamped else activation.removesuffix("_mul"))
    mr, nr = grouped_tiles(dtype, block_m, gated)
    gs = min(group_size, K)  # int8 per output channel: one group of K
    ng_k = -(-K // gs)  # K groups
    kq = K // 2 if int4 else K
    qdt = "uint8" if int4 else "int8"
    nb, full_nb = -(-N // nr), N // nr
    pb = min(PANELS, nb)  # panels per task: a row group's x is reused from L1 for each
    npb = -(-nb // pb)
    explicit_gemv = gemv_rows is not None
    gemv_rows = min(GEMV_ROWS if gemv_rows is None else gemv_rows, mr, block_m - 1)
    gemv = gemv_rows > 0
    ng = -(-block_m // mr)
    nw = 2 if gated else 1
    dims = Dims()
    tl = dims.var("TL")
    s = tl * block_m
    t = dims.var("T") if gather else None
    x_rows = t if gather else s
    name = kernel_name("grouped_matmul_q", bits, dtype, "E", E, "N", N, "K", K, "g", gs, "bm",
                       block_m, "k", top_k, "gather" if gather else "", activation,
                       "bias" if bias else "", f"a{alpha}_l{limit}" if clamped else "",
                       f"o{offset}" if clamped and offset != 1.0 else "",
                       f"gv{gemv_rows}" if explicit_gemv else "")

    layout = TileRows(block_m, mr, top_k, gather, t)
    row, valid, source, sentinel_of = layout.row, layout.valid, layout.source, layout.sentinel

    def glen(kg):
        return gs if K % gs == 0 else T.min(gs, K - kg * gs)

    def deq(q, z, e, p, kq_idx, kg, j, shift):
        v = q[e, p, kq_idx, j]
        if int4:
            v = T.bitwise_and(T.shift_right(v, T.uint8(shift)), T.uint8(15))
            return T.Cast("float32", v) - z[e, p, kg, j]
        return T.Cast("float32", v)

    def epilogue(ct, gi, j, e, col, b, b2):
        g = ct[gi, 0, j] + b[e, col] if bias else ct[gi, 0, j]
        if not gated:
            return act(g)
        u = ct[gi, 1, j] + b2[e, col] if bias else ct[gi, 1, j]
        return fmath.clamped_swiglu(g, u, alpha, limit, offset) if clamped else act(g) * u

    @T.prim_func
    def func(x: T.handle, q: T.handle, sc: T.handle, zp: T.handle, q2: T.handle, sc2: T.handle,
             zp2: T.handle, b: T.handle, b2: T.handle, sorted_ids: T.handle,
             tile_expert: T.handle, out: T.handle):
        X = T.match_buffer(x, (x_rows, K), dtype)
        Q = T.match_buffer(q, (E, nb, kq, nr), qdt)
        S1 = T.match_buffer(sc, (E, nb, ng_k, nr), "float32")
        Z1 = T.match_buffer(zp, (E, nb, ng_k, nr), "float32")
        Q2 = T.match_buffer(q2, (E, nb, kq, nr), qdt)
        S2 = T.match_buffer(sc2, (E, nb, ng_k, nr), "float32")
        Z2 = T.match_buffer(zp2, (E, nb, ng_k, nr), "float32")
        B1 = T.match_buffer(b, (E, N), dtype)
        B2 = T.match_buffer(b2, (E, N), dtype)
        SI = T.match_buffer(sorted_ids, (s,), "int32")
        TE = T.match_buffer(tile_expert, (tl,), "int32")
        Y = T.match_buffer(out, (s, N), dtype)
        Zb = T.decl_buffer((E, nb, ng_k, nr), "float32", data=alias(int4, Z1, S1).data)
        Qb2 = T.decl_buffer((E, nb, kq, nr), qdt, data=alias(gated, Q2, Q).data)
        Sb2 = T.decl_buffer((E, nb, ng_k, nr), "float32", data=alias(gated, S2, S1).data)
        Zb2 = T.decl_buffer((E, nb, ng_k, nr), "float32",
                            data=alias(gated and int4, Z2, S1).data)
        Bb = T.decl_buffer((E, N), dtype, data=alias(bias, B1, Y).data)
        Bb2 = T.decl_buffer((E, N), dtype, data=alias(bias2, B2, Y).data)
        sentinel: T.let = sentinel_of(SI, s)
        for task in T.parallel(npb * tl):
            pblk: T.let = task // tl
            tile: T.let = task % tl
            if TE[tile] >= 0 and TE[tile] < E:
                ctile = T.alloc_buffer((ng * mr, nw, nr), "float32")
                acc = T.alloc_buffer((mr, nr), "float32")
                acc2 = T.alloc_buffer((mr, nr), "float32")
                src = T.alloc_buffer((mr,), "int64")
                vacc = T.alloc_buffer((pb, nw, nr), "float32")
                vout = T.alloc_buffer((pb, nw, nr), "float32")
                if gemv and not valid(SI[tile * block_m + gemv_rows], sentinel):
                    # At most gemv_rows rows (decode): one row at a time over the whole of K,
                    # group by group, the task's panels interleaved (a partial last panel block
                    # recomputes the last panel), so that each weight panel is one contiguous
                    # stream and pb*nw streams are in flight.
                    ex: T.let = TE[tile]
                    for i in range(gemv_rows):
                        if valid(SI[tile * block_m + i], sentinel):
                            xr: T.let = source(SI, tile, 0, i, sentinel)
                            for q in T.unroll(pb):
                                for j in T.vectorized(nr):
                                    vout[q, 0, j] = T.float32(0)
                                    if gated:
                                        vout[q, 1, j] = T.float32(0)
                            for kg in range(ng_k):
                                for q in T.unroll(pb):
                                    for j in T.vectorized(nr):
                                        vacc[q, 0, j] = T.float32(0)
                                        if gated:
                                            vacc[q, 1, j] = T.float32(0)
                                if int4:
                                    for kk in range(glen(kg) // 2):
                                        for h in T.unroll(2):
                                            for q in T.unroll(pb):
                                                for j in T.vectorized(nr):
                                                    vacc[q, 0, j] = vacc[q, 0, j] + X[
                                                        xr, kg * gs + 2 * kk + h] * deq(
                                                        Q, Zb, ex, T.min(pblk * pb + q, nb - 1),
                                                        kg * (gs // 2) + kk, kg, j, 4 * h)
                                                    if gated:
                                                        vacc[q, 1, j] = vacc[q, 1, j] + X[
                                                            xr, kg * gs + 2 * kk + h] * deq(
                                                            Qb2, Zb2, ex,
                                                            T.min(pblk * pb + q, nb - 1),
                                                            kg * (gs // 2) + kk, kg, j, 4 * h)
                                else:
                                    for kk in range(glen(kg)):
                                        for q in T.unroll(pb):
                                            for j in T.vectorized(nr):
                                                vacc[q, 0, j] = vacc[q, 0, j] + X[
                                                    xr, kg * gs + kk] * deq(
                                                    Q, Zb, ex, T.min(pblk * pb + q, nb - 1),
                                                    kg * gs + kk, kg, j, 0)
                                                if gated:
                                                    vacc[q, 1, j] = vacc[q, 1, j] + X[
                                                        xr, kg * gs + kk] * deq(
                                                        Qb2, Zb2, ex, T.min(pblk * pb + q, nb - 1),
                                                        kg * gs + kk, kg, j, 0)
                                for q in T.unroll(pb):
                                    for j in T.vectorized(nr):
                                        vout[q, 0, j] = vout[q, 0, j] + vacc[q, 0, j] * S1[
                                            ex, T.min(pblk * pb + q, nb - 1), kg, j]
                                        if gated:
                                            vout[q, 1, j] = vout[q, 1, j] + vacc[q, 1, j] * Sb2[
                                                ex, T.min(pblk * pb + q, nb - 1), kg, j]
                            # Row i; row 0 also goes to the padding rows of group 0 (they repeat
                            # the group's first row, as in the GEMM path).
                            for i2 in range(mr):
                                if i2 == i or (i == 0 and not valid(SI[row(tile, 0, i2)],
                                                                    sentinel)):
                                    for q in range(pb):
                                        p: T.let = pblk * pb + q
                                        if p < nb:
                                            if full_nb == nb:
                                                for j in T.vectorized(nr):
                                                    Y[row(tile, 0, i2), p * nr + j] = epilogue(
                                                        vout, q, j, ex, p * nr + j, Bb, Bb2)
                                            else:
                                                if p < full_nb:
                                                    for j in T.vectorized(nr):
                                                        Y[row(tile, 0, i2), p * nr + j] = (
                                                            epilogue(vout, q, j, ex, p * nr + j,
                                                                     Bb, Bb2))
                                                else:
                                                    for j in range(N - full_nb * nr):
                                                        Y[row(tile, 0, i2), p * nr + j] = (
                                                            epilogue(vout, q, j, ex, p * nr + j,
                                                                     Bb, Bb2))
                else:
                    for g in range(ng):
                        for q in range(pb):
                            p: T.let = pblk * pb + q
                            ex: T.let = TE[tile]
                            if p < nb:
                                if valid(SI[tile * block_m + g * mr], sentinel):
                                    for i in T.unroll(mr):
                                        src[i] = source(SI, tile, g, i, sentinel)
                                        for j in T.vectorized(nr):
                                            ctile[g * mr + i, 0, j] = T.float32(0)
                                            if gated:
                                                ctile[g * mr + i, 1, j] = T.float32(0)
                                    for kg in range(ng_k):
                                        for i in T.unroll(mr):
                                            for j in T.vectorized(nr):
                                                acc[i, j] = T.float32(0)
                                                if gated:
                                                    acc2[i, j] = T.float32(0)
                                        if int4:
                                            for kk in range(glen(kg) // 2):
                                                for h in T.unroll(2):
                                                    for i in T.unroll(mr):
                                                        for j in T.vectorized(nr):
                                                            acc[i, j] = acc[i, j] + X[
                                                                src[i], kg * gs + 2 * kk + h
                                                            ] * deq(Q, Zb, ex, p,
                                                                    kg * (gs // 2) + kk, kg, j,
                                                                    4 * h)
                                                            if gated:
                                                                acc2[i, j] = acc2[i, j] + X[
                                                                    src[i], kg * gs + 2 * kk + h
                                                                ] * deq(Qb2, Zb2, ex, p,
                                                                        kg * (gs // 2) + kk, kg,
                                                                        j, 4 * h)
                                        else:
                                            for kk in range(glen(kg)):
                                                for i in T.unroll(mr):
                                                    for j in T.vectorized(nr):
                                                        acc[i, j] = acc[i, j] + X[
                                                            src[i], kg * gs + kk] * deq(
                                                            Q, Zb, ex, p, kg * gs + kk, kg, j, 0)
                                                        if gated:
                                                            acc2[i, j] = acc2[i, j] + X[
                                                                src[i], kg * gs + kk] * deq(
                                                                Qb2, Zb2, ex, p, kg * gs + kk, kg,
                                                                j, 0)
                                        for i in T.unroll(mr):
                                            for j in T.vectorized(nr):
                                                ctile[g * mr + i, 0, j] = ctile[
                                                    g * mr + i, 0, j] + acc[
                                                    i, j] * S1[ex, p, kg, j]
                                                if gated:
                                                    ctile[g * mr + i, 1, j] = ctile[
                                                        g * mr + i, 1, j] + acc2[
                                                        i, j] * Sb2[ex, p, kg, j]
                                    for i in T.unroll(mr):
                                        if full_nb == nb:
                                            for j in T.vectorized(nr):
                                                Y[row(tile, g, i), p * nr + j] = epilogue(
                                                    ctile, g * mr + i, j, ex, p * nr + j, Bb,
                                                    Bb2)
                                        else:
                                            if p < full_nb:
                                                for j in T.vectorized(nr):
                                                    Y[row(tile, g, i), p * nr + j] = epilogue(
                                                        ctile, g * mr + i, j, ex, p * nr + j,
                                                        Bb, Bb2)
                                            else:
                                                for j in range(N - full_nb * nr):
                                                    Y[row(tile, g, i), p * nr + j] = epilogue(
                                                        ctile, g * mr + i, j, ex, p * nr + j,
                                                        Bb, Bb2)

    per = 3 if int4 else 2
    transforms = {}
    for w in range(nw):
        for part in range(per):
            transforms[1 + w * per + part] = lambda a: pack_nk(a, nr)
    drop = [n for n, used in (("Z1", int4), ("Q2", gated), ("S2", gated),
                              ("Z2", gated and int4), ("B1", bias), ("B2", bias2)) if not used]
    return finish(func, name, drop=drop, arg_transforms=transforms)
