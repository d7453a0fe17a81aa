"""The MoE grouped GEMM over the aligned tile layout (see routing.py for the layout).

`out[r] = act(w[e] @ v_r)` for every row r of a used tile, e = tile_expert[r // block_m], v_r =
x[sorted_ids[r] // top_k] (gather) or x[r]. Gated activations (`silu_mul`, `gelu_mul`) read a
second weight and compute `act(w[e] @ v) * (w2[e] @ v)` in the same pass over x.

Schedule: a task is (block of PANELS NR-column panels (PANELS_UNGATED without a second
weight), tile); tasks run in parallel, panel-major, so that the threads split the panels and
stay balanced even when only a few tiles are used (decode). Within a task, each K chunk of the
tile's x rows is reused for every panel of the block while it is in L1/L2.
Unused tiles (tile_expert outside [0, E)) return at once. A tile is processed in row groups of MR
rows; a group whose first row is padding is skipped (runs end with their padding, so the rest of
the group is padding too): at T=1 a tile costs one MR-row group, not block_m rows. Padding rows
inside a group are computed on a copy of the group's first row, so no index leaves x and no
garbage enters the registers. Micro-kernel: MR x NR accumulators (x2 when gated) in registers,
weights pre-packed into one-SIMD-vector panels (`arg_transforms`; an NR-wide micro-panel reads
NR/V adjacent ones: Qwen3-30B down at 512 tokens, NR=16, ran 3-8% faster than on NR-wide
panels, and the decode path keeps 8 streams), K cut into L1/L2-sized chunks.

Decode path: a tile of at most GEMV_ROWS rows (decode, or a wide expert count at a few tokens)
is memory-bound, and the MR-row micro-kernel reads its weights as one short K chunk of one panel
at a time. Such a tile is computed a row at a time over the whole of K with the task's panels
interleaved in one loop: every weight panel is a single contiguous stream and PANELS x (1 or 2)
streams are in flight. A pass over K takes as many panels as GEMV_ACC accumulator registers
allow (two-vector panels: half the task's panels per pass), so the tile width chosen for the
prefill GEMM does not spill the decode path. Measured on the 2-core Zen 3 VM at 1 token, fresh
experts each call (kernels interleaved in one run, medians of 40-60 calls): Qwen3-30B-A3B
gate/up 24 -> 33.5 GB/s, down 21 -> 29 GB/s; Mixtral-like gate/up 20 -> 30 GB/s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tvm import tirx
from tvm.script import tirx as T

from moec.codegen.kernels import fmath
from moec.codegen.kernels.base import (
    Dims,
    Kernel,
    check_dtype,
    check_weight_dtype,
    finish,
    i64,
    kernel_name,
    vector_lanes,
)
from moec.codegen.kernels.linear import k_blocking, pack_nk
from moec.codegen.kernels.routing import check_positive
from moec.errors import CodegenError

ACTIVATIONS = ("none", "silu", "gelu", "gelu_tanh", "relu", "relu2", "silu_mul", "gelu_mul",
               "gelu_tanh_mul", "relu_mul", "clamped_swiglu_mul")


PANELS = 4  # panels per task: x rows reused 4x from L1/L2 (Qwen3-30B layer at 2048 tokens,
# Zen 3: gate/up 819 -> 666 ms, down 531 -> 445 ms; decode no slower)
PANELS_UNGATED = 8  # one weight: twice the panels for the same decode accumulators (Qwen3-30B
# down, tiles (8, 8), interleaved runs on Zen 3: 1 token 28-31 -> 33-35 GB/s, 512 tokens +7-14%)


GEMV_ROWS = 2  # tiles of at most this many rows take the decode path (see grouped_matmul)
GEMV_ACC = 8  # SIMD accumulators (one-vector panels) of one decode pass: the 8 streams the
# one-vector tiles always had; AVX2's other 8 registers hold the weights and the broadcast x.
# (A 16-accumulator pass, tiles (4, 16) before one-vector packing, measured the same at 1 token
# once the caches were flushed between calls: Qwen3-30B down 1.74 ms against 1.78.)


def grouped_tiles(dtype: str, block_m: int, gated: bool) -> tuple[int, int]:
    """(MR, NR) of the micro-kernel: 4 rows (divides the usual power-of-two block_m), two SIMD
    vectors of columns, or one per weight when gated (AVX2: 8 accumulator registers)."""
    vl = vector_lanes(dtype)
    return min(4, block_m), (vl if gated else 2 * vl)


@dataclass(frozen=True)
class TileRows:
    """How both grouped GEMM kernels (fp32 and quantised) walk the rows of the aligned tile
    layout: row r of group g of a tile, whether a sorted id is a real slot, which x row a tile
    row reads, and the padding sentinel (see the module docstring)."""

    block_m: int
    mr: int
    top_k: int
    gather: bool
    t: Any  # the token count var when gathering

    def row(self, tile: Any, g: Any, i: Any) -> Any:
        r = tile * self.block_m + g * self.mr + i
        # Only when MR does not divide block_m can a group's rows spill into the next tile.
        if self.block_m % self.mr == 0:
            return r
        return T.min(r, tile * self.block_m + (self.block_m - 1))

    def valid(self, sid: Any, sentinel: Any) -> Any:
        return tirx.And(sid >= 0, T.Cast("int64", sid) < sentinel)

    def source(self, si: Any, tile: Any, g: Any, i: Any, sentinel: Any) -> Any:
        """x row of tile row (g, i); padding rows read the group's first row (no index leaves x,
        no garbage enters the registers)."""
        r0 = tile * self.block_m + g * self.mr
        ok = self.valid(si[self.row(tile, g, i)], sentinel)
        if self.gather:
            return T.Cast("int64", T.Select(ok, si[self.row(tile, g, i)], si[r0])) // self.top_k
        return T.Select(ok, self.row(tile, g, i), r0)

    def sentinel(self, si: Any, rows: Any) -> Any:
        """T*top_k from x's shape when gathering, else sorted_ids[S-1], which the align layout
        guarantees is padding; if_then_else evaluates only the taken side (no read at S = 0)."""
        if self.gather:
            return self.t * i64(self.top_k)
        return T.Cast("int64", T.if_then_else(rows > 0, si[rows - i64(1)], 0))


def alias(used: bool, buf: Any, fallback: Any) -> Any:
    """Optional operands are dropped from the signature when unused: the body then declares its
    view on `fallback` (and never reads it), so the dropped buffer has no use left."""
    return buf if used else fallback


def check_tiles(builder: str, dtype: str, tiles: tuple[int, int]) -> tuple[int, int]:
    mr, nr = (int(v) for v in tiles)
    vl = vector_lanes(dtype)
    if not (1 <= mr <= 8 and nr >= vl and nr % vl == 0 and nr <= 4 * vl):
        raise CodegenError(f"{builder}: tiles (MR, NR) = {tiles}: want 1 <= MR <= 8 and NR a "
                           f"multiple of the SIMD width {vl}, at most {4 * vl}")
    return mr, nr


def grouped_matmul(
    E: int,
    N: int,
    K: int,
    block_m: int,
    top_k: int,
    gather: bool,
    activation: str = "none",
    dtype: str = "float32",
    bias: bool = False,
    alpha: float = 1.702,
    limit: float = 7.0,
    offset: float = 1.0,
    tiles: tuple[int, int] | None = None,
    panels: int | None = None,
    gemv_rows: int | None = None,
    w_dtype: str | None = None,
) -> Kernel:
    """Grouped GEMM `moe.grouped_matmul`. Kernel args: `(x, w_packed, [w2_packed], [b], [b2],
    sorted_ids i32[S], tile_expert i32[TL], out [S, N])` with x `[T, K]` if `gather` else
    `[S, K]`, S = TL*block_m (TL symbolic, bound from tile_expert), biases `[E, N]`.

    `arg_transforms` pack w (and w2) `[E, N, K]` into one-vector panels `[E, ceil(N/V), K, V]`
    (V = SIMD lanes, whatever NR: an NR-wide micro-panel reads NR/V adjacent ones). activation:
    none, silu, gelu (erf form), gelu_tanh, relu, or `<act>_mul` (`act(w@v + b) * (w2@v + b2)`),
    or clamped_swiglu_mul (GPT-OSS, `alpha`, `limit`). Rows of padding and of unused tiles are
    left unwritten or hold values of no meaning (ops.md allows both). The padding sentinel
    T*top_k comes from x's shape when gathering, else from sorted_ids[S-1], which the align
    layout guarantees is padding. `tiles` = (MR, NR) overrides `grouped_tiles` (a tuning
    choice; NR a multiple of the SIMD width); a task computes `panels` NR-column panels of its
    tile, so the tile's rows of x are reused from cache that many times (default PANELS, or
    PANELS_UNGATED for one weight).
    `gemv_rows` (default GEMV_ROWS, capped at MR and block_m - 1; 0 turns it off): tiles with at
    most this many rows take the decode path (module docstring).
    `w_dtype` (default `dtype`): the dtype the weights are stored in; float16 / bfloat16
    weights under float32 activations are widened in registers as they are read (half the
    bytes of a float32 weight: decode reads half as much memory)."""
    check_dtype("grouped_matmul", dtype)
    w_dtype = check_weight_dtype("grouped_matmul", dtype, w_dtype)
    check_positive("grouped_matmul", E=E, N=N, K=K, block_m=block_m, top_k=top_k)
    if activation not in ACTIVATIONS:
        raise CodegenError(f"grouped_matmul: activation {activation!r} not in {ACTIVATIONS}")
    gated = activation.endswith("_mul")
    clamped = activation == "clamped_swiglu_mul"
    bias2 = bias and gated
    act = fmath.activation("none" if clamped else activation.removesuffix("_mul"))
    mr, nr = check_tiles("grouped_matmul", dtype, tiles) if tiles else grouped_tiles(
        dtype, block_m, gated)
    kc, nkc = k_blocking(K)
    k_tail = K - (nkc - 1) * kc
    nb, full_nb = -(-N // nr), N // nr
    pb = min(PANELS if gated else PANELS_UNGATED, nb) if panels is None else panels
    if not 1 <= pb <= nb:
        raise CodegenError(f"grouped_matmul: panels={panels} not in 1..{nb} (N={N}, NR={nr})")
    npb = -(-nb // pb)  # panel blocks
    # Weights are packed in one-vector panels whatever NR: an NR-wide micro-panel p is packed
    # panels p*nv .. p*nv+nv-1, and the decode path streams one-vector panels.
    vl = vector_lanes(dtype)
    nv, nbp = nr // vl, -(-N // vl)
    pbp = pb * nv  # packed panels of a task
    # decode path: packed panels per pass over K, so that its accumulators fit in the registers
    nw = 2 if gated else 1
    gp = max(1, min(pbp, GEMV_ACC // nw))
    npass = -(-pbp // gp)
    explicit_gemv = gemv_rows is not None
    gemv_rows = min(GEMV_ROWS if gemv_rows is None else gemv_rows, mr, block_m - 1)
    gemv = gemv_rows > 0
    ng = -(-block_m // mr)  # row groups per tile
    dims = Dims()
    tl = dims.var("TL")
    s = tl * block_m
    t = dims.var("T") if gather else None
    x_rows = t if gather else s
    name = kernel_name("grouped_matmul", dtype, "E", E, "N", N, "K", K, "bm", block_m, "k",
                       top_k, "gather" if gather else "", activation, "bias" if bias else "",
                       f"a{alpha}_l{limit}" if clamped else "",
                       f"o{offset}" if clamped and offset != 1.0 else "",
                       f"t{mr}x{nr}" if tiles else "", f"pb{pb}" if pb > 1 else "",
                       f"gv{gemv_rows}" if explicit_gemv else "",
                       f"w{w_dtype}" if w_dtype != dtype else "")

    layout = TileRows(block_m, mr, top_k, gather, t)
    row, valid, source, sentinel_of = layout.row, layout.valid, layout.source, layout.sentinel

    def packed(p, v):
        """Packed panel of vector v of micro-panel p (the last one repeats past N)."""
        return p if nv == 1 else T.min(p * nv + v, nbp - 1)

    def kc_len(kb):
        return kc if k_tail == kc else T.min(kc, K - kb * kc)

    def wide(v):
        """A weight element in the compute dtype."""
        return v if w_dtype == dtype else T.Cast(dtype, v)

    def epilogue(ct, q, gi, j, e, col, b, b2):
        g = ct[q, gi, 0, j] + b[e, col] if bias else ct[q, gi, 0, j]
        if not gated:
            return act(g)
        u = ct[q, gi, 1, j] + b2[e, col] if bias else ct[q, gi, 1, j]
        return fmath.clamped_swiglu(g, u, alpha, limit, offset) if clamped else act(g) * u

    @T.prim_func
    def func(x: T.handle, w: T.handle, w2: T.handle, b: T.handle, b2: T.handle,
             sorted_ids: T.handle, tile_expert: T.handle, out: T.handle):
        X = T.match_buffer(x, (x_rows, K), dtype)
        W = T.match_buffer(w, (E, nbp, K, vl), w_dtype)
        W2 = T.match_buffer(w2, (E, nbp, K, vl), w_dtype)
        B1 = T.match_buffer(b, (E, N), dtype)
        B2 = T.match_buffer(b2, (E, N), dtype)
        SI = T.match_buffer(sorted_ids, (s,), "int32")
        TE = T.match_buffer(tile_expert, (tl,), "int32")
        Y = T.match_buffer(out, (s, N), dtype)
        Wb = T.decl_buffer((E, nbp, K, vl), w_dtype, data=alias(gated, W2, W).data)
        Bb = T.decl_buffer((E, N), dtype, data=alias(bias, B1, Y).data)
        Bb2 = T.decl_buffer((E, N), dtype, data=alias(bias2, B2, Y).data)
        sentinel: T.let = sentinel_of(SI, s)
        for task in T.parallel(npb * tl):
            pblk: T.let = task // tl
            tile: T.let = task % tl
            if TE[tile] >= 0 and TE[tile] < E:
                ctile = T.alloc_buffer((pb, ng * mr, nw, nr), "float32")
                acc = T.alloc_buffer((mr, nr), "float32")
                acc2 = T.alloc_buffer((mr, nr), "float32")
                src = T.alloc_buffer((mr,), "int64")
                vacc = T.alloc_buffer((gp, nw, vl), "float32")
                if gemv and not valid(SI[tile * block_m + gemv_rows], sentinel):
                    # At most gemv_rows rows (decode): one row at a time over the whole of K,
                    # the task's panels interleaved, so that each weight panel is one
                    # contiguous stream and pb*nw streams are in flight.
                    for i in range(gemv_rows):
                        if valid(SI[tile * block_m + i], sentinel):
                            xr: T.let = source(SI, tile, 0, i, sentinel)
                            # gp packed panels per pass: their accumulators stay in registers
                            for qp in range(npass):
                                for q in T.unroll(gp):
                                    for j in T.vectorized(vl):
                                        vacc[q, 0, j] = T.float32(0)
                                        if gated:
                                            vacc[q, 1, j] = T.float32(0)
                                for kk in range(K):
                                    for q in T.unroll(gp):
                                        for j in T.vectorized(vl):
                                            vacc[q, 0, j] = vacc[q, 0, j] + X[xr, kk] * wide(W[
                                                TE[tile], T.min(pblk * pbp + T.min(
                                                    qp * gp + q, pbp - 1), nbp - 1), kk, j])
                                            if gated:
                                                vacc[q, 1, j] = vacc[q, 1, j] + X[xr, kk] * wide(Wb[
                                                    TE[tile], T.min(pblk * pbp + T.min(
                                                        qp * gp + q, pbp - 1), nbp - 1), kk, j])
                                for q in T.unroll(gp):
                                    for j in T.vectorized(vl):
                                        ctile[T.min(qp * gp + q, pbp - 1) // nv, i, 0,
                                              T.min(qp * gp + q, pbp - 1) % nv * vl + j] = vacc[
                                            q, 0, j]
                                        if gated:
                                            ctile[T.min(qp * gp + q, pbp - 1) // nv, i, 1,
                                                  T.min(qp * gp + q, pbp - 1) % nv * vl + j] = (
                                                vacc[q, 1, j])
                    # padding rows of group 0 repeat its first row (as the GEMM path does)
                    for i in range(mr):
                        if not valid(SI[row(tile, 0, i)], sentinel):
                            for q in range(pb):
                                for w_ in range(nw):
                                    for j in T.vectorized(nr):
                                        ctile[q, i, w_, j] = ctile[q, 0, w_, j]
                else:
                    for kb in range(nkc):
                        for q in range(pb):
                            p: T.let = pblk * pb + q
                            if p < nb:
                                for g in range(ng):
                                    if valid(SI[tile * block_m + g * mr], sentinel):
                                        for i in T.unroll(mr):
                                            src[i] = source(SI, tile, g, i, sentinel)
                                            for j in T.vectorized(nr):
                                                acc[i, j] = T.Select(kb == 0, T.float32(0),
                                                                     ctile[q, g * mr + i, 0, j])
                                                if gated:
                                                    acc2[i, j] = T.Select(
                                                        kb == 0, T.float32(0),
                                                        ctile[q, g * mr + i, 1, j])
                                        for kk in range(kc_len(kb)):
                                            for i in T.unroll(mr):
                                                for v in T.unroll(nv):
                                                    for j in T.vectorized(vl):
                                                        acc[i, v * vl + j] = acc[
                                                            i, v * vl + j] + X[
                                                            src[i], kb * kc + kk] * wide(W[
                                                            TE[tile], packed(p, v),
                                                            kb * kc + kk, j])
                                                        if gated:
                                                            acc2[i, v * vl + j] = acc2[
                                                                i, v * vl + j] + X[
                                                                src[i], kb * kc + kk] * wide(Wb[
                                                                TE[tile], packed(p, v),
                                                                kb * kc + kk, j])
                                        for i in T.unroll(mr):
                                            for j in T.vectorized(nr):
                                                ctile[q, g * mr + i, 0, j] = acc[i, j]
                                                if gated:
                                                    ctile[q, g * mr + i, 1, j] = acc2[i, j]
                for q in range(pb):
                    p: T.let = pblk * pb + q
                    if p < nb:
                        for g in range(ng):
                            if valid(SI[tile * block_m + g * mr], sentinel):
                                for i in T.unroll(mr):
                                    if full_nb == nb:
                                        for j in T.vectorized(nr):
                                            Y[row(tile, g, i), p * nr + j] = epilogue(
                                                ctile, q, g * mr + i, j, TE[tile], p * nr + j,
                                                Bb, Bb2)
                                    else:
                                        # Only the last panel is partial: guard its columns.
                                        if p < full_nb:
                                            for j in T.vectorized(nr):
                                                Y[row(tile, g, i), p * nr + j] = epilogue(
                                                    ctile, q, g * mr + i, j, TE[tile],
                                                    p * nr + j, Bb, Bb2)
                                        else:
                                            for j in range(N - full_nb * nr):
                                                Y[row(tile, g, i), p * nr + j] = epilogue(
                                                    ctile, q, g * mr + i, j, TE[tile],
                                                    p * nr + j, Bb, Bb2)

    transforms = {1: lambda a: pack_nk(a, vl)}
    if gated:
        transforms[2] = lambda a: pack_nk(a, vl)
    drop = [n for n, used in (("W2", gated), ("B1", bias), ("B2", bias2)) if not used]
    return finish(func, name, drop=drop, arg_transforms=transforms)
