"""The AVX-512 shapes of the kernels (16 f32 lanes, 32-column GEMM panels), checked on any x86.

Kernels pick their vector width from the host (`base.vector_lanes`). Here the host is made to
look 512-bit wide while building; LLVM legalises the 16-lane vectors into pairs of 8-lane ones
on AVX2, so the tile shapes and tails of the AVX-512 variants are verified numerically even on
this machine. Tolerance as in test_kernels.py: rtol=atol=1e-4 against float64 numpy.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from moec.codegen.kernels import base, elementwise_unary, grouped_matmul, linear, router, softmax

rng = np.random.default_rng(512)


@pytest.fixture(scope="module")
def lib(kernel_lib):
    mp = pytest.MonkeyPatch()
    mp.setattr(base, "_vector_bits", lambda: 512)
    try:
        assert base.vector_lanes("float32") == 16
        ks = {
            "linear": linear("T", 72, 70, "float32", True),
            "gmm_up": grouped_matmul(4, 40, 48, 16, 2, True, "silu_mul"),
            "gmm": grouped_matmul(4, 70, 40, 16, 2, False, "none"),
            "router": router(40, 8, 2, norm_topk=True),
            "softmax": softmax(("T", 70)),
            "silu": elementwise_unary("silu", ("T", 70)),
        }
        lib = kernel_lib(ks.values())
    finally:
        mp.undo()
    lib.k = ks
    return lib


def _align(ids, e, bm):
    flat = ids.reshape(-1)
    tl = flat.size // bm + e
    sorted_ids, tile_expert = np.full(tl * bm, flat.size, np.int32), np.full(tl, -1, np.int32)
    row = tile = 0
    for ex in range(e):
        slots = np.nonzero(flat == ex)[0]
        sorted_ids[row:row + len(slots)] = slots
        nt = -(-len(slots) // bm)
        tile_expert[tile:tile + nt] = ex
        row, tile = row + nt * bm, tile + nt
    return sorted_ids, tile_expert


@pytest.mark.parametrize("t", [1, 7, 64])
def test_wide_dense(lib, t):
    x = rng.standard_normal((t, 72)).astype(np.float32)
    w = (rng.standard_normal((70, 72)) / math.sqrt(72)).astype(np.float32)
    b = rng.standard_normal(70).astype(np.float32)
    (y,) = lib(lib.k["linear"], x, w, b, outs=[((t, 70), "float32")])
    np.testing.assert_allclose(y, x.astype(np.float64) @ w.T + b, rtol=1e-4, atol=1e-4)
    z = rng.standard_normal((t, 70)).astype(np.float32)
    (s,) = lib(lib.k["softmax"], z, outs=[(z.shape, "float32")])
    e = np.exp(z - z.max(-1, keepdims=True))
    np.testing.assert_allclose(s, e / e.sum(-1, keepdims=True), rtol=1e-4, atol=1e-4)
    (u,) = lib(lib.k["silu"], z, outs=[(z.shape, "float32")])
    np.testing.assert_allclose(u, z / (1 + np.exp(-z.astype(np.float64))), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("t", [1, 7, 64])
def test_wide_moe(lib, t):
    e, k, bm = 4, 2, 16
    ids = np.argsort(rng.random((t, e)), axis=1)[:, :k].astype(np.int32)
    sorted_ids, tile_expert = _align(ids, e, bm)
    used = np.repeat(tile_expert >= 0, bm) & (sorted_ids < t * k)
    rows = np.nonzero(used)[0]
    ex = np.repeat(tile_expert, bm)[rows]
    x = rng.standard_normal((t, 48)).astype(np.float32)
    wg, wu = (rng.standard_normal((2, e, 40, 48)) / math.sqrt(48)).astype(np.float32)
    (h,) = lib(lib.k["gmm_up"], x, wg, wu, sorted_ids, tile_expert,
               outs=[((len(sorted_ids), 40), "float32")])
    v = x[sorted_ids[rows] // k].astype(np.float64)
    g, u = np.einsum("rk,rnk->rn", v, wg[ex]), np.einsum("rk,rnk->rn", v, wu[ex])
    np.testing.assert_allclose(h[used], g / (1 + np.exp(-g)) * u, rtol=1e-4, atol=1e-4)
    xs = rng.standard_normal((len(sorted_ids), 40)).astype(np.float32)
    wd = (rng.standard_normal((e, 70, 40)) / math.sqrt(40)).astype(np.float32)
    (y,) = lib(lib.k["gmm"], xs, wd, sorted_ids, tile_expert,
               outs=[((len(sorted_ids), 70), "float32")])
    ref = np.einsum("rk,rnk->rn", xs[rows].astype(np.float64), wd[ex])
    np.testing.assert_allclose(y[used], ref, rtol=1e-4, atol=1e-4)
    xr = rng.standard_normal((t, 40)).astype(np.float32)
    wr = (rng.standard_normal((8, 40)) / math.sqrt(40)).astype(np.float32)
    wts, top = lib(lib.k["router"], xr, wr, outs=[((t, 2), "float32"), ((t, 2), "int32")])
    logits = xr.astype(np.float64) @ wr.T
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ref_ids = np.argsort(-p, axis=-1, kind="stable")[:, :2]
    ref_w = np.take_along_axis(p, ref_ids, -1)
    np.testing.assert_array_equal(top, ref_ids)
    np.testing.assert_allclose(wts, ref_w / ref_w.sum(-1, keepdims=True), rtol=1e-4, atol=1e-4)
