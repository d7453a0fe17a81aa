"""MoE CPU kernels against numpy references: router, align, permute, grouped_matmul, combine.

Tolerance: float results within rtol=1e-4, atol=1e-4 of a float64 numpy reference (weights
scaled by 1/sqrt(K) so GEMM outputs are O(1)); integer outputs (ids, layouts) exactly. Routings:
uniform (k distinct random experts per token), skewed (every token picks the same k experts) and
single (every slot goes to one expert), at T in TOKENS; all kernels compiled once, in one module.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

from moec.codegen.kernels import (
    align,
    capacity,
    combine,
    grouped_matmul,
    permute,
    router,
    unpermute,
)
from moec.codegen.kernels.grouped_matmul import grouped_tiles
from moec.errors import CodegenError
from moec.ir.moe_ops import align_ref as moe_align_ref
from moec.ir.registry import get_op

TOKENS = [0, 1, 7, 64, 300]
ROUTINGS = ["uniform", "skewed", "single"]
RTOL = ATOL = 1e-4
rng = np.random.default_rng(7)


def make_ids(t: int, e: int, k: int, routing: str) -> np.ndarray:
    if routing == "uniform":
        return np.argsort(rng.random((t, e)), axis=1)[:, :k].astype(np.int32)
    if routing == "skewed":
        return np.tile((np.arange(k, dtype=np.int32) * 3 + 1) % e, (t, 1))
    return np.full((t, k), e - 1, np.int32)


def align_ref(ids: np.ndarray, e: int, bm: int):
    """Counting sort of slots by expert, padded per expert to a multiple of bm (docs/ops.md)."""
    flat = ids.reshape(-1)
    tk = flat.size
    tl = tk // bm + e
    sorted_ids = np.full(tl * bm, tk, np.int32)
    tile_expert = np.full(tl, -1, np.int32)
    slot_row = np.zeros(tk, np.int32)
    row = tile = 0
    for ex in range(e):
        slots = np.nonzero(flat == ex)[0]
        sorted_ids[row:row + len(slots)] = slots
        slot_row[slots] = row + np.arange(len(slots))
        n_tiles = -(-len(slots) // bm)
        tile_expert[tile:tile + n_tiles] = ex
        row, tile = row + n_tiles * bm, tile + n_tiles
    return sorted_ids, tile_expert, slot_row.reshape(ids.shape)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _gelu(x):
    return 0.5 * x * (1.0 + np.vectorize(math.erf, otypes=[np.float64])(x / math.sqrt(2)))


ACT_REF = {"none": lambda v: v, "silu": lambda v: v * _sigmoid(v), "gelu": _gelu,
           "relu": lambda v: np.maximum(v, 0), "relu2": lambda v: np.maximum(v, 0) ** 2,
           "gelu_tanh": lambda v: 0.5 * v * (1 + np.tanh(0.7978845608 * (v + 0.044715 * v**3)))}


def gmm_ref(x, ws, bs, sorted_ids, tile_expert, bm, top_k, gather, activation):
    """Rows of used tiles only (a bool mask) and their expected values."""
    s = len(sorted_ids)
    tk = (x.shape[0] if gather else 0) * top_k
    if not gather:  # the sentinel of the layout: the largest id, present in the last row
        tk = int(sorted_ids[-1]) if s else 0
    used = np.repeat(tile_expert >= 0, bm) & (sorted_ids < tk)
    rows = np.nonzero(used)[0]
    e = np.repeat(tile_expert, bm)[rows]
    v = x[sorted_ids[rows] // top_k] if gather else x[rows]
    v = v.astype(np.float64)
    hs = [np.einsum("rk,rnk->rn", v, w[e]) + (b[e] if bs else 0)
          for w, b in zip(ws, bs or [None] * len(ws), strict=True)]
    if activation == "clamped_swiglu_mul":
        g = np.minimum(hs[0], 7.0)
        out = (np.clip(hs[1], -7.0, 7.0) + 1) * g * _sigmoid(1.702 * g)
    elif activation.endswith("_mul"):
        out = ACT_REF[activation[:-4]](hs[0]) * hs[1]
    else:
        out = ACT_REF[activation](hs[0])
    return used, out


ALIGN_CASES = [(8, 2, 16), (5, 3, 4), (3, 1, 1)]  # (E, k, block_m)
# (E, N, K, block_m, top_k, gather, activation, bias)
GMM_CASES = [
    (8, 48, 64, 16, 2, True, "silu_mul", False),
    (8, 40, 1100, 16, 2, False, "none", False),  # N tail, K in two chunks
    (5, 33, 37, 8, 3, True, "gelu", True),
    (8, 48, 64, 16, 2, False, "clamped_swiglu_mul", True),
    (4, 16, 32, 6, 2, True, "relu", False),  # block_m not a multiple of the 4-row groups
    (4, 24, 40, 16, 1, True, "gelu_tanh_mul", False),
    # 10 panels in blocks of 4 (gated) or 8: the last panel block is partial (decode path clamps)
    (6, 80, 70, 8, 2, True, "silu_mul", True),
    (6, 150, 70, 8, 2, False, "none", True),
    (5, 40, 24, 8, 2, True, "relu2", True),  # squared ReLU, non-gated with biases
]
COMBINE_CASES = [(40, 2), (64, 3)]  # (H, k)
ROUTER_CASES = [
    dict(E=8, k=2),
    dict(E=8, k=2, order="topk_score"),
    dict(E=16, k=1, scoring="sigmoid", order="topk_score", scale=2.0),
    dict(E=32, k=4, scoring="sigmoid", norm_topk=True, scale=2.5, has_bias=True, n_groups=4,
         topk_groups=2, group_score="top2_sum"),
    dict(E=12, k=3, norm_topk=True, n_groups=3, topk_groups=2, logit_bias=True),
    dict(E=7, k=3, scale=0.5, norm_topk=True),
    # DeepSeek-V4: sqrt(softplus) scores, selection on score + bias, renormalised, scaled
    dict(E=16, k=4, scoring="sqrt_softplus", norm_topk=True, scale=1.5, has_bias=True),
    dict(E=8, k=2, scoring="sqrt_softplus", order="topk_score"),
]
ROUTER_H = [64, 37]
SPARSEMIXER_EPS = [0.01, 0.3]  # PhiMoE's default, and one wide enough to keep many experts
CAPACITY_CASES = [(8, 1, 3), (4, 2, 5)]
LOW_PRECISION = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
# gated; K in two chunks and an N tail; a partial last panel block with biases
HALF_GMM_CASES = [GMM_CASES[0], GMM_CASES[1], GMM_CASES[6]]


@pytest.fixture(scope="module")
def lib(kernel_lib):
    ks = {}
    for case in ALIGN_CASES:
        ks[("align", case)] = align(*case)
    for case in GMM_CASES:
        *args, bias = case
        ks[("gmm", case)] = grouped_matmul(*args, "float32", bias=bias)
    for h, k in COMBINE_CASES:
        ks[("combine", h, k)] = combine(h, k)
        ks[("permute", h, k)] = permute(h, k)
        ks[("unpermute", h, k)] = unpermute(h, k)
    for case in HALF_GMM_CASES:
        *args, bias = case
        for dt in LOW_PRECISION:
            ks[("gmm", case, dt)] = grouped_matmul(*args, "float32", bias=bias, w_dtype=dt)
    for dt in LOW_PRECISION:
        ks[("combine", dt)] = combine(40, 2, dt)
        ks[("permute", dt)] = permute(40, 2, dt)
    for i, c in enumerate(ROUTER_CASES):
        for h in ROUTER_H:
            ks[("router", i, h)] = router(h, **c)
    for eps in SPARSEMIXER_EPS:
        ks[("sparsemixer", eps)] = router(37, 16, 2, order="sparsemixer", jitter_eps=eps,
                                          scale=1.5)
    for e, k, cap in CAPACITY_CASES:
        ks[("capacity", e, k, cap)] = capacity(e, k, cap)
    lib = kernel_lib(ks.values())
    lib.k = ks
    return lib


def run_align(lib, ids, e, k, bm):
    tl = ids.shape[0] * k // bm + e
    return lib(lib.k[("align", (e, k, bm))], ids,
               outs=[((tl * bm,), "int32"), ((tl,), "int32"), (ids.shape, "int32")])


@pytest.mark.parametrize("t", TOKENS)
@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("case", ALIGN_CASES)
def test_align(lib, case, routing, t):
    e, k, bm = case
    ids = make_ids(t, e, k, routing)
    for got, want in zip(run_align(lib, ids, e, k, bm), align_ref(ids, e, bm), strict=True):
        np.testing.assert_array_equal(got, want)


def test_align_clamps_out_of_range_ids(lib):
    ids = np.array([[0, 9], [-3, 7], [2, 100]], np.int32)
    got = run_align(lib, ids, 8, 2, 16)
    want = align_ref(np.clip(ids, 0, 7), 8, 16)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("t", TOKENS)
@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("case", COMBINE_CASES)
def test_permute_and_combine(lib, case, routing, t):
    h, k = case
    e, bm = 8, 16
    ids = make_ids(t, e, k, routing)
    sorted_ids, _, slot_row = align_ref(ids, e, bm)
    x = rng.standard_normal((t, h)).astype(np.float32)
    s = len(sorted_ids)
    (xs,) = lib(lib.k[("permute", h, k)], x, sorted_ids, outs=[((s, h), "float32")],
                fill=np.nan)
    valid = sorted_ids < t * k
    np.testing.assert_array_equal(xs[valid], x[sorted_ids[valid] // k])
    assert np.isnan(xs[~valid]).all(), "padding rows must be left alone"
    y = rng.standard_normal((s, h)).astype(np.float32)
    w = rng.random((t, k)).astype(np.float32)
    (out,) = lib(lib.k[("combine", h, k)], y, w, slot_row, outs=[((t, h), "float32")])
    ref = np.zeros((t, h))
    for j in range(k):  # increasing j, as specified
        ref += w[:, j:j + 1].astype(np.float64) * y[slot_row[:, j]]
    np.testing.assert_allclose(out, ref, rtol=RTOL, atol=ATOL)
    (back,) = lib(lib.k[("unpermute", h, k)], y, slot_row, outs=[((t, k, h), "float32")])
    np.testing.assert_array_equal(back, y[slot_row])  # a copy is exact


def test_unpermute_clamps_rows(lib):
    h, k = COMBINE_CASES[0]
    y = rng.standard_normal((32, h)).astype(np.float32)
    rows = np.resize(np.array([0, 31, -5, 99], np.int32), (4, k))
    (back,) = lib(lib.k[("unpermute", h, k)], y, rows, outs=[((4, k, h), "float32")])
    np.testing.assert_array_equal(back, y[np.clip(rows, 0, 31)])


@pytest.mark.parametrize("dtype", list(LOW_PRECISION))
def test_permute_and_combine_low_precision(lib, dtype):
    t, h, k = 64, 40, 2
    np_dt = LOW_PRECISION[dtype]
    sorted_ids, _, slot_row = align_ref(make_ids(t, 8, k, "uniform"), 8, 16)
    x = rng.standard_normal((t, h)).astype(np_dt)
    (xs,) = lib(lib.k[("permute", dtype)], x, sorted_ids, outs=[((len(sorted_ids), h), dtype)],
                fill=0)
    valid = sorted_ids < t * k
    np.testing.assert_array_equal(xs[valid], x[sorted_ids[valid] // k])  # a copy is exact
    w = rng.random((t, k)).astype(np.float32)
    (out,) = lib(lib.k[("combine", dtype)], xs, w, slot_row, outs=[((t, h), dtype)])
    y = xs.astype(np.float64)
    ref = w[:, :1] * y[slot_row[:, 0]] + w[:, 1:] * y[slot_row[:, 1]]
    tol = 2e-3 if dtype == "float16" else 1.6e-2  # f32 sum, one rounding to the storage type
    np.testing.assert_allclose(out.astype(np.float64), ref, rtol=tol, atol=tol)


def _gmm_inputs(case, routing, t):
    e, n, kdim, bm, top_k, gather, act, bias = case
    ids = make_ids(t, e, top_k, routing)
    sorted_ids, tile_expert, _ = align_ref(ids, e, bm)
    x = rng.standard_normal((t if gather else len(sorted_ids), kdim)).astype(np.float32)
    nw = 2 if act.endswith("_mul") else 1
    ws = [(rng.standard_normal((e, n, kdim)) / math.sqrt(kdim)).astype(np.float32)
          for _ in range(nw)]
    bs = [rng.standard_normal((e, n)).astype(np.float32) for _ in range(nw)] if bias else []
    return x, ws, bs, sorted_ids, tile_expert


@pytest.mark.parametrize("t", TOKENS)
@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("case", GMM_CASES)
def test_grouped_matmul(lib, case, routing, t):
    e, n, kdim, bm, top_k, gather, act, bias = case
    x, ws, bs, sorted_ids, tile_expert = _gmm_inputs(case, routing, t)
    (out,) = lib(lib.k[("gmm", case)], x, *ws, *bs, sorted_ids, tile_expert,
                 outs=[((len(sorted_ids), n), "float32")], fill=np.nan)
    used, ref = gmm_ref(x, ws, bs, sorted_ids, tile_expert, bm, top_k, gather, act)
    np.testing.assert_allclose(out[used], ref, rtol=RTOL, atol=ATOL)
    # Work skipping: unused tiles, and row groups that start with padding, are never written.
    mr, _ = grouped_tiles("float32", bm, act.endswith("_mul"))
    starts = np.arange(len(sorted_ids)) // bm * bm + (np.arange(len(sorted_ids)) % bm) // mr * mr
    group_used = np.repeat(tile_expert >= 0, bm) & (sorted_ids[starts] < t * top_k)
    written = ~np.isnan(out).all(axis=1)
    np.testing.assert_array_equal(written, group_used)


@pytest.mark.parametrize("t", [0, 1, 2, 64])
@pytest.mark.parametrize("routing", ["uniform", "skewed"])
@pytest.mark.parametrize("w_dtype", list(LOW_PRECISION))
@pytest.mark.parametrize("case", HALF_GMM_CASES)
def test_grouped_matmul_half_weights(lib, case, w_dtype, routing, t):
    """float16 / bfloat16 expert weights under float32 activations (widen-activations): each
    weight is widened as it is read, so the kernel computes the float32 GEMM of the weights'
    exact values (the float32 test's tolerance), on the decode path (1-2 rows a tile) and the
    GEMM path."""
    e, n, kdim, bm, top_k, gather, act, bias = case
    x, ws, bs, sorted_ids, tile_expert = _gmm_inputs(case, routing, t)
    ws = [w.astype(LOW_PRECISION[w_dtype]) for w in ws]
    (out,) = lib(lib.k[("gmm", case, w_dtype)], x, *ws, *bs, sorted_ids, tile_expert,
                 outs=[((len(sorted_ids), n), "float32")], fill=np.nan)
    used, ref = gmm_ref(x, [w.astype(np.float32) for w in ws], bs, sorted_ids, tile_expert, bm,
                        top_k, gather, act)
    np.testing.assert_allclose(out[used], ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("t", [0, 1, 37])
@pytest.mark.parametrize("routing", ["uniform", "skewed"])
@pytest.mark.parametrize("consts", [dict(alpha=1.0, limit=0.5, offset=0.0),
                                    dict(alpha=1.702, limit=0.5, offset=1.0)])
def test_grouped_matmul_clamped_swiglu_constants(kernel_lib, consts, routing, t):
    """clamped_swiglu_mul with the plain form's constants (silu(min(g, L)) * clamp(u, -L, L))
    and GPT-OSS's, at a limit the values reach on both sides, against moe.grouped_matmul's
    reference; gather with biases."""
    case = (6, 40, 48, 8, 2, True, "clamped_swiglu_mul", True)
    k = grouped_matmul(*case[:-1], "float32", bias=True, **consts)
    lib = kernel_lib([k])
    x, ws, bs, sorted_ids, tile_expert = _gmm_inputs(case, routing, t)
    (out,) = lib(k, x, *ws, *bs, sorted_ids, tile_expert,
                 outs=[((len(sorted_ids), case[1]), "float32")], fill=np.nan)
    op = get_op("moe.grouped_matmul")
    (want,) = op.reference([x, *ws, *bs, sorted_ids, tile_expert], op.check_attrs(dict(
        block_m=8, top_k=2, gather=True, activation="clamped_swiglu_mul", bias=True, **consts)))
    used = np.repeat(tile_expert >= 0, 8) & (sorted_ids < t * 2)
    if t:
        h = np.einsum("tk,enk->etn", x, ws[0])
        assert (h > 0.5).mean() > 0.1 and (h < -0.5).mean() > 0.1  # the clamp is reached
    np.testing.assert_allclose(out[used], want[used], rtol=RTOL, atol=ATOL)


def test_grouped_matmul_rejects_other_weight_dtypes():
    with pytest.raises(CodegenError, match="half weights take float32 activations"):
        grouped_matmul(4, 8, 8, 16, 2, True, "silu_mul", "float32", w_dtype="int8")


# (spec, (MR, NR in SIMD vectors), panels): NR follows the SIMD width the kernel is built for,
# and so does N (written for 8 lanes, scaled by lanes / 8: the same panels, tails and blocks).
GEMV_CASES = {
    # gated, N tail; 9 panels in blocks of 4 (AVX2), one decode pass of 4 panels
    "gated": ((16, 70, 50, 4, 2, True, "silu_mul", True), (4, 1), None),
    # two-vector micro-panels: 7 (N tail) in blocks of 6, decode passes of 8 of the 12
    # one-vector packed panels of a block, the second one repeating the block's last panel
    "wide": ((16, 100, 50, 4, 2, False, "none", True), (4, 2), 6),
    # gated two-vector micro-panels: 5 (N tail) in blocks of 3, decode passes of 4 of the 6
    # one-vector packed panels of a block
    "gated-wide": ((16, 70, 50, 4, 2, True, "silu_mul", True), (4, 2), 3),
}
GEMV_ROWS = [0, 1, 2, 3]
# Both SIMD widths the kernels have, whatever this host is: the tiles derive from the width
# (an AVX-512 host needs NR a multiple of 16 floats, AVX2 of 8). LLVM builds and runs the
# 16-lane code on AVX2 too (as pairs of 8-lane vectors), and the 8-lane code on AVX-512.
WIDTHS = {"avx2": 256, "avx512": 512}


@pytest.fixture(scope="module")
def decode_kernels(kernel_lib):
    """{width: (lib, {(case, gemv_rows): kernel})}: every decode-path kernel built once."""
    from moec.codegen.kernels import base

    out = {}
    for width, bits in WIDTHS.items():
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(base, "_vector_bits", lambda bits=bits: bits)
            lanes = base.vector_lanes("float32")
            ks = {}
            for case, (spec, (mr, vectors), panels) in GEMV_CASES.items():
                e, n, kdim, bm, top_k, gather, act, bias = _scaled(spec, lanes)
                for rows in GEMV_ROWS:
                    ks[case, rows] = grouped_matmul(
                        e, n, kdim, bm, top_k, gather, act, "float32", bias=bias,
                        tiles=(mr, vectors * lanes), panels=panels, gemv_rows=rows)
            out[width] = (kernel_lib(ks.values()), ks)
    return out


def _scaled(spec: tuple, lanes: int) -> tuple:
    e, n, *rest = spec
    return (e, n * lanes // 8, *rest)


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("case", GEMV_CASES)
@pytest.mark.parametrize("t", [1, 2, 3, 9])
@pytest.mark.parametrize("gemv_rows", GEMV_ROWS)
def test_grouped_matmul_decode_path(decode_kernels, gemv_rows, t, case, width):
    """Tiles of at most gemv_rows rows take the row-at-a-time decode path, the others the
    MR-row GEMM path (t=3, 9 mix both in one call): the same values either way, and the same
    rows written (a decode tile's padding rows of group 0 repeat its first row)."""
    spec = _scaled(GEMV_CASES[case][0], WIDTHS[width] // 32)
    e, n, kdim, bm, top_k, gather, act, bias = spec
    lib, ks = decode_kernels[width]
    kern = ks[case, gemv_rows]
    x, ws, bs, sorted_ids, tile_expert = _gmm_inputs(spec, "uniform", t)
    (out,) = lib(kern, x, *ws, *bs, sorted_ids, tile_expert,
                 outs=[((len(sorted_ids), n), "float32")], fill=np.nan)
    used, ref = gmm_ref(x, ws, bs, sorted_ids, tile_expert, bm, top_k, gather, act)
    np.testing.assert_allclose(out[used], ref, rtol=RTOL, atol=ATOL)
    written = ~np.isnan(out).all(axis=1)
    np.testing.assert_array_equal(written, np.repeat(tile_expert >= 0, bm))  # bm == MR here
    assert np.isfinite(out[written]).all()


def test_grouped_matmul_rejects_bad_activation():
    with pytest.raises(CodegenError):
        grouped_matmul(4, 8, 8, 16, 2, True, "swish")


def router_ref(x, w, lbias, sbias, *, E, k, scoring="softmax", order="score_topk",
               norm_topk=False, scale=1.0, n_groups=1, topk_groups=1, group_score="max", **_):
    """docs/ops.md "moe.router semantics", in float64. Also returns a mask of the rows whose
    decisions have no near-tie (gap < 1e-5 among the k+1 best experts or the topk_groups+1 best
    groups): float32 rounding may legitimately reorder those."""
    logits = x.astype(np.float64) @ w.T.astype(np.float64)
    if lbias is not None:
        logits = logits + lbias
    t = logits.shape[0]

    def score(v):
        if scoring == "sigmoid":
            return _sigmoid(v)
        if scoring == "sqrt_softplus":  # log1p(exp(v)) in float64; v down to -40 below
            return np.sqrt(np.log1p(np.exp(v)))
        ex = np.exp(v - v.max(-1, keepdims=True))
        return ex / ex.sum(-1, keepdims=True)

    def clear_top(v, n):  # the n best entries of each row are pairwise > 1e-5 apart
        top = -np.sort(-v, axis=-1)[:, :n]
        d = -np.diff(top, axis=-1)
        return np.where(np.isfinite(d), d, np.inf).min(-1, initial=np.inf) > 1e-5

    if order == "topk_score":
        ids = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
        wts = score(np.take_along_axis(logits, ids, -1))
        return wts * scale, ids, clear_top(logits, k + 1)
    scores = score(logits)
    sel = scores + (sbias if sbias is not None else 0)
    clear = np.ones(t, bool)
    if n_groups > 1:
        g = sel.reshape(t, n_groups, E // n_groups)
        gs = g.max(-1) if group_score == "max" else np.sort(g, -1)[..., -2:].sum(-1)
        clear &= clear_top(gs, topk_groups + 1)
        keep = np.argsort(-gs, axis=-1, kind="stable")[:, :topk_groups]
        mask = np.zeros((t, n_groups), bool)
        np.put_along_axis(mask, keep, True, -1)
        sel = np.where(np.repeat(mask, E // n_groups, -1), sel, -np.inf)
    clear &= clear_top(sel, k + 1)
    ids = np.argsort(-sel, axis=-1, kind="stable")[:, :k]
    wts = np.take_along_axis(scores, ids, -1)
    if norm_topk:
        wts = wts / (wts.sum(-1, keepdims=True) + (0 if scoring == "softmax" else 1e-20))
    return wts * scale, ids, clear


@pytest.mark.parametrize("t", TOKENS)
@pytest.mark.parametrize("h", ROUTER_H)
@pytest.mark.parametrize("case", range(len(ROUTER_CASES)))
def test_router(lib, case, h, t):
    c = ROUTER_CASES[case]
    e, k = c["E"], c["k"]
    x = rng.standard_normal((t, h)).astype(np.float32)
    w = (rng.standard_normal((e, h)) / math.sqrt(h)).astype(np.float32)
    lbias = rng.standard_normal(e).astype(np.float32) if c.get("logit_bias") else None
    sbias = (rng.standard_normal(e) * 0.1).astype(np.float32) if c.get("has_bias") else None
    args = [a for a in (x, w, lbias, sbias) if a is not None]
    wts, ids = lib(lib.k[("router", case, h)], *args,
                   outs=[((t, k), "float32"), ((t, k), "int32")])
    rw, ri, clear = router_ref(x, w, lbias, sbias, **c)
    assert clear.sum() >= t - 1 - t // 10, "too many near-ties to check this case"
    np.testing.assert_array_equal(ids[clear], ri[clear])
    np.testing.assert_allclose(wts[clear], rw[clear], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("t", TOKENS)
@pytest.mark.parametrize("eps", SPARSEMIXER_EPS)
def test_router_sparsemixer(lib, eps, t):
    from moec.ir.moe_ops import sparsemixer_ref

    x = rng.standard_normal((t, 37)).astype(np.float32)
    w = (rng.standard_normal((16, 37)) / math.sqrt(37)).astype(np.float32)
    wts, ids = lib(lib.k[("sparsemixer", eps)], x, w,
                   outs=[((t, 2), "float32"), ((t, 2), "int32")])
    logits = x.astype(np.float64) @ w.T.astype(np.float64)
    rw, ri = sparsemixer_ref(logits, 2, eps)
    np.testing.assert_array_equal(ids, ri)
    np.testing.assert_allclose(wts, 1.5 * rw, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("t", TOKENS)
@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("case", CAPACITY_CASES)
def test_capacity_drops_late_slots(lib, case, routing, t):
    from moec.ir.moe_ops import capacity_mask

    e, k, cap = case
    ids = make_ids(t, e, k, routing)
    w = rng.random((t, k)).astype(np.float32)
    (got,) = lib(lib.k[("capacity", e, k, cap)], w, ids, outs=[((t, k), "float32")])
    np.testing.assert_array_equal(got, np.where(capacity_mask(ids, cap), w, 0))


def test_router_ties_pick_lower_expert(lib):
    x = np.ones((3, 64), np.float32)
    w = np.zeros((8, 64), np.float32)
    w[[2, 5, 6]] = 1.0  # experts 2, 5 and 6 tie for first place
    wts, ids = lib(lib.k[("router", 0, 64)], x, w, outs=[((3, 2), "float32"), ((3, 2), "int32")])
    assert ids.tolist() == [[2, 5]] * 3


def test_router_rejects_inconsistent_options():
    with pytest.raises(CodegenError):
        router(64, 8, 2, order="topk_score", has_bias=True)
    with pytest.raises(CodegenError):
        router(64, 8, 2, n_groups=3)
    with pytest.raises(CodegenError):
        router(64, 8, 9)


# --------------------------------------------------------------------------- identity experts
# LongCat-Flash's zero-computation experts: ids E..E+Z-1 are left out of the sorted layout
# (slot_row -1) and the combine adds w * x for them.
IDENTITY_CASES = [(6, 2, 2, 4, 40), (4, 3, 1, 16, 37)]  # (E, Z, k, block_m, H)


@pytest.fixture(scope="module")
def identity_lib(kernel_lib):
    ks = {}
    for e, _, k, bm, h in IDENTITY_CASES:
        ks[("align", e, k, bm)] = align(e, k, bm, identity=True)
        ks[("combine", h, k)] = combine(h, k, identity=True)
    lib = kernel_lib(ks.values())
    lib.k = ks
    return lib


def _identity_ids(t, e, z, k, routing):
    if routing == "identity_heavy":  # every token picks an identity expert first
        ids = make_ids(t, e + z, k, "uniform")
        ids[:, 0] = e + (np.arange(t) % z)
        for j in range(1, k):  # keep the k choices distinct
            ids[:, j] = np.where(ids[:, j] == ids[:, 0], (ids[:, 0] + 1) % (e + z), ids[:, j])
        return ids.astype(np.int32)
    return make_ids(t, e + z, k, routing)


@pytest.mark.parametrize("t", TOKENS)
@pytest.mark.parametrize("routing", ROUTINGS + ["identity_heavy"])
@pytest.mark.parametrize("case", IDENTITY_CASES)
def test_align_and_combine_with_identity_experts(identity_lib, case, routing, t):
    e, z, k, bm, h = case
    ids = _identity_ids(t, e, z, k, routing)
    tl = t * k // bm + e
    got = identity_lib(identity_lib.k[("align", e, k, bm)], ids,
                       outs=[((tl * bm,), "int32"), ((tl,), "int32"), (ids.shape, "int32")])
    want = moe_align_ref(ids, e, bm, identity_experts=z)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
    _, _, slot_row = want
    assert ((slot_row < 0) == (ids >= e)).all()
    s = tl * bm
    y = rng.standard_normal((s, h)).astype(np.float32)
    x = rng.standard_normal((t, h)).astype(np.float32)
    w = rng.random((t, k)).astype(np.float32)
    (out,) = identity_lib(identity_lib.k[("combine", h, k)], y, w, slot_row, x,
                          outs=[((t, h), "float32")])
    op = get_op("moe.combine")
    (ref,) = op.reference([y, w, slot_row, x], op.check_attrs({}))
    np.testing.assert_allclose(out, ref, rtol=RTOL, atol=ATOL)
