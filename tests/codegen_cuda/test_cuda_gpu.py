"""Numerics of the CUDA kernels on a GPU, against moec's reference ops (fp16/bf16: rel err
<= 1e-2; ids, routing layout: exact). Skipped without a CUDA device."""

from __future__ import annotations

import numpy as np
import pytest
import torch  # a hard dependency of moec
import tvm

from moec.codegen import cuda as C
from moec.ir.moe_ops import align_ref
from moec.ir.registry import get_op

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

TORCH_DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
            "int32": torch.int32}


def ref(op: str, xs: list[np.ndarray], **attrs) -> list[np.ndarray]:
    d = get_op(op)
    return d.reference(xs, d.check_attrs(attrs))


def to_np(t) -> np.ndarray:
    return t.float().cpu().numpy() if t.dtype == torch.bfloat16 else t.cpu().numpy()


def dev(a: np.ndarray, dtype: str | None = None):
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.to(TORCH_DT[dtype or str(a.dtype)]).cuda()


def run(kernel: C.Kernel, inputs: list, outputs: list[tuple[tuple, str]]) -> list:
    ex = C.build_cuda(tvm.IRModule({kernel.name: kernel.func}))
    outs = [torch.empty(s, dtype=TORCH_DT[d], device="cuda") for s, d in outputs]
    ex[kernel.name](*inputs, *outs)
    torch.cuda.synchronize()
    return outs


def close(got, want: np.ndarray, tol: float = 1e-2) -> None:
    np.testing.assert_allclose(to_np(got).astype(np.float32), want.astype(np.float32),
                               rtol=tol, atol=tol)


def routing(t: int, e: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(e) * 0.3)
    if t == 0:
        return np.zeros((0, k), np.int32)
    return np.stack([rng.choice(e, k, replace=False, p=p) for _ in range(t)]).astype(np.int32)


@pytest.mark.parametrize("tokens", [0, 1, 37, 300])
@pytest.mark.parametrize("e,k,bm", [(8, 2, 16), (64, 6, 64)])
def test_align(tokens, e, k, bm):
    ids = routing(tokens, e, k, tokens)
    want = align_ref(ids, e, bm)
    got = run(C.align(e, k, bm), [dev(ids)], [(want[0].shape, "int32"),
                                               (want[1].shape, "int32"), ((tokens, k), "int32")])
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(to_np(g), w)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("act,gather,bias", [("silu_mul", True, False), ("none", False, False),
                                             ("gelu_mul", True, False),
                                             ("clamped_swiglu_mul", True, True)])
@pytest.mark.parametrize("tokens,bm", [(0, 64), (1, 16), (37, 64), (300, 64), (300, 16)])
def test_grouped_matmul(dtype, act, gather, bias, tokens, bm):
    e, n, kd, top = 8, 256, 512, 2
    rng = np.random.default_rng(tokens)
    sid, eid, _ = align_ref(routing(tokens, e, top, tokens), e, bm)
    nw = 2 if act.endswith("_mul") else 1
    x = rng.standard_normal((tokens if gather else len(sid), kd)).astype(np.float32)
    ws = [(rng.standard_normal((e, n, kd)) / 16).astype(np.float32) for _ in range(nw)]
    bs = [rng.standard_normal((e, n)).astype(np.float32) for _ in range(nw if bias else 0)]
    xr = [to_np(dev(a, dtype)) for a in (x, *ws, *bs)]  # the inputs the kernel sees
    want = ref("moe.grouped_matmul", [*xr, sid, eid], block_m=bm, top_k=top, gather=gather,
               activation=act, bias=bias)[0]
    (got,) = run(C.grouped_matmul(e, n, kd, bm, top, gather, act, dtype, bias=bias),
                 [*(dev(a, dtype) for a in xr), dev(sid), dev(eid)], [((len(sid), n), dtype)])
    rows = np.repeat(eid >= 0, bm)  # rows of unused tiles are unspecified,
    if gather:  # and so are padding rows
        rows &= sid < tokens * top
    close(got[torch.from_numpy(rows).cuda()], want[rows])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("m", [0, 3, 130])
def test_linear(dtype, m):
    rng = np.random.default_rng(m)
    x, w = rng.standard_normal((m, 256)), rng.standard_normal((128, 256)) / 16
    b = rng.standard_normal(128)
    want = ref("core.linear", [x.astype(np.float32), w.astype(np.float32),
                               b.astype(np.float32)])[0]
    (got,) = run(C.linear("T", 256, 128, dtype, True), [dev(x, dtype), dev(w, dtype),
                                                         dev(b, dtype)], [((m, 128), dtype)])
    close(got, want, 3e-2 if dtype == "bfloat16" else 1e-2)


ROUTERS = [
    dict(E=8, k=2, scoring="softmax", order="score_topk", norm_topk=True, scale=1.0,
         has_bias=False, n_groups=1, topk_groups=1, group_score="max"),
    dict(E=8, k=2, scoring="softmax", order="topk_score", norm_topk=False, scale=1.0,
         has_bias=False, n_groups=1, topk_groups=1, group_score="max"),
    dict(E=64, k=6, scoring="softmax", order="score_topk", norm_topk=False, scale=1.0,
         has_bias=False, n_groups=1, topk_groups=1, group_score="max"),
    dict(E=256, k=8, scoring="sigmoid", order="score_topk", norm_topk=True, scale=2.5,
         has_bias=True, n_groups=8, topk_groups=4, group_score="top2_sum"),
    dict(E=160, k=6, scoring="softmax", order="score_topk", norm_topk=False, scale=16.0,
         has_bias=False, n_groups=8, topk_groups=3, group_score="max"),
    dict(E=16, k=1, scoring="sigmoid", order="topk_score", norm_topk=False, scale=1.0,
         has_bias=False, n_groups=1, topk_groups=1, group_score="max"),
]


@pytest.mark.parametrize("cfg", ROUTERS, ids=lambda c: f"E{c['E']}k{c['k']}{c['scoring']}")
@pytest.mark.parametrize("tokens", [0, 1, 77])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_router(cfg, tokens, dtype):
    h = 512
    rng = np.random.default_rng(tokens)
    x = rng.standard_normal((tokens, h))
    w = rng.standard_normal((cfg["E"], h)) / 8
    # the reference sees the same rounded inputs as the kernel; biases stay float32
    xr = [to_np(dev(a, dtype)) for a in (x, w)]
    xr += [(rng.standard_normal(cfg["E"]) / 4).astype(np.float32)] if cfg["has_bias"] else []
    attrs = {a: cfg[a] for a in cfg if a not in ("E", "has_bias")}
    want_w, want_i = ref("moe.router", xr, select_bias=cfg["has_bias"], **attrs)
    kern = C.router(h, cfg["E"], dtype=dtype, has_bias=cfg["has_bias"], **attrs)
    args = [dev(a, dtype) for a in xr[:2]] + [dev(a) for a in xr[2:]]
    got_w, got_i = run(kern, args, [((tokens, cfg["k"]), "float32"),
                                    ((tokens, cfg["k"]), "int32")])
    np.testing.assert_array_equal(to_np(got_i), want_i)
    close(got_w, want_w, 1e-3)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("rows,n,k", [(0, 8, 2), (33, 8, 2), (5, 300, 7)])
def test_topk(dtype, rows, n, k):
    x = to_np(dev(np.random.default_rng(rows).standard_normal((rows, n)), dtype))
    x[:, 1] = x[:, 0]  # a tie: the lower index first
    want_v, want_i = ref("core.topk", [x], k=k)
    got_v, got_i = run(C.topk(("T", n), k, dtype), [dev(x, dtype)],
                       [((rows, k), dtype), ((rows, k), "int32")])
    np.testing.assert_array_equal(to_np(got_i), want_i)
    close(got_v, want_v)


@pytest.mark.parametrize("tokens", [0, 9])
def test_permute(tokens):
    rng = np.random.default_rng(tokens)
    sid, _, _ = align_ref(routing(tokens, 8, 2, tokens), 8, 16)
    x = rng.standard_normal((tokens, 64)).astype(np.float16)
    (got,) = run(C.permute(64, 2, "float16"), [dev(x), dev(sid)], [((len(sid), 64), "float16")])
    close(got, ref("moe.permute", [x, sid], top_k=2)[0])


@pytest.mark.parametrize("tokens", [0, 9])
def test_combine(tokens):
    rng = np.random.default_rng(tokens)
    sid, eid, srow = align_ref(routing(tokens, 8, 2, tokens), 8, 16)
    y = rng.standard_normal((len(sid), 64))
    wts = rng.random((tokens, 2)).astype(np.float32)
    want = ref("moe.combine", [y.astype(np.float32), wts, srow])[0]
    (got,) = run(C.combine(64, 2, "float16"), [dev(y, "float16"), dev(wts), dev(srow)],
                 [((tokens, 64), "float16")])
    close(got, want)


@pytest.mark.parametrize("tokens", [0, 7])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dense_ops(tokens, dtype):
    rng = np.random.default_rng(5)
    x = to_np(dev(rng.standard_normal((tokens, 256)), dtype))
    w, b = (to_np(dev(rng.standard_normal(256), dtype)) for _ in range(2))
    cases = [
        (C.elementwise_unary("silu", ("T", 256), dtype), [x], "core.silu", {}),
        (C.elementwise_binary("mul", ("T", 256), (256,), dtype), [x, w], "core.mul", {}),
        (C.softmax(("T", 256), -1, dtype), [x], "core.softmax", {"axis": -1}),
        (C.reduce("mean", ("T", 256), 1, True, dtype), [x], "core.mean",
         {"axis": 1, "keepdim": True}),
        (C.rmsnorm(("T", 256), 1e-6, dtype), [x, w], "core.rmsnorm", {"eps": 1e-6}),
        (C.layernorm(("T", 256), 1e-5, dtype), [x, w, b], "core.layernorm", {"eps": 1e-5}),
    ]
    for kern, xs, op, attrs in cases:
        want = ref(op, xs, **attrs)[0]
        (got,) = run(kern, [dev(a, dtype) for a in xs], [(want.shape, dtype)])
        close(got, want)


def test_moe_block_end_to_end():
    """Relax VM: router -> align -> gate/up -> down -> combine vs the unfused moe.experts."""
    from .cases import K_TOP, E, H, I
    from .test_cuda_build import moe_block

    dtype = "float16"
    ex = C.build_cuda(moe_block(dtype))
    vm = tvm.relax.VirtualMachine(ex, tvm.cuda())
    rng = np.random.default_rng(0)
    for tokens in (0, 1, 50):
        x = rng.standard_normal((tokens, H)) / 4
        wr = rng.standard_normal((E, H)) / 16
        wg, wu = (rng.standard_normal((E, I, H)) / 32 for _ in range(2))
        wd = rng.standard_normal((E, H, I)) / 32
        args = [to_np(dev(a, dtype)) for a in (x, wr, wg, wu, wd)]
        out = vm["main"](*[dev(a, dtype) for a in args])
        weights, ids = ref("moe.router", args[:2], k=K_TOP, norm_topk=True)
        want = ref("moe.experts", [args[0], weights, ids, *args[2:]], activation="silu",
                   gated=True)[0]
        got = torch.from_dlpack(out) if not isinstance(out, torch.Tensor) else out
        close(got, want, 2e-2)
