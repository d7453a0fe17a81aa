"""MoE routing kernels around the grouped GEMM: align (sort slots by expert), permute (gather
token rows into the sorted layout) and combine (weighted sum of each token's expert rows).

Layout (docs/ops.md, "moe dialect"): slot s = t*k + j; `align` sorts the T*k slots by expert,
stable, padding each expert's run to a multiple of block_m. TL = (T*k)//block_m + E tiles and
S = TL*block_m rows are static upper bounds, written here as int64 expressions of T; padding rows
and rows of unused tiles hold the sentinel T*k, unused tiles have tile_expert = -1.

Two invariants of this layout that the grouped GEMM relies on: the first row of a used tile is
never padding (a tile is only opened for a non-empty run), and the last row `S-1` is always the
sentinel (if every tile were used, every expert's run would end with padding, else the tile sum
would be below TL).
"""

from __future__ import annotations

from tvm.script import tirx as T

from moec.codegen.kernels.base import (
    FLOAT_DTYPES,
    Dims,
    Kernel,
    check_dtype,
    finish,
    i64,
    kernel_name,
    par_min,
    vector_lanes,
)
from moec.errors import CodegenError


def align_sizes(tokens, k: int, num_experts: int, block_m: int):
    """(TL, S) for `tokens` rows: TL = (tokens*k)//block_m + E tiles, S = TL*block_m rows.
    Works on ints and on int64 expressions alike."""
    tl = tokens * k // block_m + num_experts
    return tl, tl * block_m


def check_positive(builder: str, **values: object) -> None:
    """Raise CodegenError unless every value is an int >= 1."""
    for label, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise CodegenError(f"{builder}: {label}={v!r} must be an int >= 1")


def align(E: int, k: int, block_m: int, identity: bool = False) -> Kernel:
    """Counting sort of routing slots by expert. Kernel args:
    `(ids i32[T, k], sorted_ids i32[S], tile_expert i32[TL], slot_row i32[T, k])`.

    Expert ids outside [0, E) are clamped into it (such a slot is computed by expert 0 or E-1);
    clamping keeps every slot in the layout and every write in bounds. With `identity` (identity
    experts after the E FFN experts), slots with ids >= E are left out instead: slot_row -1.
    Serial: the work is O(T*k + S) integer steps, microseconds next to the expert GEMMs."""
    check_positive("align", E=E, k=k, block_m=block_m)
    dims = Dims()
    t = dims.var("T")
    tk = t * k
    tl, s = align_sizes(t, k, E, block_m)
    name = kernel_name("align", "E", E, "k", k, "bm", block_m, "id" if identity else "")

    def expert(v):
        return T.max(T.min(v, E - 1), 0)

    def placed(v):
        return v < E if identity else True  # a Python bool: the branch is resolved statically

    @T.prim_func
    def func(ids: T.handle, sorted_ids: T.handle, tile_expert: T.handle, slot_row: T.handle):
        IDS = T.match_buffer(ids, (t, k), "int32")
        SI = T.match_buffer(sorted_ids, (s,), "int32")
        TE = T.match_buffer(tile_expert, (tl,), "int32")
        SR = T.match_buffer(slot_row, (t, k), "int32")
        IDf = T.decl_buffer((tk,), "int32", data=IDS.data)
        SRf = T.decl_buffer((tk,), "int32", data=SR.data)
        count = T.alloc_buffer((E,), "int32")
        pos = T.alloc_buffer((E,), "int32")  # next free row of each expert's run
        first = T.alloc_buffer((E + 1,), "int32")  # first tile of each expert
        for e in range(E):
            count[e] = 0
        for i in range(tk):
            if placed(IDf[i]):
                count[expert(IDf[i])] = count[expert(IDf[i])] + 1
        first[0] = 0
        for e in range(E):
            first[e + 1] = first[e] + (count[e] + (block_m - 1)) // block_m
            pos[e] = first[e] * block_m
        for r in range(s):
            SI[r] = T.Cast("int32", tk)
        for i in range(tl):
            TE[i] = -1
        for e in range(E):
            for i in range(first[e + 1] - first[e]):
                TE[first[e] + i] = e
        # Increasing slot order within an expert: the sort is stable.
        for i in range(tk):
            if placed(IDf[i]):
                SI[pos[expert(IDf[i])]] = T.Cast("int32", i)
                SRf[i] = pos[expert(IDf[i])]
                pos[expert(IDf[i])] = pos[expert(IDf[i])] + 1
            else:
                SRf[i] = -1

    return finish(func, name)


def permute(H: int, k: int, dtype: str = "float32") -> Kernel:
    """Gather token rows into the sorted layout: `xs[r] = x[sorted_ids[r] // k]`. Kernel args:
    `(x [T, H], sorted_ids i32[S], xs [S, H])`. Padding rows (sorted_ids outside [0, T*k)) are
    not written. S is its own symbolic size (bound from sorted_ids). Parallel over rows."""
    check_dtype("permute", dtype, FLOAT_DTYPES)
    check_positive("permute", H=H, k=k)
    dims = Dims()
    t, s = dims.var("T"), dims.var("S")
    vl = vector_lanes(dtype)
    name = kernel_name("permute", dtype, "H", H, "k", k)

    @T.prim_func
    def func(x: T.handle, sorted_ids: T.handle, xs: T.handle):
        X = T.match_buffer(x, (t, H), dtype)
        SI = T.match_buffer(sorted_ids, (s,), "int32")
        XS = T.match_buffer(xs, (s, H), dtype)
        for r in T.parallel(s):
            if SI[r] >= 0 and T.Cast("int64", SI[r]) < t * k:
                for v in range(H // vl):
                    for lane in T.vectorized(vl):
                        XS[r, v * vl + lane] = X[T.Cast("int64", SI[r]) // k, v * vl + lane]
                for j in range(H % vl):
                    XS[r, H // vl * vl + j] = X[T.Cast("int64", SI[r]) // k, H // vl * vl + j]

    return finish(func, name, min_parallel=par_min(H))


def capacity(E: int, k: int, cap: int, batched: bool = False) -> Kernel:
    """Token dropping (moe.router's `capacity`, Switch Transformers): each expert keeps its first
    `cap` slots in slot order t*k + j, the others get weight 0. Kernel args: `(weights f32[T, k],
    ids i32[T, k], out f32[T, k])`, or with `batched` `[B, T, k]` each, every sequence counting
    its own slots (a router on [B, S, H]); ids are clamped into [0, E). One sequential pass over
    the slots (the count of an expert depends on every earlier slot); T*k steps, tiny next to
    the router's GEMM."""
    check_positive("capacity", E=E, k=k, cap=cap)
    dims = Dims()
    t = dims.var("T")
    nb = dims.var("B") if batched else i64(1)
    shape = (nb, t, k) if batched else (t, k)
    n = t * k
    name = kernel_name("capacity", "seq" if batched else "", "E", E, "k", k, "c", cap)

    @T.prim_func
    def func(weights: T.handle, ids: T.handle, out: T.handle):
        WT = T.match_buffer(weights, shape, "float32")
        IDS = T.match_buffer(ids, shape, "int32")
        O = T.match_buffer(out, shape, "float32")
        wf = T.decl_buffer((nb * n,), "float32", data=WT.data)
        idf = T.decl_buffer((nb * n,), "int32", data=IDS.data)
        of = T.decl_buffer((nb * n,), "float32", data=O.data)
        count = T.alloc_buffer((E,), "int32")
        for b in range(nb):
            for e in range(E):
                count[e] = 0
            for s in range(n):
                e: T.let = T.max(T.min(idf[b * n + s], E - 1), 0)
                of[b * n + s] = T.Select(count[e] < cap, wf[b * n + s], T.float32(0))
                count[e] = count[e] + 1

    return finish(func, name)


def unpermute(H: int, k: int, dtype: str = "float32") -> Kernel:
    """Rows of the sorted layout back in token order, `out[t, j] = y[slot_row[t, j]]`
    (moe.unpermute, left when the routing weight scaled the expert input). Kernel args:
    `(y [S, H], slot_row i32[T, k], out [T, k, H])`; slot_row values are clamped into [0, S).
    Parallel over tokens, vectorised over H."""
    check_dtype("unpermute", dtype, FLOAT_DTYPES)
    check_positive("unpermute", H=H, k=k)
    dims = Dims()
    t, s = dims.var("T"), dims.var("S")
    vl = vector_lanes(dtype)
    name = kernel_name("unpermute", dtype, "H", H, "k", k)

    @T.prim_func
    def func(y: T.handle, slot_row: T.handle, out: T.handle):
        Y = T.match_buffer(y, (s, H), dtype)
        SR = T.match_buffer(slot_row, (t, k), "int32")
        O = T.match_buffer(out, (t, k, H), dtype)
        for tok in T.parallel(t):
            for j in range(k):
                src: T.let = T.Cast("int64", T.max(T.min(SR[tok, j], T.Cast("int32", s - i64(1))),
                                                   0))
                for v in range(H // vl):
                    for lane in T.vectorized(vl):
                        O[tok, j, v * vl + lane] = Y[src, v * vl + lane]
                for lane in range(H % vl):
                    O[tok, j, H // vl * vl + lane] = Y[src, H // vl * vl + lane]

    return finish(func, name, min_parallel=par_min(H * k))


def combine(H: int, k: int, dtype: str = "float32", identity: bool = False) -> Kernel:
    """`out[t] = sum_j weights[t, j] * y[slot_row[t, j]]`, summed in increasing j, in float32.
    Kernel args: `(y [S, H], weights f32[T, k], slot_row i32[T, k], out [T, H])`, with
    `identity` `(y, weights, slot_row, x [T, H], out)`: a slot whose slot_row is negative (an
    identity expert's) adds `weights[t, j] * x[t]`. slot_row values are clamped into [0, S) so
    a corrupt index cannot read out of bounds. Parallel over tokens, vectorised over H."""
    check_dtype("combine", dtype, FLOAT_DTYPES)
    check_positive("combine", H=H, k=k)
    dims = Dims()
    t, s = dims.var("T"), dims.var("S")
    vl = vector_lanes(dtype)
    name = kernel_name("combine", dtype, "H", H, "k", k, "id" if identity else "")

    def src(sr, tok, j):
        return T.Cast("int64", T.max(T.min(sr[tok, j], T.Cast("int32", s - i64(1))), 0))

    def wsum(y_buf, w_buf, sr, tok, col, x_buf=None):
        # Left fold from j = 0: ((w0*y0 + w1*y1) + w2*y2) ... as the spec orders the sum.
        acc = None
        for j in range(k):
            v = widen(y_buf[src(sr, tok, j), col])
            if x_buf is not None:
                v = T.Select(sr[tok, j] < 0, widen(x_buf[tok, col]), v)
            term = w_buf[tok, j] * v
            acc = term if acc is None else acc + term
        return acc if dtype == "float32" else T.Cast(dtype, acc)

    def widen(v):
        return v if dtype == "float32" else T.Cast("float32", v)

    @T.prim_func
    def func(y: T.handle, weights: T.handle, slot_row: T.handle, out: T.handle):
        Y = T.match_buffer(y, (s, H), dtype)
        W = T.match_buffer(weights, (t, k), "float32")
        SR = T.match_buffer(slot_row, (t, k), "int32")
        O = T.match_buffer(out, (t, H), dtype)
        for tok in T.parallel(t):
            for v in range(H // vl):
                for lane in T.vectorized(vl):
                    O[tok, v * vl + lane] = wsum(Y, W, SR, tok, v * vl + lane)
            for j in range(H % vl):
                O[tok, H // vl * vl + j] = wsum(Y, W, SR, tok, H // vl * vl + j)

    @T.prim_func
    def func_id(y: T.handle, weights: T.handle, slot_row: T.handle, x: T.handle, out: T.handle):
        Y = T.match_buffer(y, (s, H), dtype)
        W = T.match_buffer(weights, (t, k), "float32")
        SR = T.match_buffer(slot_row, (t, k), "int32")
        X = T.match_buffer(x, (t, H), dtype)
        O = T.match_buffer(out, (t, H), dtype)
        for tok in T.parallel(t):
            for v in range(H // vl):
                for lane in T.vectorized(vl):
                    O[tok, v * vl + lane] = wsum(Y, W, SR, tok, v * vl + lane, X)
            for j in range(H % vl):
                O[tok, H // vl * vl + j] = wsum(Y, W, SR, tok, H // vl * vl + j, X)

    if identity:
        return finish(func_id, name, min_parallel=par_min(H * k))

    return finish(func, name, min_parallel=par_min(H * k))
