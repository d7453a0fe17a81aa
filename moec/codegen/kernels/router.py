"""The fused MoE router `moe.router`: logits, scoring, (grouped) top-k and renormalisation in one
kernel, parallel over blocks of tokens.

Logits: a task owns TB tokens; for each pair of experts it keeps TB x EB SIMD accumulators over H
(the TB x rows are re-read from L1/L2 per expert pair, w streams once per task), then sums the
lanes. Token rows past T are clamped to T-1, so the GEMM has no branch; only the selection step,
which is scalar code over E (tiny next to the H-long dot products), checks t < T. Top-k uses the
lexicographic insertion of topk.py (ties: lower expert index first).
"""

from __future__ import annotations

from tvm.script import tirx as T

from moec.codegen.kernels import fmath
from moec.codegen.kernels.base import (
    Dims,
    Kernel,
    ceildiv,
    check_dtype,
    finish,
    i64,
    kernel_name,
    vector_lanes,
)
from moec.codegen.kernels.routing import check_positive
from moec.codegen.kernels.topk import nan_high, topk_init, topk_insert
from moec.errors import CodegenError

TB = 4  # tokens per task (register rows of the logits GEMM)
NEG_INF = float("-inf")


def _validate(E, k, scoring, order, has_bias, n_groups, topk_groups, group_score) -> None:
    check_positive("router", E=E, k=k, n_groups=n_groups, topk_groups=topk_groups)
    if scoring not in ("softmax", "sigmoid", "sqrt_softplus"):
        raise CodegenError(f"router: scoring must be softmax|sigmoid|sqrt_softplus, got "
                           f"{scoring!r}")
    if order not in ("score_topk", "topk_score", "sparsemixer"):
        raise CodegenError(f"router: order must be score_topk|topk_score|sparsemixer, got "
                           f"{order!r}")
    if order == "sparsemixer" and (has_bias or n_groups > 1 or scoring != "softmax"):
        raise CodegenError("router: order=sparsemixer takes softmax scoring, no selection bias "
                           "and no groups")
    if group_score not in ("max", "top2_sum"):
        raise CodegenError(f"router: group_score must be max|top2_sum, got {group_score!r}")
    if k > E:
        raise CodegenError(f"router: k={k} > E={E}")
    if order == "topk_score" and (has_bias or n_groups > 1):
        raise CodegenError("router: a selection bias and grouped top-k need order=score_topk")
    if E % n_groups or topk_groups > n_groups:
        raise CodegenError(f"router: n_groups={n_groups} must divide E={E} and be >= "
                           f"topk_groups={topk_groups}")
    group = E // n_groups
    if n_groups > 1 and k > topk_groups * group:
        raise CodegenError(f"router: k={k} exceeds the {topk_groups * group} experts kept")
    if n_groups > 1 and group_score == "top2_sum" and group < 2:
        raise CodegenError("router: group_score=top2_sum needs groups of >= 2 experts")


def router(
    H: int,
    E: int,
    k: int,
    scoring: str = "softmax",
    order: str = "score_topk",
    norm_topk: bool = False,
    scale: float = 1.0,
    has_bias: bool = False,
    n_groups: int = 1,
    topk_groups: int = 1,
    group_score: str = "max",
    dtype: str = "float32",
    logit_bias: bool = False,
    jitter_eps: float = 0.01,
) -> Kernel:
    """Fused router. Kernel args: `(x [T, H], w [E, H], [logit_bias f32[E]], [bias f32[E]],
    weights f32[T, k], ids i32[T, k])`, semantics of docs/ops.md "moe.router semantics":

    logits = x @ w.T (+ logit_bias, the router Linear's bias). `has_bias` is the selection bias.
    score_topk: scores = softmax|sigmoid|sqrt_softplus(logits); sel = scores (+ bias); with
    n_groups > 1 keep
    the topk_groups best groups (group score max(sel) or sum of its two largest sel) and set the
    other experts' sel to -inf; ids = topk(sel, k); weights = scores[ids], divided by their sum
    if norm_topk (+1e-20 for sigmoid and sqrt_softplus), times scale.
    topk_score: vals, ids = topk(logits, k); weights = softmax|sigmoid|sqrt_softplus(vals) *
    scale
    (norm_topk does not apply; bias and groups are rejected).
    sparsemixer (PhiMoE, inference form): k rounds; round r takes the best remaining expert b
    (ties: lower index) with weight 1 / sum_j exp(l_j - l_b) over the remaining experts j with
    l_b - l_j <= 2 * jitter_eps * max(|l_j|, l_b) (docs/ops.md), times scale."""
    check_dtype("router", dtype)
    check_positive("router", H=H)
    _validate(E, k, scoring, order, has_bias, n_groups, topk_groups, group_score)
    vl = vector_lanes(dtype)
    eb = 2 if E % 2 == 0 else 1
    gsize = E // n_groups
    grouped = n_groups > 1
    score_first = order == "score_topk"
    sparse = order == "sparsemixer"
    two_eps = 2.0 * jitter_eps
    softmax = scoring == "softmax"
    dims = Dims()
    t = dims.var("T")
    name = kernel_name("router", dtype, "H", H, "E", E, "k", k, scoring, order,
                       "norm" if norm_topk else "", "s", scale, "bias" if has_bias else "",
                       "lbias" if logit_bias else "",
                       "g", n_groups, topk_groups, group_score if grouped else "",
                       f"eps{jitter_eps}" if sparse else "")

    def xrow(tb, i):
        return T.min(tb * TB + i, t - i64(1))

    def score(v):
        if scoring == "sqrt_softplus":
            return fmath.sqrt_softplus(v)
        return fmath.sigmoid(v) if not softmax else v  # softmax is done over the row below

    def group_value(red):
        return red[0] if group_score == "max" else red[0] + red[1]

    def add_logit_bias(v, lb, e):
        return v + lb[e] if logit_bias else v

    def biased(sc, bias, e):
        return sc[e] + bias[e] if has_bias else sc[e]

    @T.prim_func
    def func(x: T.handle, w: T.handle, lb: T.handle, b: T.handle, weights: T.handle,
             ids_out: T.handle):
        X = T.match_buffer(x, (t, H), dtype)
        W = T.match_buffer(w, (E, H), dtype)
        LB = T.match_buffer(lb, (E,), "float32")
        BIAS = T.match_buffer(b, (E,), "float32")
        WT = T.match_buffer(weights, (t, k), "float32")
        IDS = T.match_buffer(ids_out, (t, k), "int32")
        for tb in T.parallel(ceildiv(t, TB)):
            logits = T.alloc_buffer((TB, E), "float32")
            acc = T.alloc_buffer((TB, eb, vl), "float32")
            for e0 in range(E // eb):
                for i in T.unroll(TB):
                    for e in T.unroll(eb):
                        for lane in T.vectorized(vl):
                            acc[i, e, lane] = T.float32(0)
                for h in range(H // vl):
                    for i in T.unroll(TB):
                        for e in T.unroll(eb):
                            for lane in T.vectorized(vl):
                                acc[i, e, lane] = acc[i, e, lane] + (
                                    X[xrow(tb, i), h * vl + lane] * W[e0 * eb + e, h * vl + lane])
                for i in range(TB):
                    for e in range(eb):
                        logits[i, e0 * eb + e] = add_logit_bias(T.float32(0), LB, e0 * eb + e)
                        for lane in range(vl):
                            logits[i, e0 * eb + e] = logits[i, e0 * eb + e] + acc[i, e, lane]
                        for hh in range(H % vl):
                            logits[i, e0 * eb + e] = logits[i, e0 * eb + e] + X[
                                xrow(tb, i), H // vl * vl + hh] * W[e0 * eb + e, H // vl * vl + hh]
            sc = T.alloc_buffer((E,), "float32")
            sel = T.alloc_buffer((E,), "float32")
            vals = T.alloc_buffer((k,), "float32")
            ids = T.alloc_buffer((k,), "int32")
            gvals = T.alloc_buffer((topk_groups,), "float32")
            gids = T.alloc_buffer((topk_groups,), "int32")
            tmp = T.alloc_buffer((2,), "float32")
            itmp = T.alloc_buffer((2,), "int32")
            red = T.alloc_buffer((2,), "float32")
            for i in range(TB):
                if tb * TB + i < t:
                    if score_first:
                        for e in range(E):
                            sc[e] = score(logits[i, e])
                        if softmax:
                            red[0] = T.float32(NEG_INF)
                            for e in range(E):
                                red[0] = T.max(red[0], sc[e])
                            red[1] = T.float32(0)
                            for e in range(E):
                                sc[e] = fmath.exp(sc[e] - red[0])
                                red[1] = red[1] + sc[e]
                            for e in range(E):
                                sc[e] = sc[e] / red[1]
                        for e in range(E):
                            sel[e] = nan_high(biased(sc, BIAS, e))
                        if grouped:
                            topk_init(gvals, gids, topk_groups)
                            for g in range(n_groups):
                                red[0] = T.float32(NEG_INF)
                                red[1] = T.float32(NEG_INF)
                                for m in range(gsize):
                                    # red = the two largest sel of the group, red[0] >= red[1]
                                    if sel[g * gsize + m] > red[0]:
                                        red[1] = red[0]
                                        red[0] = sel[g * gsize + m]
                                    elif sel[g * gsize + m] > red[1]:
                                        red[1] = sel[g * gsize + m]
                                topk_insert(gvals, gids, tmp, itmp, group_value(red), g,
                                            topk_groups)
                            for e in range(E):
                                itmp[0] = 0
                                for j in range(topk_groups):
                                    if gids[j] == e // gsize:
                                        itmp[0] = 1
                                if itmp[0] == 0:
                                    sel[e] = T.float32(NEG_INF)
                        topk_init(vals, ids, k)
                        for e in range(E):
                            topk_insert(vals, ids, tmp, itmp, sel[e], e, k)
                        for j in range(k):
                            vals[j] = sc[ids[j]]
                        if norm_topk:
                            red[0] = T.float32(1e-20) if not softmax else T.float32(0)
                            for j in range(k):
                                red[0] = red[0] + vals[j]
                            for j in range(k):
                                vals[j] = vals[j] / red[0]
                    elif sparse:
                        for e in range(E):
                            sel[e] = T.float32(1)  # 1: still remaining
                        for r in range(k):
                            itmp[0] = -1
                            red[0] = T.float32(NEG_INF)
                            for e in range(E):
                                if sel[e] > T.float32(0) and (itmp[0] < 0 or logits[i, e] > red[0]):
                                    red[0] = logits[i, e]
                                    itmp[0] = e
                            red[1] = T.float32(0)
                            for e in range(E):
                                if sel[e] > T.float32(0) and red[0] - logits[i, e] <= T.float32(
                                        two_eps) * T.max(T.fabs(logits[i, e]), red[0]):
                                    red[1] = red[1] + fmath.exp(logits[i, e] - red[0])
                            vals[r] = T.float32(1) / red[1]
                            ids[r] = itmp[0]
                            sel[itmp[0]] = T.float32(0)
                    else:
                        topk_init(vals, ids, k)
                        for e in range(E):
                            topk_insert(vals, ids, tmp, itmp, nan_high(logits[i, e]), e, k)
                        for j in range(k):
                            vals[j] = logits[i, ids[j]]
                        if softmax:
                            # vals[0] is the largest: subtract it, as softmax does
                            red[0] = vals[0]
                            red[1] = T.float32(0)
                            for j in range(k):
                                vals[j] = fmath.exp(vals[j] - red[0])
                                red[1] = red[1] + vals[j]
                            for j in range(k):
                                vals[j] = vals[j] / red[1]
                        else:
                            for j in range(k):
                                vals[j] = score(vals[j])
                    for j in range(k):
                        WT[tb * TB + i, j] = vals[j] * T.float32(scale)
                        IDS[tb * TB + i, j] = ids[j]

    drop = [n for n, used in (("LB", logit_bias), ("BIAS", has_bias)) if not used]
    return finish(func, name, drop=drop, min_parallel=2)  # one token tile: no pool wake-up
