"""Routing kernels: `core.topk`, the fused `moe.router` and its token dropping (`capacity`).

topk and router select with one warp per row and no shared memory: the k winners are found in
k passes, each a warp-wide argmax (xor butterfly of __shfl_xor_sync, so every lane ends with the
winner) over the elements that come *after* the previous winner in the order (value descending,
index ascending, NaN last). That order is exactly numpy's stable `argsort(-x)`, so ties go to
the lower index as the reference requires, and nothing has to be marked as taken. The router's
sparsemixer order instead follows numpy's `argmax` (the first NaN, else the largest value, lower
index on ties) and marks its picks as taken."""

from __future__ import annotations

import math

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

from moec.codegen.cuda.base import FLOATS, Kernel, Shapes, check_dtype, finalize, numel
from moec.codegen.cuda.dispatch import lower_peers, warp_expert_counts
from moec.errors import CodegenError

FULL = 0xFFFFFFFF
NEG_INF = -math.inf


def _precedes(v, e, w, f) -> tirx.PrimExpr:
    """(v, e) ranks before (w, f): larger value first, lower index on ties, NaN after every
    number (numpy's stable argsort(-x), the reference's order)."""
    nv, nw = tirx.isnan(v), tirx.isnan(w)
    numbers = tirx.And(tirx.Not(nv), tirx.Not(nw))
    return tirx.Or(tirx.Or(tirx.And(tirx.Not(nv), nw),
                           tirx.And(numbers, tirx.Or(v > w, tirx.And(v == w, e < f)))),
                   tirx.And(tirx.And(nv, nw), e < f))


@T.macro
def _argmax(bv, be, bs, ov, oe, os):
    """Warp butterfly: every lane ends with the best (value, index, payload) of the warp."""
    for s in T.unroll(5):
        ov[0] = T.tvm_warp_shuffle_xor(T.uint32(FULL), bv[0], 16 >> s, 32, 32)
        oe[0] = T.tvm_warp_shuffle_xor(T.uint32(FULL), be[0], 16 >> s, 32, 32)
        os[0] = T.tvm_warp_shuffle_xor(T.uint32(FULL), bs[0], 16 >> s, 32, 32)
        if _precedes(ov[0], oe[0], bv[0], be[0]):
            bv[0] = ov[0]
            be[0] = oe[0]
            bs[0] = os[0]


@T.macro
def _reset(bv, be, bs, last):
    """The best-so-far starts below everything: a NaN with an index past the row."""
    bv[0] = T.float32(math.nan)
    be[0] = last
    bs[0] = T.float32(0)


@T.macro
def _consider(v, e, s, bv, be, bs, pv, pe):
    """Take (v, e) if it comes after the previous winner (pv, pe) and beats the current best."""
    if _precedes(pv[0], pe[0], v, e) and _precedes(v, e, bv[0], be[0]):
        bv[0] = v
        be[0] = e
        bs[0] = s


def _beats_argmax(v, e, w, f) -> tirx.PrimExpr:
    """(v, e) wins numpy's argmax over (w, f): the first NaN wins, then the larger value, then
    the lower index (sparsemixer_ref picks its expert with `argmax`)."""
    nv, nw = tirx.isnan(v), tirx.isnan(w)
    return tirx.Or(tirx.And(nv, tirx.Or(tirx.Not(nw), e < f)),
                   tirx.And(tirx.And(tirx.Not(nv), tirx.Not(nw)),
                            tirx.Or(v > w, tirx.And(v == w, e < f))))


@T.macro
def _argmax_first(bv, be, ov, oe):
    """Warp butterfly in numpy argmax order: every lane ends with the warp's winner."""
    for s in T.unroll(5):
        ov[0] = T.tvm_warp_shuffle_xor(T.uint32(FULL), bv[0], 16 >> s, 32, 32)
        oe[0] = T.tvm_warp_shuffle_xor(T.uint32(FULL), be[0], 16 >> s, 32, 32)
        if _beats_argmax(ov[0], oe[0], bv[0], be[0]):
            bv[0] = ov[0]
            be[0] = oe[0]


def topk(shape, k: int, dtype: str) -> Kernel:
    """core.topk along the last axis: x[..., n] -> values[..., k] (dtype), indices i32[..., k]."""
    check_dtype(dtype, FLOATS)
    n = shape[-1]
    if not isinstance(n, int) or not 1 <= k <= n:
        raise CodegenError(f"topk: k={k} needs a static last dim >= k, got {tuple(shape)}")
    sh = Shapes()
    full = sh.shape(shape)
    lead = full[:-1]
    rows = numel(lead) if lead else 1
    out_shape = (*lead, k)
    rpb = 4  # rows (warps) per block
    chunks = (n + 31) // 32

    @T.prim_func
    def kernel(x_h: T.handle, v_h: T.handle, i_h: T.handle):
        X = T.match_buffer(x_h, full, dtype)
        V = T.match_buffer(v_h, out_shape, dtype)
        ID = T.match_buffer(i_h, out_shape, "int32")
        xf = T.decl_buffer((rows * n,), dtype, data=X.data)
        vf = T.decl_buffer((rows * k,), dtype, data=V.data)
        idf = T.decl_buffer((rows * k,), "int32", data=ID.data)
        bx = T.launch_thread("blockIdx.x", T.max((rows + (rpb - 1)) // rpb, 1))
        ty = T.launch_thread("threadIdx.y", rpb)
        lane = T.launch_thread("threadIdx.x", 32)
        bv = T.alloc_buffer((1,), "float32", scope="local")
        be = T.alloc_buffer((1,), "int32", scope="local")
        bs = T.alloc_buffer((1,), "float32", scope="local")
        ov = T.alloc_buffer((1,), "float32", scope="local")
        oe = T.alloc_buffer((1,), "int32", scope="local")
        os = T.alloc_buffer((1,), "float32", scope="local")
        pv = T.alloc_buffer((1,), "float32", scope="local")
        pe = T.alloc_buffer((1,), "int32", scope="local")
        row = bx * rpb + ty
        if row < rows:  # uniform per warp: the shuffles below see all 32 lanes
            pv[0] = T.float32(math.inf)
            pe[0] = -1
            for p in range(k):
                _reset(bv, be, bs, n)
                for c in range(chunks):
                    if c * 32 + lane < n:
                        val = T.Cast("float32", xf[row * n + c * 32 + lane])
                        _consider(val, c * 32 + lane, val, bv, be, bs, pv, pe)
                _argmax(bv, be, bs, ov, oe, os)
                if lane == 0:
                    vf[row * k + p] = T.Cast(dtype, bv[0])
                    idf[row * k + p] = be[0]
                pv[0] = bv[0]
                pe[0] = be[0]

    name = f"topk_{dtype}"
    return Kernel(finalize(kernel, name), name, {})


def _vec(h: int, dtype: str) -> int:
    """Elements per lane per load: 16 bytes at most, and whole warps across H."""
    widest = 4 if dtype == "float32" else 8
    return next((v for v in (8, 4, 2) if v <= widest and h % (32 * v) == 0), 1)


def router(H: int, E: int, k: int, scoring: str, order: str, norm_topk: bool, scale: float,
           has_bias: bool, n_groups: int, topk_groups: int, group_score: str,
           dtype: str, logit_bias: bool = False, jitter_eps: float = 0.01,
           w_dtype: str | None = None) -> Kernel:
    """moe.router (docs/ops.md): operands (x[T, H], w[E, H] in dtype[, logit_bias f32[E]]
    [, bias f32[E]]), results (weights f32[T, k], ids i32[T, k]); `arg_transforms` cast the
    biases (constant weights) to float32. `has_bias` is the selection bias (DeepSeek-V3's
    correction bias), `logit_bias` the router linear's own bias. Orders score_topk, topk_score
    and sparsemixer (PhiMoE, with `jitter_eps`; softmax scoring, no selection bias or groups,
    norm_topk ignored as in the reference); token dropping is the separate `capacity` kernel.
    `w_dtype` (default: dtype) is w's own dtype, for routers kept in float32 in a half model
    (Switch Transformers): the dot products are float32 either way.

    A block takes 4 tokens. Its 8 warps compute the 4 x E logits (float32 dot products, lanes
    along H with vector loads, each w row read once per block for all 4 tokens) into shared
    memory; then warp r routes token r from registers: scores, bias, group selection, k argmax
    passes and renormalisation, all with shuffles.

    sparsemixer, round r (exactly sparsemixer_ref, in float32): b = numpy argmax of the logits
    with taken experts at -inf; weight = 1 / sum_j exp(l_j - l_b) over the untaken j that are
    not far, far meaning max(|l_j|, l_b) > 0 and (l_b - l_j) / max(|l_j|, l_b) > 2*jitter_eps
    (a true division as in the reference, not a multiplied-out form; the > 0 test stands for
    the reference's 0/0 = NaN, which is never far); b is marked taken."""
    check_dtype(dtype, FLOATS)
    wdt = check_dtype(w_dtype or dtype, FLOATS)
    if scoring not in ("softmax", "sigmoid", "sqrt_softplus") or order not in (
            "score_topk", "topk_score", "sparsemixer"):
        raise CodegenError(f"router: scoring={scoring!r}, order={order!r}")
    if order == "sparsemixer" and (scoring != "softmax" or has_bias or n_groups > 1):
        raise CodegenError("router: order=sparsemixer takes softmax scoring, no selection bias "
                           "and no groups")
    if group_score not in ("max", "top2_sum") or E % n_groups or not 1 <= k <= E:
        raise CodegenError(f"router: E={E}, k={k}, n_groups={n_groups}, {group_score}")
    if not 1 <= topk_groups <= n_groups <= 32:
        raise CodegenError(f"router: topk_groups={topk_groups}, n_groups={n_groups}")
    if order == "topk_score" and (has_bias or n_groups > 1):
        raise CodegenError("router: order=topk_score takes no selection bias or groups")
    tok_pb, warps = 4, 8
    epl = (E + 31) // 32  # experts per lane: e = lane + 32 * i
    gsz = E // n_groups
    vec = min(_vec(H, dtype), _vec(H, wdt))
    hsteps = (H + 32 * vec - 1) // (32 * vec)
    grouped = order == "score_topk" and n_groups > 1
    sig = scoring == "sigmoid"
    ssp = scoring == "sqrt_softplus"
    sparse = order == "sparsemixer"
    renorm = norm_topk and order == "score_topk"
    two_eps = float(np.float32(2.0 * jitter_eps))  # the reference compares in float32
    sh = Shapes()
    tok = sh.dim("T")

    @T.prim_func
    def kernel(x_h: T.handle, w_h: T.handle, lb_h: T.handle, b_h: T.handle, wo_h: T.handle,
               io_h: T.handle):
        X = T.match_buffer(x_h, (tok, H), dtype)
        W = T.match_buffer(w_h, (E, H), wdt)
        LB = T.match_buffer(lb_h, (E,), "float32")
        B = T.match_buffer(b_h, (E,), "float32")
        WO = T.match_buffer(wo_h, (tok, k), "float32")
        IO = T.match_buffer(io_h, (tok, k), "int32")
        bx = T.launch_thread("blockIdx.x", T.max((tok + (tok_pb - 1)) // tok_pb, 1))
        warp = T.launch_thread("threadIdx.y", warps)
        lane = T.launch_thread("threadIdx.x", 32)
        logit = T.alloc_buffer((tok_pb, E), "float32", scope="shared")
        part = T.alloc_buffer((tok_pb,), "float32", scope="local")
        wv = T.alloc_buffer((vec,), wdt, scope="local")
        xv = T.alloc_buffer((tok_pb, vec), dtype, scope="local")
        red = T.alloc_buffer((1,), "float32", scope="local")
        lg = T.alloc_buffer((epl,), "float32", scope="local")
        sc = T.alloc_buffer((epl,), "float32", scope="local")
        sel = T.alloc_buffer((epl,), "float32", scope="local")
        gsc = T.alloc_buffer((n_groups,), "float32", scope="local")
        a2 = T.alloc_buffer((2,), "float32", scope="local")
        keep = T.alloc_buffer((1,), "uint32", scope="local")
        wk = T.alloc_buffer((k,), "float32", scope="local")
        ik = T.alloc_buffer((k,), "int32", scope="local")
        bv = T.alloc_buffer((1,), "float32", scope="local")
        be = T.alloc_buffer((1,), "int32", scope="local")
        bs = T.alloc_buffer((1,), "float32", scope="local")
        ov = T.alloc_buffer((1,), "float32", scope="local")
        oe = T.alloc_buffer((1,), "int32", scope="local")
        os = T.alloc_buffer((1,), "float32", scope="local")
        pv = T.alloc_buffer((1,), "float32", scope="local")
        pe = T.alloc_buffer((1,), "int32", scope="local")
        taken = T.alloc_buffer((epl,), "int32", scope="local")
        row0 = bx * tok_pb
        if row0 >= tok:  # only when T = 0 (the grid has one block then): x has no row to read
            T.evaluate(T.thread_return())
        # ---- logits[r, e] = x[row0 + r] . w[e], warp per expert
        for ei in range((E + warps - 1) // warps):
            if ei * warps + warp < E:
                for r in T.unroll(tok_pb):
                    part[r] = T.float32(0)
                for hs in range(hsteps):
                    if (hs * 32 + lane) * vec < H:
                        for v in T.vectorized(vec):
                            wv[v] = W[ei * warps + warp, (hs * 32 + lane) * vec + v]
                        for r in T.unroll(tok_pb):
                            # rows past T read as zero; the clamp keeps the address valid
                            for v in T.vectorized(vec):
                                xv[r, v] = X[T.min(row0 + r, T.max(tok - 1, 0)),
                                             (hs * 32 + lane) * vec + v]
                            for v in T.unroll(vec):
                                part[r] = part[r] + T.Cast("float32", xv[r, v]) * T.Cast(
                                    "float32", wv[v])
                for r in T.unroll(tok_pb):
                    for s in T.unroll(5):
                        part[r] = part[r] + T.tvm_warp_shuffle_xor(
                            T.uint32(FULL), part[r], 16 >> s, 32, 32)
                    if lane == 0:
                        if logit_bias:
                            logit[r, ei * warps + warp] = part[r] + T.Cast(
                                "float32", LB[ei * warps + warp])
                        else:
                            logit[r, ei * warps + warp] = part[r]
        T.tvm_storage_sync("shared")
        # ---- warp r routes token row0 + r
        if warp < tok_pb and row0 + warp < tok:
            for i in T.unroll(epl):
                lg[i] = T.float32(NEG_INF)
                if lane + 32 * i < E:
                    lg[i] = logit[warp, lane + 32 * i]
            if order == "score_topk":
                if sig:
                    for i in T.unroll(epl):
                        sc[i] = T.float32(1) / (T.float32(1) + T.exp(-lg[i]))
                elif ssp:  # sqrt(log(1 + e^l)), without overflow; 0 past E (l = -inf)
                    for i in T.unroll(epl):
                        sc[i] = T.sqrt(T.max(lg[i], T.float32(0)) + T.log1p(T.exp(
                            -T.fabs(lg[i]))))
                else:
                    red[0] = T.float32(NEG_INF)
                    for i in T.unroll(epl):
                        red[0] = T.max(red[0], lg[i])
                    for s in T.unroll(5):
                        red[0] = T.max(red[0], T.tvm_warp_shuffle_xor(
                            T.uint32(FULL), red[0], 16 >> s, 32, 32))
                    bv[0] = red[0]  # the row max
                    red[0] = T.float32(0)
                    for i in T.unroll(epl):
                        sc[i] = T.exp(lg[i] - bv[0])  # exp(-inf) = 0 past E
                        red[0] = red[0] + sc[i]
                    for s in T.unroll(5):
                        red[0] = red[0] + T.tvm_warp_shuffle_xor(
                            T.uint32(FULL), red[0], 16 >> s, 32, 32)
                    for i in T.unroll(epl):
                        sc[i] = sc[i] / red[0]
                for i in T.unroll(epl):
                    sel[i] = T.float32(NEG_INF)
                    if lane + 32 * i < E:
                        if has_bias:
                            sel[i] = sc[i] + T.Cast("float32", B[lane + 32 * i])
                        else:
                            sel[i] = sc[i]
                if grouped:
                    for g in T.unroll(n_groups):
                        a2[0] = T.float32(NEG_INF)
                        a2[1] = T.float32(NEG_INF)
                        for i in T.unroll(epl):
                            if (lane + 32 * i) // gsz == g and lane + 32 * i < E:
                                a2[1] = T.max(a2[1], T.min(a2[0], sel[i]))
                                a2[0] = T.max(a2[0], sel[i])
                        for s in T.unroll(5):
                            ov[0] = T.tvm_warp_shuffle_xor(T.uint32(FULL), a2[0], 16 >> s, 32, 32)
                            os[0] = T.tvm_warp_shuffle_xor(T.uint32(FULL), a2[1], 16 >> s, 32, 32)
                            # top two of {a0, a1, o0, o1} with a0 >= a1, o0 >= o1
                            a2[1] = T.max(T.min(a2[0], ov[0]), T.max(a2[1], os[0]))
                            a2[0] = T.max(a2[0], ov[0])
                        if group_score == "max" or gsz == 1:
                            gsc[g] = a2[0]
                        else:
                            gsc[g] = a2[0] + a2[1]
                    # every lane picks the same topk_groups groups (stable order)
                    keep[0] = T.uint32(0)
                    pv[0] = T.float32(math.inf)
                    pe[0] = -1
                    for _p in T.unroll(topk_groups):
                        _reset(bv, be, bs, n_groups)
                        for g in T.unroll(n_groups):
                            _consider(gsc[g], g, gsc[g], bv, be, bs, pv, pe)
                        keep[0] = keep[0] | T.shift_left(T.uint32(1), T.Cast("uint32", be[0]))
                        pv[0] = bv[0]
                        pe[0] = be[0]
                    for i in T.unroll(epl):
                        if T.bitwise_and(T.shift_right(keep[0], T.Cast(
                                "uint32", (lane + 32 * i) // gsz)), T.uint32(1)) == T.uint32(0):
                            sel[i] = T.float32(NEG_INF)
            elif order == "topk_score":
                for i in T.unroll(epl):
                    sel[i] = lg[i]
                    sc[i] = lg[i]
            if sparse:
                # ---- sparsemixer: k rounds of argmax + a softmax over the near experts
                for i in T.unroll(epl):
                    taken[i] = 0
                for p in T.unroll(k):
                    bv[0] = T.float32(NEG_INF)  # below every candidate: index E is last
                    be[0] = E
                    for i in T.unroll(epl):
                        if lane + 32 * i < E:
                            ov[0] = T.Select(taken[i] == 0, lg[i], T.float32(NEG_INF))
                            if _beats_argmax(ov[0], lane + 32 * i, bv[0], be[0]):
                                bv[0] = ov[0]
                                be[0] = lane + 32 * i
                    _argmax_first(bv, be, ov, oe)
                    red[0] = T.float32(0)
                    for i in T.unroll(epl):
                        if lane + 32 * i < E and taken[i] == 0:
                            ov[0] = T.max(T.fabs(lg[i]), bv[0])  # the distance's denominator
                            # a Select, not `if not far`: TVM would turn not(q > c) into
                            # q <= c, which differs for the reference's NaNs
                            red[0] = red[0] + T.Select(
                                ov[0] > T.float32(0)
                                and (bv[0] - lg[i]) / ov[0] > T.float32(two_eps),
                                T.float32(0), T.exp(lg[i] - bv[0]))
                    for s in T.unroll(5):
                        red[0] = red[0] + T.tvm_warp_shuffle_xor(
                            T.uint32(FULL), red[0], 16 >> s, 32, 32)
                    wk[p] = T.float32(1) / red[0]  # exp(l_b - l_b) / sum
                    ik[p] = be[0]
                    for i in T.unroll(epl):
                        if lane + 32 * i == be[0]:
                            taken[i] = 1
            else:
                # ---- k argmax passes; the payload is the unbiased score (or the logit)
                pv[0] = T.float32(math.inf)
                pe[0] = -1
                for p in T.unroll(k):
                    _reset(bv, be, bs, E)
                    for i in T.unroll(epl):
                        if lane + 32 * i < E:
                            _consider(sel[i], lane + 32 * i, sc[i], bv, be, bs, pv, pe)
                    _argmax(bv, be, bs, ov, oe, os)
                    wk[p] = bs[0]
                    ik[p] = be[0]
                    pv[0] = bv[0]
                    pe[0] = be[0]
            if order == "topk_score":
                if sig:
                    for p in T.unroll(k):
                        wk[p] = T.float32(1) / (T.float32(1) + T.exp(-wk[p]))
                elif ssp:
                    for p in T.unroll(k):
                        wk[p] = T.sqrt(T.max(wk[p], T.float32(0)) + T.log1p(T.exp(
                            -T.fabs(wk[p]))))
                else:  # values come out descending: wk[0] is the max
                    ov[0] = wk[0]
                    red[0] = T.float32(0)
                    for p in T.unroll(k):
                        wk[p] = T.exp(wk[p] - ov[0])
                        red[0] = red[0] + wk[p]
                    for p in T.unroll(k):
                        wk[p] = wk[p] / red[0]
            elif renorm:
                red[0] = T.float32(1e-20) if sig or ssp else T.float32(0)
                for p in T.unroll(k):
                    red[0] = red[0] + wk[p]
                for p in T.unroll(k):
                    wk[p] = wk[p] / red[0]
            if lane == 0:
                for p in T.unroll(k):
                    WO[row0 + warp, p] = wk[p] * T.float32(scale)
                    IO[row0 + warp, p] = ik[p]

    func = kernel
    # drop the bias parameters the op does not have (TVMScript signatures are fixed)
    for index, present in ((3, has_bias), (2, logit_bias)):
        if not present:
            func = _without_param(func, index)
    name = f"router_{scoring}_{order}_{dtype}" + (f"_w{wdt}" if wdt != dtype else "")
    n_bias = int(logit_bias) + int(has_bias)
    to_f32 = {2 + i: _as_f32 for i in range(n_bias)}
    return Kernel(finalize(func, name), name, to_f32)


CAPACITY_SMEM = 40 * 1024  # bytes of shared memory the capacity kernel may use


def capacity(E: int, k: int, cap: int, batched: bool = False) -> Kernel:
    """Token dropping after moe.router (`capacity`, Switch Transformers; docs/ops.md): each
    expert keeps its first `cap` slots in slot order s = t*k + j, the others get weight 0.
    Kernel args `(weights f32[T, k], ids i32[T, k], out f32[T, k])`, or with `batched`
    `[B, T, k]` each, every sequence counting its own slots (a router on [B, S, H]: one thread
    block per sequence, max(B, 1) blocks, the spare one idle for B = 0); ids are clamped into
    [0, E) as the CPU kernel does.

    Design: a slot's fate depends on every earlier slot, so one thread block (up to 16 warps)
    walks the slots in rounds of one slot per thread, in slot order, and computes each slot's
    exact rank among the slots of its expert: (slots of earlier rounds, a running count per
    expert in shared memory) + (earlier warps of this round, from per-warp counts in shared
    memory) + (earlier lanes of its warp, from __match_any_sync). A round costs three barriers
    and at most 16 shared reads per thread, so T*k slots take T*k / (32 * warps) rounds: any
    token count (0 included, where the block only clears its counters) and no atomics, whose
    order would not be the slot order. The per-warp counts take warps * E words: the block
    shrinks to fewer warps for very many experts (E <= 5120)."""
    for label, v in (("E", E), ("k", k), ("cap", cap)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise CodegenError(f"capacity: {label}={v!r} must be an int >= 1")
    nw = 16
    while nw > 1 and (nw + 1) * E * 4 > CAPACITY_SMEM:
        nw //= 2
    if (nw + 1) * E * 4 > CAPACITY_SMEM:
        raise CodegenError(f"capacity: {E} experts need too much shared memory")
    nt = nw * 32
    sh = Shapes()
    tok = sh.dim("T")
    nb = sh.dim("B") if batched else sh.dim(1)
    shape = (nb, tok, k) if batched else (tok, k)
    n = tok * k  # slots of a sequence, int64

    @T.prim_func
    def kernel(w_h: T.handle, ids_h: T.handle, o_h: T.handle):
        W = T.match_buffer(w_h, shape, "float32")
        IDS = T.match_buffer(ids_h, shape, "int32")
        O = T.match_buffer(o_h, shape, "float32")
        wf = T.decl_buffer((nb * n,), "float32", data=W.data)
        idf = T.decl_buffer((nb * n,), "int32", data=IDS.data)
        of = T.decl_buffer((nb * n,), "float32", data=O.data)
        bx = T.launch_thread("blockIdx.x", T.max(nb, T.int64(1)))
        tid = T.launch_thread("threadIdx.x", nt)
        run = T.alloc_buffer((E,), "int32", scope="shared")  # slots of earlier rounds
        wcnt = T.alloc_buffer((nw, E), "int32", scope="shared")  # this round, per warp
        ex = T.alloc_buffer((1,), "int32", scope="local")
        peers = T.alloc_buffer((1,), "uint32", scope="local")
        lead = T.alloc_buffer((1,), "int32", scope="local")
        before = T.alloc_buffer((1,), "int32", scope="local")
        after = T.alloc_buffer((1,), "int32", scope="local")
        total = T.alloc_buffer((1,), "int32", scope="local")
        lane = tid % 32
        warp = tid // 32
        base: T.let = T.Cast("int64", bx) * n  # this block's sequence
        seq_slots: T.let = T.Select(T.Cast("int64", bx) < nb, n, T.int64(0))
        for i in range((E + nt - 1) // nt):
            if i * nt + tid < E:
                run[i * nt + tid] = 0
                for w in range(nw):
                    wcnt[w, i * nt + tid] = 0
        T.tvm_storage_sync("shared")
        for i in range((seq_slots + (nt - 1)) // nt):
            s = i * nt + tid
            ex[0] = -1  # past the last slot: -1, never an expert
            if s < seq_slots:
                ex[0] = T.max(T.min(idf[base + s], E - 1), 0)
            warp_expert_counts(ex, peers, lead, wcnt, before, after, total, lane, warp, nw)
            if ex[0] >= 0:
                of[base + s] = T.Select(run[ex[0]] + before[0] + lower_peers(peers, lane) < cap,
                                        wf[base + s], T.float32(0))
            T.tvm_storage_sync("shared")
            # Each (warp, expert) leader clears its own count, and the leader of the last warp
            # holding the expert advances the running count (saturated at cap: only "below
            # cap" matters, and int32 must not overflow): one writer per shared word.
            if lead[0] == 1:
                wcnt[warp, ex[0]] = 0
                if after[0] == 0:
                    run[ex[0]] = T.min(run[ex[0]] + total[0], cap)
            T.tvm_storage_sync("shared")

    name = "capacity_seq" if batched else "capacity"
    return Kernel(finalize(kernel, name), name, {})


def _as_f32(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


_as_f32.casts_to = "float32"  # type: ignore[attr-defined]  (lower.py casts computed operands)


def _without_param(func: tirx.PrimFunc, index: int) -> tirx.PrimFunc:
    params = [p for i, p in enumerate(func.params) if i != index]
    return tirx.PrimFunc(params, func.body, func.ret_type, attrs=func.attrs)
