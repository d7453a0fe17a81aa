"""Paged KV-cache kernels for the CPU: `cache_write` (in place) and `paged_attention` (a general
step kernel, flash-style, and a decode kernel that splits long contexts across threads).

Layouts (moec/ir/kv_ops.py): keys `[L, NB, Hkv, D, BS]` (transposed within a block), values
`[L, NB, Hkv, BS, Dv]`, queries `[1, Hq, T, D]`, output `[1, T, Hq, Dv]`.

Micro-kernel. A task owns M query rows that share one kv head: QT consecutive tokens of one
sequence times the `rep = Hq / Hkv` query heads of the kv head (grouped-query heads read each
key and value block once for all of them). Per key block: scores S[M, BS] = sum_d q[m, d] *
K[d, 0:BS] as BS-wide vector FMAs with q broadcast (q pre-scaled), the causal / window / chunk
mask as a vector select, an online softmax per row (running max and sum; the block's
probabilities through the vectorised exp of fmath), and acc[m, 0:Dv] += P[m, j] * V[j, 0:Dv].
Sinks start each row with the sink's logit as its max and 1 as its sum.

General kernel (any mix of prefill chunks and decode rows): tasks are (query tile, kv head)
pairs; a task finds its sequence by a scan over the (few) sequences. Decode kernel (every
sequence has one query row, T == B): tasks are (sequence, kv head, split); a sequence whose
visible keys span more than SPLIT_MIN blocks is cut into up to MAX_SPLITS ranges of blocks,
each with its own max/sum/accumulator, merged by a second parallel loop (log-sum-exp).
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from moec.codegen.kernels import fmath
from moec.codegen.kernels.base import (
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

NEG = -3.0e38  # "minus infinity" that stays finite through exp(x - max)
ROWS = 8  # query rows per task in the general kernel (QT tokens x rep heads)
MAX_SPLITS = 8  # decode: the most ranges one sequence's keys are cut into
SPLIT_MIN = 4  # decode: blocks per split at least


def cache_write(L: int, H: int, BS: int, D: int, layer: int, transposed: bool,
                dtype: str = "float32", x_dtype: str | None = None) -> Kernel:
    """Write x [1, H, T, D] into the cache at slots [T] of `layer`, in place. Kernel args
    `(cache, x, slots)`; the cache is `[L, NB, H, BS, D]`, or `[L, NB, H, D, BS]` if
    `transposed`. Slots outside the pool are skipped (the runtime never passes them)."""
    check_dtype("cache_write", dtype, ("float32", "float16", "bfloat16"))
    x_dtype = x_dtype or dtype
    if not 0 <= layer < L:
        raise CodegenError(f"cache_write: layer {layer} is not in 0..{L - 1}")
    dims = Dims()
    nb, t = dims.var("NB"), dims.var("T")
    shape = (L, nb, H, D, BS) if transposed else (L, nb, H, BS, D)
    name = kernel_name("cache_write", dtype, L, H, BS, D, layer, "t" if transposed else "",
                       x_dtype if x_dtype != dtype else "")

    def cast(v):
        return v if x_dtype == dtype else T.Cast(dtype, v)

    @T.prim_func
    def func(c: T.handle, x: T.handle, s: T.handle):
        C = T.match_buffer(c, shape, dtype)
        X = T.match_buffer(x, (1, H, t, D), x_dtype)
        S = T.match_buffer(s, (t,), "int32")
        for task in T.parallel(t * H):
            tok: T.let = task // H
            h: T.let = task % H
            slot: T.let = T.Cast("int64", S[tok])
            if slot >= i64(0) and slot < nb * BS:
                blk: T.let = slot // BS
                off: T.let = slot % BS
                if transposed:
                    for d in range(D):
                        C[layer, blk, h, d, off] = cast(X[0, h, tok, d])
                else:
                    for d in T.vectorized(D):
                        C[layer, blk, h, off, d] = cast(X[0, h, tok, d])

    return finish(func, name, min_parallel=par_min(D))


def _check(Hq: int, Hkv: int, BS: int) -> int:
    if Hkv < 1 or Hq % Hkv:
        raise CodegenError(f"paged_attention: {Hq} query heads are not a multiple of {Hkv}")
    if BS < 1 or BS & (BS - 1):
        raise CodegenError(f"paged_attention: block size {BS} is not a power of two")
    return Hq // Hkv


def paged_attention(L: int, Hq: int, Hkv: int, D: int, Dv: int, BS: int, layer: int,
                    scale: float, window: int = 0, chunk: int = 0, sinks: bool = False,
                    dtype: str = "float32", decode: bool = False) -> Kernel:
    """Attention of a step's queries over the paged caches (module doc). Kernel args
    `(q, k_cache, v_cache, q_start, q_len, kv_len, block_table, [sinks], out)`, and for the
    decode kernel a last scratch output `[T, Hq, MAX_SPLITS, Dv + 2]` (partial results)."""
    check_dtype("paged_attention", dtype)
    rep = _check(Hq, Hkv, BS)
    if decode:
        return _decode(L, Hq, Hkv, D, Dv, BS, layer, scale, window, chunk, sinks, dtype, rep)
    return _general(L, Hq, Hkv, D, Dv, BS, layer, scale, window, chunk, sinks, dtype, rep)


def _pv(BS: int, Dv: int):
    """acc[m, :] = acc[m, :] * corr + sum_j p[m, j] * V[j, :], register-tiled: Dv in chunks of
    4 SIMD vectors held in registers across the block's BS keys (a row-at-a-time update
    would load and store the accumulators for every key)."""
    vl = vector_lanes("float32")
    cw = 4 * vl
    nfull, tail = Dv // cw, Dv % cw
    has_tail = tail > 0

    @T.macro(hygienic=True)
    def pv_update(acc, p, V, m, corr, layer, blk, h):
        for c in range(nfull):
            reg = T.alloc_buffer((4, vl), "float32")
            for u in T.unroll(4):
                for lane in T.vectorized(vl):
                    reg[u, lane] = acc[m, c * cw + u * vl + lane] * corr
            for j in range(BS):
                for u in T.unroll(4):
                    for lane in T.vectorized(vl):
                        reg[u, lane] = reg[u, lane] + p[m, j] * V[layer, blk, h, j,
                                                                  c * cw + u * vl + lane]
            for u in T.unroll(4):
                for lane in T.vectorized(vl):
                    acc[m, c * cw + u * vl + lane] = reg[u, lane]
        if has_tail:
            for d in T.vectorized(tail):
                acc[m, nfull * cw + d] = acc[m, nfull * cw + d] * corr
            for j in range(BS):
                for d in T.vectorized(tail):
                    acc[m, nfull * cw + d] = acc[m, nfull * cw + d] + p[m, j] * V[
                        layer, blk, h, j, nfull * cw + d]

    return pv_update


def _row_ops(BS: int):
    """(row_max(sc, m, out): out[0] = max(out[0], max_j sc[m, j]), row_sum(sc, m, out):
    out[m] += sum_j sc[m, j]) over a block's BS scores: SIMD-wide partials first, then the
    lanes (half the scalar steps of a plain loop at BS = 16 on AVX2, none at AVX-512)."""
    vl = min(vector_lanes("float32"), BS)
    nv = BS // vl

    @T.macro(hygienic=True)
    def row_max(sc, m, out):
        part = T.alloc_buffer((vl,), "float32")
        for lane in T.vectorized(vl):
            part[lane] = sc[m, lane]
        for v in range(1, nv):
            for lane in T.vectorized(vl):
                part[lane] = T.max(part[lane], sc[m, v * vl + lane])
        for lane in range(vl):
            out[0] = T.max(out[0], part[lane])

    @T.macro(hygienic=True)
    def row_sum(sc, m, out):
        part = T.alloc_buffer((vl,), "float32")
        for lane in T.vectorized(vl):
            part[lane] = sc[m, lane]
        for v in range(1, nv):
            for lane in T.vectorized(vl):
                part[lane] = part[lane] + sc[m, v * vl + lane]
        for lane in range(vl):
            out[m] = out[m] + part[lane]

    return row_max, row_sum


def _lo(p, window: int, chunk: int):
    """The first visible position of a query at position p (int64 expressions)."""
    lo = i64(0)
    if window:
        lo = T.max(lo, p - i64(window - 1))
    if chunk:
        lo = T.max(lo, p // chunk * chunk)
    return lo


def _general(L, Hq, Hkv, D, Dv, BS, layer, scale, window, chunk, sinks, dtype, rep) -> Kernel:
    qt = max(1, ROWS // rep)  # tokens per tile
    M = qt * rep
    dims = Dims()
    nb, t, b_, mb = dims.var("NB"), dims.var("T"), dims.var("B"), dims.var("MB")
    sc = float(scale)
    name = kernel_name("paged_attention", dtype, L, Hq, Hkv, D, Dv, BS, layer, f"{sc:.6g}",
                       f"w{window}" if window else "", f"c{chunk}" if chunk else "",
                       "sinks" if sinks else "")
    pv_update = _pv(BS, Dv)
    row_max, row_sum = _row_ops(BS)

    @T.prim_func
    def func(q: T.handle, kc: T.handle, vc: T.handle, qs: T.handle, ql: T.handle,
             kl: T.handle, bt: T.handle, sk: T.handle, o: T.handle):
        Q = T.match_buffer(q, (1, Hq, t, D), dtype)
        KC = T.match_buffer(kc, (L, nb, Hkv, D, BS), dtype)
        VC = T.match_buffer(vc, (L, nb, Hkv, BS, Dv), dtype)
        QS = T.match_buffer(qs, (b_,), "int32")
        QL = T.match_buffer(ql, (b_,), "int32")
        KL = T.match_buffer(kl, (b_,), "int32")
        BT = T.match_buffer(bt, (b_, mb), "int32")
        SK = T.match_buffer(sk, (Hq,), dtype)
        O = T.match_buffer(o, (1, t, Hq, Dv), dtype)
        # a sequence adds at most one partial tile: ceil(T / qt) + B tiles cover every step
        for task in T.parallel(((t + (qt - 1)) // qt + b_) * Hkv):
            ti: T.let = task // Hkv
            h: T.let = task % Hkv
            # find the task's (sequence, first token): scan the tiles of the sequences
            found = T.alloc_buffer((3,), "int64")  # sequence, tile start in it, tiles seen
            found[0] = i64(-1)
            found[2] = i64(0)
            for b in range(b_):
                nt: T.let = (T.Cast("int64", QL[b]) + (qt - 1)) // qt
                if found[0] < i64(0) and ti < found[2] + nt:
                    found[0] = b
                    found[1] = (ti - found[2]) * qt
                found[2] = found[2] + nt
            if found[0] >= i64(0):
                b: T.let = found[0]
                i0: T.let = found[1]
                n: T.let = T.Cast("int64", QL[b])
                kv: T.let = T.Cast("int64", KL[b])
                s0: T.let = T.Cast("int64", QS[b])
                last: T.let = T.min(i0 + (qt - 1), n - i64(1))  # last valid token of the tile
                qb = T.alloc_buffer((M, D), "float32")
                acc = T.alloc_buffer((M, Dv), "float32")
                sc_ = T.alloc_buffer((M, BS), "float32")
                mx = T.alloc_buffer((M,), "float32")
                sm = T.alloc_buffer((M,), "float32")
                for m in range(M):
                    tok: T.let = s0 + T.min(i0 + m // rep, last)
                    for d in T.vectorized(D):
                        qb[m, d] = Q[0, h * rep + m % rep, tok, d] * T.float32(sc)
                    for d in T.vectorized(Dv):
                        acc[m, d] = T.float32(0)
                    if sinks:
                        mx[m] = SK[h * rep + m % rep]
                        sm[m] = T.float32(1)
                    else:
                        mx[m] = T.float32(NEG)
                        sm[m] = T.float32(0)
                p_first: T.let = kv - n + i0
                p_last: T.let = kv - n + last
                for jb in range(_lo(p_first, window, chunk) // BS, p_last // BS + 1):
                    blk: T.let = T.Cast("int64", BT[b, jb])
                    for m in T.unroll(M):
                        for j in T.vectorized(BS):
                            sc_[m, j] = T.float32(0)
                    for d in range(D):
                        for m in T.unroll(M):
                            for j in T.vectorized(BS):
                                sc_[m, j] = sc_[m, j] + qb[m, d] * KC[layer, blk, h, d, j]
                    # a block every row sees whole (most of a long prompt's) needs no mask
                    inside: T.let = jb * BS >= _lo(p_last, window, chunk) and \
                        jb * BS + (BS - 1) <= p_first
                    for m in range(M):
                        if not inside:
                            p: T.let = kv - n + T.min(i0 + m // rep, last)
                            lo: T.let = _lo(p, window, chunk)
                            for j in T.vectorized(BS):
                                sc_[m, j] = T.Select(
                                    jb * BS + j <= p and jb * BS + j >= lo, sc_[m, j],
                                    T.float32(NEG))
                        mnew = T.alloc_buffer((2,), "float32")  # new max, correction
                        mnew[0] = mx[m]
                        row_max(sc_, m, mnew)
                        mnew[1] = fmath.exp(mx[m] - mnew[0])
                        mx[m] = mnew[0]
                        for j in T.vectorized(BS):
                            sc_[m, j] = fmath.exp(sc_[m, j] - mnew[0])
                        sm[m] = sm[m] * mnew[1]
                        row_sum(sc_, m, sm)
                        pv_update(acc, sc_, VC, m, mnew[1], layer, blk, h)
                for m in range(M):
                    if i0 + m // rep <= last:
                        tok: T.let = s0 + i0 + m // rep
                        for d in T.vectorized(Dv):
                            O[0, tok, h * rep + m % rep, d] = acc[m, d] / sm[m]

    return finish(func, name, drop=() if sinks else ("SK",))


def _decode(L, Hq, Hkv, D, Dv, BS, layer, scale, window, chunk, sinks, dtype, rep) -> Kernel:
    M = rep
    S = MAX_SPLITS
    dims = Dims()
    nb, t, b_, mb = dims.var("NB"), dims.var("T"), dims.var("B"), dims.var("MB")
    sc = float(scale)
    name = kernel_name("paged_decode", dtype, L, Hq, Hkv, D, Dv, BS, layer, f"{sc:.6g}",
                       f"w{window}" if window else "", f"c{chunk}" if chunk else "",
                       "sinks" if sinks else "")
    pv_update = _pv(BS, Dv)
    row_max, row_sum = _row_ops(BS)

    def splits(first, nblk):
        """How many ranges a sequence's nblk visible blocks are cut into."""
        return T.max(i64(1), T.min(i64(S), nblk // SPLIT_MIN))

    @T.prim_func
    def func(q: T.handle, kc: T.handle, vc: T.handle, qs: T.handle, ql: T.handle,
             kl: T.handle, bt: T.handle, sk: T.handle, o: T.handle, pt: T.handle):
        Q = T.match_buffer(q, (1, Hq, t, D), dtype)
        KC = T.match_buffer(kc, (L, nb, Hkv, D, BS), dtype)
        VC = T.match_buffer(vc, (L, nb, Hkv, BS, Dv), dtype)
        QS = T.match_buffer(qs, (b_,), "int32")
        QL = T.match_buffer(ql, (b_,), "int32")
        KL = T.match_buffer(kl, (b_,), "int32")
        BT = T.match_buffer(bt, (b_, mb), "int32")
        SK = T.match_buffer(sk, (Hq,), dtype)
        O = T.match_buffer(o, (1, t, Hq, Dv), dtype)
        P = T.match_buffer(pt, (t, Hq, S, Dv + 2), "float32")  # acc..., max, sum
        for task in T.parallel(b_ * Hkv * S):
            b: T.let = task // (Hkv * S)
            h: T.let = task // S % Hkv
            s: T.let = task % S
            kv: T.let = T.Cast("int64", KL[b])
            tok: T.let = T.Cast("int64", QS[b])
            p: T.let = kv - i64(1)
            first: T.let = _lo(p, window, chunk) // BS
            nblk: T.let = p // BS + 1 - first
            ns: T.let = splits(first, nblk)
            if s < ns and QL[b] == 1:
                qb = T.alloc_buffer((M, D), "float32")
                acc = T.alloc_buffer((M, Dv), "float32")
                sc_ = T.alloc_buffer((M, BS), "float32")
                mx = T.alloc_buffer((M,), "float32")
                sm = T.alloc_buffer((M,), "float32")
                for m in range(M):
                    for d in T.vectorized(D):
                        qb[m, d] = Q[0, h * rep + m, tok, d] * T.float32(sc)
                    for d in T.vectorized(Dv):
                        acc[m, d] = T.float32(0)
                    if sinks:
                        mx[m] = T.Select(s == 0, SK[h * rep + m], T.float32(NEG))
                        sm[m] = T.Select(s == 0, T.float32(1), T.float32(0))
                    else:
                        mx[m] = T.float32(NEG)
                        sm[m] = T.float32(0)
                lo: T.let = _lo(p, window, chunk)
                for jb in range(first + s * nblk // ns, first + (s + 1) * nblk // ns):
                    blk: T.let = T.Cast("int64", BT[b, jb])
                    for m in T.unroll(M):
                        for j in T.vectorized(BS):
                            sc_[m, j] = T.float32(0)
                    for d in range(D):
                        for m in T.unroll(M):
                            for j in T.vectorized(BS):
                                sc_[m, j] = sc_[m, j] + qb[m, d] * KC[layer, blk, h, d, j]
                    for m in range(M):
                        for j in T.vectorized(BS):
                            sc_[m, j] = T.Select(
                                jb * BS + j <= p and jb * BS + j >= lo, sc_[m, j],
                                T.float32(NEG))
                        mnew = T.alloc_buffer((2,), "float32")
                        mnew[0] = mx[m]
                        row_max(sc_, m, mnew)
                        mnew[1] = fmath.exp(mx[m] - mnew[0])
                        mx[m] = mnew[0]
                        for j in T.vectorized(BS):
                            sc_[m, j] = fmath.exp(sc_[m, j] - mnew[0])
                        sm[m] = sm[m] * mnew[1]
                        row_sum(sc_, m, sm)
                        pv_update(acc, sc_, VC, m, mnew[1], layer, blk, h)
                for m in range(M):
                    if ns == 1:
                        for d in T.vectorized(Dv):
                            O[0, tok, h * rep + m, d] = acc[m, d] / sm[m]
                    else:
                        for d in T.vectorized(Dv):
                            P[tok, h * rep + m, s, d] = acc[m, d]
                        P[tok, h * rep + m, s, Dv] = mx[m]
                        P[tok, h * rep + m, s, Dv + 1] = sm[m]
        # merge the splits of sequences that were cut (log-sum-exp of the partial results)
        for task in T.parallel(b_ * Hq):
            b: T.let = task // Hq
            hq: T.let = task % Hq
            kv: T.let = T.Cast("int64", KL[b])
            tok: T.let = T.Cast("int64", QS[b])
            p: T.let = kv - i64(1)
            first: T.let = _lo(p, window, chunk) // BS
            ns: T.let = splits(first, p // BS + 1 - first)
            if ns > i64(1) and QL[b] == 1:
                acc = T.alloc_buffer((Dv,), "float32")
                st = T.alloc_buffer((3,), "float32")  # max, sum, weight
                st[0] = T.float32(NEG)
                for s in range(ns):
                    st[0] = T.max(st[0], P[tok, hq, s, Dv])
                st[1] = T.float32(0)
                for d in T.vectorized(Dv):
                    acc[d] = T.float32(0)
                for s in range(ns):
                    st[2] = fmath.exp(P[tok, hq, s, Dv] - st[0])
                    st[1] = st[1] + st[2] * P[tok, hq, s, Dv + 1]
                    for d in T.vectorized(Dv):
                        acc[d] = acc[d] + st[2] * P[tok, hq, s, d]
                for d in T.vectorized(Dv):
                    O[0, tok, hq, d] = acc[d] / st[1]

    return finish(func, name, drop=() if sinks else ("SK",))


__all__ = ["MAX_SPLITS", "cache_write", "paged_attention", "tirx"]
