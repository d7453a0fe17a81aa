"""The generated CUDA of every kernel, run on the CPU by the emulator (emulator.py), against
moec's reference ops: exact for ids and the routing layout, rel err <= 1e-2 for fp16/bf16.

This is the numeric check available without a GPU; test_cuda_gpu.py repeats it on a device.
Each test module compiles its kernels in one g++ run per dtype."""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
import pytest

from moec.codegen import cuda as C
from moec.codegen.cuda.base import Kernel
from moec.ir.moe_ops import align_ref
from moec.ir.registry import get_op

from .emulator import emulate

NP = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
HALF = ["float16", "bfloat16"]


def ref(op: str, xs: list[np.ndarray], **attrs) -> list[np.ndarray]:
    d = get_op(op)
    return d.reference(xs, d.check_attrs(attrs))


# Per output dtype: float32 results are float32 arithmetic (no tensor cores), the half ones
# are rounded to 11 (float16) or 8 (bfloat16) significant bits, with half-precision inputs.
TOL = {"float32": 2e-5, "float16": 1e-2, "bfloat16": 2e-2}


def close(got: np.ndarray, want: np.ndarray, tol: float | None = None) -> None:
    """`got` within `tol` (default: TOL of got's dtype) of `want`, relative to each value and,
    for values near zero, to the output's largest magnitude: a fixed atol of 1e-2 accepted
    anything for outputs of size 0.01 (softmax over many columns)."""
    tol = TOL[np.dtype(got.dtype).name] if tol is None else tol
    w = want.astype(np.float64)
    scale = float(np.abs(w).max()) if w.size else 0.0
    np.testing.assert_allclose(got.astype(np.float64), w, rtol=tol, atol=tol * scale)


def named(kernel: Kernel, name: str) -> Kernel:
    """Unique kernel names: several variants of one builder share a module here, and the
    emulator's launch hooks are process-wide (so the dtype is part of the name)."""
    name = f"{name}_{kernel.name.rsplit('_', 1)[-1]}" if "align" not in name else name
    return dataclasses.replace(kernel, func=kernel.func.with_attr("global_symbol", name),
                               name=name)


def routing(t: int, e: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(e) * 0.3)
    if t == 0:
        return np.zeros((0, k), np.int32)
    return np.stack([rng.choice(e, k, replace=False, p=p) for _ in range(t)]).astype(np.int32)


# --------------------------------------------------------------------------- kernels

ROUTERS = {
    "mixtral": dict(E=8, k=2, scoring="softmax", order="score_topk", norm_topk=True,
                    has_bias=False),
    "topk_softmax": dict(E=8, k=2, scoring="softmax", order="topk_score", norm_topk=False,
                         has_bias=False, logit_bias=True),
    "qwen": dict(E=64, k=6, scoring="softmax", order="score_topk", norm_topk=False,
                 has_bias=False),
    "deepseek_v3": dict(E=256, k=8, scoring="sigmoid", order="score_topk", norm_topk=True,
                        scale=2.5, has_bias=True, n_groups=8, topk_groups=4,
                        group_score="top2_sum"),
    "deepseek_v2": dict(E=160, k=6, scoring="softmax", order="score_topk", norm_topk=False,
                        scale=16.0, has_bias=False, n_groups=8, topk_groups=3),
    "llama4": dict(E=16, k=1, scoring="sigmoid", order="topk_score", norm_topk=False,
                   has_bias=False),
    # DeepSeek-V4: sqrt(softplus) scores, selection on score + bias, renormalised, scaled
    "deepseek_v4": dict(E=64, k=6, scoring="sqrt_softplus", order="score_topk", norm_topk=True,
                        scale=1.5, has_bias=True),
    "sqrt_softplus_topk": dict(E=16, k=2, scoring="sqrt_softplus", order="topk_score",
                               norm_topk=False, has_bias=False),
}
ROUTER_H = 256


def _router(cfg: dict, dtype: str) -> Kernel:
    c = {"scale": 1.0, "n_groups": 1, "topk_groups": 1, "group_score": "max",
         "logit_bias": False, **cfg}
    return C.router(ROUTER_H, c["E"], c["k"], c["scoring"], c["order"], c["norm_topk"],
                    c["scale"], c["has_bias"], c["n_groups"], c["topk_groups"],
                    c["group_score"], dtype, logit_bias=c["logit_bias"])


GMMS = {  # name: (E, N, K, block_m, top_k, gather, activation, bias)
    "up": (8, 128, 64, 64, 2, True, "silu_mul", False),
    "up16": (8, 128, 64, 16, 2, True, "gelu_mul", False),
    "down": (8, 64, 128, 64, 2, False, "none", False),
    "swiglu": (8, 64, 64, 16, 2, True, "clamped_swiglu_mul", True),
    # Switch-like top-1, N = 48: no 4-warp tensor-core block divides it, one warp per tile
    "narrow": (8, 48, 32, 16, 1, True, "relu", False),
    "relu2": (8, 64, 32, 16, 2, True, "relu2", True),  # squared ReLU, non-gated with biases
    # silu(min(g, L)) * clamp(u, -L, L): no alpha, no +1, a limit the values reach
    "swiglu_plain": (8, 64, 64, 16, 2, True, "clamped_swiglu_mul", False),
}
GMM_ACT = {"swiglu_plain": dict(alpha=1.0, limit=0.5, offset=0.0)}  # clamped_swiglu constants


def kernels(dtype: str) -> list[Kernel]:
    ks = [named(_router(cfg, dtype), f"router_{n}") for n, cfg in ROUTERS.items()]
    ks += [named(C.grouped_matmul(*g[:7], dtype, bias=g[7], **GMM_ACT.get(n, {})), f"gmm_{n}")
           for n, g in GMMS.items()]
    ks += [
        named(C.topk(("T", 8), 2, dtype), "topk8"),
        named(C.topk(("T", 300), 7, dtype), "topk300"),
        named(C.linear("T", 256, 128, dtype, True), "linear"),
        # N = 1 (Qwen2-MoE's shared-expert gate) and an odd N: one-column SIMT tiles
        named(C.linear("T", 256, 1, dtype, False), "linear_n1"),
        named(C.linear("T", 256, 3, dtype, True), "linear_n3"),
        named(C.combine(64, 2, dtype), "combine"),
        named(C.permute(64, 2, dtype), "permute"),
        named(C.unpermute(64, 2, dtype), "unpermute"),
        named(C.elementwise_unary("silu", ("T", 256), dtype), "silu"),
        named(C.elementwise_unary("softplus", ("T", 256), dtype), "softplus"),
        named(C.elementwise_unary("gelu", ("T", 256), dtype, approximate="tanh"), "gelu"),
        named(C.elementwise_binary("mul", ("T", 256), (256,), dtype), "mul"),
        named(C.softmax(("T", 256), -1, dtype), "softmax_last"),
        named(C.softmax(("T", 6, 40), 1, dtype), "softmax_mid"),
        named(C.reduce("mean", ("T", 256), 1, True, dtype), "mean_last"),
        named(C.reduce("sum", ("T", 6, 40), 1, False, dtype), "sum_mid"),
        named(C.rmsnorm(("T", 256), 1e-6, dtype), "rmsnorm"),
        named(C.layernorm(("T", 256), 1e-5, dtype), "layernorm"),
        # rows shorter than a warp (Qwen3's per-head q/k norm: thread per row), a static dim
        # outside the token dim, and one-element rows
        named(C.rmsnorm(("T", 4, 16), 1e-6, dtype), "rmsnorm_heads"),
        named(C.softmax((2, "T", 12), -1, dtype), "softmax_small"),
        named(C.layernorm(("T", 1), 1e-5, dtype), "layernorm_one"),
    ]
    if dtype == "float16":  # dtype-free, and the float32 (SIMT) GEMMs
        ks += [named(C.align(8, 2, 16), "align_small"), named(C.align(64, 6, 64), "align_big")]
        # identity experts (LongCat-Flash): ids >= E left out of the layout, w * x combined
        ks += [named(C.align(6, 2, 16, identity=True), "align_identity"),
               named(C.combine(64, 2, dtype, identity=True), "combine_identity")]
        ks += [named(C.grouped_matmul(*g[:7], "float32", bias=g[7]), f"gmm_{n}")
               for n, g in GMMS.items() if n in ("up", "down")]
    return ks


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("emu")
    cache: dict[str, object] = {}

    def get(dtype: str):
        if dtype not in cache:
            cache[dtype] = emulate(kernels(dtype), workdir)
        return cache[dtype]

    return get


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("tokens", [0, 1, 37, 300])
@pytest.mark.parametrize("name,e,k,bm", [("align_small", 8, 2, 16), ("align_big", 64, 6, 64)])
def test_align(emu, name, e, k, bm, tokens):
    ids = routing(tokens, e, k, tokens)
    want = align_ref(ids, e, bm)
    got = [np.zeros_like(w) for w in want]
    emu("float16")[name](ids, *got)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name,n,k", [("topk8", 8, 2), ("topk300", 300, 7)])
@pytest.mark.parametrize("rows", [0, 33])
def test_topk(emu, dtype, name, n, k, rows):
    x = np.random.default_rng(rows).standard_normal((rows, n)).astype(NP[dtype])
    x[:, 1] = x[:, 0]  # a tie: the lower index comes first
    want_v, want_i = ref("core.topk", [x], k=k)
    got_v, got_i = np.zeros((rows, k), NP[dtype]), np.zeros((rows, k), np.int32)
    emu(dtype)[f"{name}_{dtype}"](x, got_v, got_i)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_array_equal(got_v.astype(np.float32), want_v.astype(np.float32))


def test_topk_nan_ranks_last(emu):
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float16)
    x[0, [1, 4]] = np.nan
    x[1, :] = np.nan
    x[2, 3] = -np.inf
    want_v, want_i = ref("core.topk", [x], k=2)
    got_v, got_i = np.zeros((5, 2), np.float16), np.zeros((5, 2), np.int32)
    emu("float16")["topk8_float16"](x, got_v, got_i)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_array_equal(got_v, want_v)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("cfg", list(ROUTERS))
@pytest.mark.parametrize("tokens", [0, 6])
def test_router(emu, dtype, cfg, tokens):
    c = ROUTERS[cfg]
    rng = np.random.default_rng(tokens)
    xs = [rng.standard_normal((tokens, ROUTER_H)), rng.standard_normal((c["E"], ROUTER_H)) / 8]
    xs = [a.astype(NP[dtype]) for a in xs]  # biases stay float32 (the kernel casts them)
    xs += [(rng.standard_normal(c["E"]) / 4).astype(np.float32)
           for _ in range(int(c.get("logit_bias", False)) + int(c["has_bias"]))]
    attrs = {a: v for a, v in c.items() if a not in ("E", "has_bias")}
    want_w, want_i = ref("moe.router", xs, select_bias=c["has_bias"], **attrs)
    got_w = np.zeros((tokens, c["k"]), np.float32)
    got_i = np.zeros((tokens, c["k"]), np.int32)
    emu(dtype)[f"router_{cfg}_{dtype}"](*xs, got_w, got_i)
    np.testing.assert_array_equal(got_i, want_i)
    close(got_w, want_w, 1e-4)


@pytest.mark.parametrize("dtype,name", [(d, n) for d in HALF for n in GMMS]
                         + [("float32", "up"), ("float32", "down")])
@pytest.mark.parametrize("tokens", [0, 37])
def test_grouped_matmul(emu, dtype, name, tokens):
    e, n, kd, bm, top, gather, act, bias = GMMS[name]
    rng = np.random.default_rng(tokens)
    sid, eid, _ = align_ref(routing(tokens, e, top, tokens), e, bm)
    nw = 2 if act.endswith("_mul") else 1
    x = rng.standard_normal((tokens if gather else len(sid), kd)).astype(NP[dtype])
    ws = [(rng.standard_normal((e, n, kd)) / 8).astype(NP[dtype]) for _ in range(nw)]
    bs = [rng.standard_normal((e, n)).astype(NP[dtype]) for _ in range(nw if bias else 0)]
    want = ref("moe.grouped_matmul", [x, *ws, *bs, sid, eid], block_m=bm, top_k=top,
               gather=gather, activation=act, bias=bias, **GMM_ACT.get(name, {}))[0]
    got = np.zeros((len(sid), n), NP[dtype])
    emu("float16" if dtype == "float32" else dtype)[f"gmm_{name}_{dtype}"](x, *ws, *bs, sid, eid,
                                                                           got)
    rows = np.repeat(eid >= 0, bm)  # rows of unused tiles are unspecified
    if gather:  # and so are padding rows (the reference writes 0, the kernel act(bias))
        rows &= sid < tokens * top
    close(got[rows], want[rows])


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("tokens", [0, 7])
def test_dense_ops(emu, dtype, tokens):
    rng = np.random.default_rng(tokens)
    x = rng.standard_normal((tokens, 256)).astype(NP[dtype])
    x3 = rng.standard_normal((tokens, 6, 40)).astype(NP[dtype])
    w, b = (rng.standard_normal(256).astype(NP[dtype]) for _ in range(2))
    lw = (rng.standard_normal((128, 256)) / 16).astype(NP[dtype])
    lb = rng.standard_normal(128).astype(NP[dtype])
    cases = [
        ("silu", [x], "core.silu", {}), ("gelu", [x], "core.gelu", {"approximate": "tanh"}),
        ("softplus", [x * 8], "core.softplus", {}),
        ("mul", [x, w], "core.mul", {}), ("softmax_last", [x], "core.softmax", {"axis": -1}),
        ("softmax_mid", [x3], "core.softmax", {"axis": 1}),
        ("mean_last", [x], "core.mean", {"axis": 1, "keepdim": True}),
        ("sum_mid", [x3], "core.sum", {"axis": 1, "keepdim": False}),
        ("rmsnorm", [x, w], "core.rmsnorm", {"eps": 1e-6}),
        ("layernorm", [x, w, b], "core.layernorm", {"eps": 1e-5}),
        ("linear", [x, lw, lb], "core.linear", {}),
        ("linear_n1", [x, lw[:1]], "core.linear", {}),
        ("linear_n3", [x, lw[:3], lb[:3]], "core.linear", {}),
        ("rmsnorm_heads", [x[:, :64].reshape(tokens, 4, 16), w[:16]], "core.rmsnorm",
         {"eps": 1e-6}),
        ("softmax_small", [np.stack([x[:, :12], x[:, 12:24]])], "core.softmax", {"axis": -1}),
        ("layernorm_one", [x[:, :1], w[:1], b[:1]], "core.layernorm", {"eps": 1e-5}),
    ]
    for name, xs, op, attrs in cases:
        want = ref(op, xs, **attrs)[0]
        got = np.zeros(want.shape, NP[dtype])
        emu(dtype)[f"{name}_{dtype}"](*xs, got)
        close(got, want)


@pytest.mark.parametrize("tokens", [0, 9])
def test_permute(emu, tokens):
    rng = np.random.default_rng(tokens)
    sid, eid, _ = align_ref(routing(tokens, 8, 2, tokens), 8, 16)
    x = rng.standard_normal((tokens, 64)).astype(np.float16)
    got = np.ones((len(sid), 64), np.float16)
    emu("float16")["permute_float16"](x, sid, got)
    close(got, ref("moe.permute", [x, sid], top_k=2)[0])  # padding rows: zeros in both


@pytest.mark.parametrize("tokens", [0, 9])
def test_unpermute(emu, tokens):
    rng = np.random.default_rng(tokens)
    sid, _, srow = align_ref(routing(tokens, 8, 2, tokens), 8, 16)
    y = rng.standard_normal((len(sid), 64)).astype(np.float16)
    got = np.ones((tokens, 2, 64), np.float16)
    emu("float16")["unpermute_float16"](y, srow, got)
    close(got, ref("moe.unpermute", [y, srow])[0])


@pytest.mark.parametrize("tokens", [0, 1, 37, 300])
@pytest.mark.parametrize("skew", [0.3, 5.0])
def test_align_and_combine_identity_experts(emu, tokens, skew):
    """6 FFN experts and 2 identity experts: the identity ids are left out of the layout
    (slot_row -1) and the combine adds w * x for them; Dirichlet(0.3) skewed routing, or
    near-uniform."""
    rng = np.random.default_rng(tokens)
    p = rng.dirichlet(np.ones(8) * skew)
    ids = np.stack([rng.choice(8, 2, replace=False, p=p) for _ in range(tokens)]).astype(
        np.int32) if tokens else np.zeros((0, 2), np.int32)
    want = align_ref(ids, 6, 16, identity_experts=2)
    got = [np.zeros_like(w) for w in want]
    emu("float16")["align_identity"](ids, *got)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
    srow = want[2]
    y = rng.standard_normal((len(want[0]), 64)).astype(np.float16)
    x = rng.standard_normal((tokens, 64)).astype(np.float16)
    wts = rng.random((tokens, 2)).astype(np.float32)
    out = np.zeros((tokens, 64), np.float16)
    emu("float16")["combine_identity_float16"](y, wts, srow, x, out)
    close(out, ref("moe.combine", [y, wts, srow, x])[0])


@pytest.mark.parametrize("tokens", [0, 9])
def test_combine(emu, tokens):
    rng = np.random.default_rng(tokens)
    sid, eid, srow = align_ref(routing(tokens, 8, 2, tokens), 8, 16)
    y = rng.standard_normal((len(sid), 64)).astype(np.float16)
    wts = rng.random((tokens, 2)).astype(np.float32)
    got = np.zeros((tokens, 64), np.float16)
    emu("float16")["combine_float16"](y, wts, srow, got)
    close(got, ref("moe.combine", [y, wts, srow])[0])


@pytest.mark.parametrize("order", [1, pytest.param(-1, marks=pytest.mark.slow)])
def test_warp_serial_orders(emu, order):
    """One warp at a time between barriers, forwards and backwards: a missing __syncthreads
    (a warp reading shared memory another warp has not written yet, or overwriting what
    another still reads) gives a wrong result in at least one of the two orders."""
    for dtype in HALF:
        emu(dtype).order(order)
    try:
        for name in GMMS:
            test_grouped_matmul(emu, "float16", name, 37)
        test_grouped_matmul(emu, "bfloat16", "up", 37)
        test_align(emu, "align_big", 64, 6, 64, 300)
        test_router(emu, "bfloat16", "deepseek_v3", 6)
        test_dense_ops(emu, "float16", 7)
    finally:
        for dtype in HALF:
            emu(dtype).order(0)


ODD_GMMS = [  # shapes off the main path: SIMT fallbacks, 4-warp-row tiles, short K, odd N
    (4, 100, 40, 8, 2, True, "silu_mul", "float16"),
    (4, 96, 64, 256, 2, True, "silu_mul", "bfloat16"),
    (4, 64, 48, 32, 1, False, "relu", "float16"),
    (4, 128, 64, 128, 2, True, "gelu_tanh_mul", "bfloat16"),
    (4, 64, 64, 256, 2, False, "none", "float32"),
    (4, 30, 64, 16, 2, True, "silu_mul", "float16"),
    (4, 64, 16, 64, 2, True, "silu_mul", "float16"),
]


@pytest.mark.slow
@pytest.mark.parametrize("order", [0, -1])
def test_grouped_matmul_odd_configs(tmp_path, order):
    kernels = [named(C.grouped_matmul(*c), f"odd{i}") for i, c in enumerate(ODD_GMMS)]
    em = emulate(kernels, tmp_path)
    em.order(order)
    for kern, (e, n, kd, bm, top, gather, act, dtype) in zip(kernels, ODD_GMMS, strict=True):
        rng = np.random.default_rng(bm)
        sid, eid, _ = align_ref(routing(150, e, top, bm), e, bm)
        x = rng.standard_normal((150 if gather else len(sid), kd)).astype(NP[dtype])
        ws = [(rng.standard_normal((e, n, kd)) / 8).astype(NP[dtype])
              for _ in range(2 if act.endswith("_mul") else 1)]
        want = ref("moe.grouped_matmul", [x, *ws, sid, eid], block_m=bm, top_k=top,
                   gather=gather, activation=act)[0]
        got = np.zeros((len(sid), n), NP[dtype])
        em[kern.name](x, *ws, sid, eid, got)
        rows = np.repeat(eid >= 0, bm)
        close(got[rows], want[rows])
    em.order(0)
