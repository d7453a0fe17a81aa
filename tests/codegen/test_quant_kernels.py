"""The quantised grouped GEMM kernel (int8 / int4, dequantised inside the GEMM) against the numpy
reference of moe.grouped_matmul_q (which dequantises, then runs the fp32 reference)."""

from __future__ import annotations

import numpy as np
import pytest

from moec.codegen.kernels.grouped_matmul_quant import grouped_matmul_quant
from moec.errors import CodegenError
from moec.ir.moe_ops import align_ref
from moec.ir.quant_ops import quantize
from moec.ir.registry import get_op

TOKENS = [0, 1, 7, 64]
# (E, N, K, block_m, top_k, gather, activation, bias, bits, group_size)
CASES = [
    (4, 40, 48, 16, 2, True, "silu_mul", False, 8, 128),    # N not a multiple of NR
    (4, 24, 40, 16, 2, False, "none", True, 8, 128),
    (4, 40, 48, 16, 2, True, "silu_mul", False, 8, 16),    # int8, 3 groups along K
    (4, 24, 40, 16, 2, False, "none", False, 8, 16),       # int8, last group short
    (4, 40, 300, 16, 2, True, "silu_mul", False, 4, 128),   # 3 groups, last one short
    (4, 16, 64, 8, 2, False, "none", True, 4, 32),
]
rng = np.random.default_rng(3)


def make_ids(t, e, k, routing):
    if routing == "uniform":
        return np.argsort(rng.random((t, e)), axis=1)[:, :k].astype(np.int32)
    return np.tile((np.arange(k, dtype=np.int32) * 3 + 1) % e, (t, 1))  # skewed


@pytest.fixture(scope="module")
def lib(kernel_lib):
    ks = {c: grouped_matmul_quant(*c[:7], bits=c[8], group_size=c[9], bias=c[7]) for c in CASES}
    out = kernel_lib(ks.values())
    out.k = ks
    return out


@pytest.mark.parametrize("t", TOKENS)
@pytest.mark.parametrize("routing", ["uniform", "skewed"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[8]}_{c[6]}_K{c[2]}")
def test_grouped_matmul_quant(lib, case, routing, t):
    e, n, k, bm, top_k, gather, act, bias, bits, gs = case
    ids = make_ids(t, e, top_k, routing)
    sids, tiles, _ = align_ref(ids, e, bm)
    rows = t if gather else len(sids)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    nw = 2 if act.endswith("_mul") else 1
    qs = [p for _ in range(nw)
          for p in quantize(rng.standard_normal((e, n, k)).astype(np.float32), bits, gs)]
    bs = [rng.standard_normal((e, n)).astype(np.float32) for _ in range(nw)] if bias else []
    (out,) = lib(lib.k[case], x, *qs, *bs, sids, tiles, outs=[((len(sids), n), "float32")],
                 fill=np.nan)
    attrs = get_op("moe.grouped_matmul_q").check_attrs(
        {"block_m": bm, "top_k": top_k, "gather": gather, "activation": act, "bias": bias,
         "bits": bits, "group_size": gs})
    (ref,) = get_op("moe.grouped_matmul_q").reference([x, *qs, *bs, sids, tiles], attrs)
    r = np.arange(len(sids))
    used = (np.repeat(tiles, bm) >= 0) & (sids < t * top_k) if len(sids) else r < 0
    np.testing.assert_allclose(out[used], ref[used], rtol=1e-4, atol=1e-3)


# Decode path: 9 (gated, NR=8) or 5 (NR=16) panels in blocks of 4, so the last panel block is
# partial, and N=70 leaves a partial last panel; K=300 with groups of 128 ends on a short group.
# block_m == MR, so every row of a used tile is written.
GEMV_CASES = [
    (16, 70, 300, 4, 2, True, "silu_mul", True, 8, 128),
    (16, 70, 300, 4, 2, True, "silu_mul", False, 4, 128),
    (16, 70, 300, 4, 2, False, "none", True, 4, 64),
]
GEMV_ROWS = [0, 1, 2, 3]


@pytest.fixture(scope="module")
def gemv_lib(kernel_lib):
    ks = {(c, gv): grouped_matmul_quant(*c[:7], bits=c[8], group_size=c[9], bias=c[7],
                                        gemv_rows=gv)
          for c in GEMV_CASES for gv in GEMV_ROWS}
    out = kernel_lib(ks.values())
    out.k = ks
    return out


@pytest.mark.parametrize("t", [1, 2, 3, 9])
@pytest.mark.parametrize("gemv_rows", GEMV_ROWS)
@pytest.mark.parametrize("case", GEMV_CASES, ids=lambda c: f"b{c[8]}_{c[6]}")
def test_grouped_matmul_quant_decode_path(gemv_lib, case, gemv_rows, t):
    """Tiles of at most gemv_rows rows take the row-at-a-time decode path, the others the
    MR-row GEMM path (t=3, 9 mix both in one call): the same values either way, and the same
    rows written (a decode tile's padding rows of group 0 repeat its first row)."""
    e, n, k, bm, top_k, gather, act, bias, bits, gs = case
    ids = make_ids(t, e, top_k, "uniform")
    sids, tiles, _ = align_ref(ids, e, bm)
    x = rng.standard_normal((t if gather else len(sids), k)).astype(np.float32)
    nw = 2 if act.endswith("_mul") else 1
    qs = [p for _ in range(nw)
          for p in quantize(rng.standard_normal((e, n, k)).astype(np.float32), bits, gs)]
    bs = [rng.standard_normal((e, n)).astype(np.float32) for _ in range(nw)] if bias else []
    (out,) = gemv_lib(gemv_lib.k[(case, gemv_rows)], x, *qs, *bs, sids, tiles,
                      outs=[((len(sids), n), "float32")], fill=np.nan)
    attrs = get_op("moe.grouped_matmul_q").check_attrs(
        {"block_m": bm, "top_k": top_k, "gather": gather, "activation": act, "bias": bias,
         "bits": bits, "group_size": gs})
    (ref,) = get_op("moe.grouped_matmul_q").reference([x, *qs, *bs, sids, tiles], attrs)
    used = (np.repeat(tiles, bm) >= 0) & (sids < t * top_k)
    np.testing.assert_allclose(out[used], ref[used], rtol=1e-4, atol=1e-3)
    written = ~np.isnan(out).all(axis=1)
    np.testing.assert_array_equal(written, np.repeat(tiles >= 0, bm))
    assert np.isfinite(out[written]).all()


def test_grouped_matmul_quant_gemv_rows_name():
    """gemv_rows is capped at MR and block_m - 1, and named only when passed."""
    base = grouped_matmul_quant(4, 16, 32, 16, 2, True, "silu_mul")
    assert "gv" not in base.name
    assert grouped_matmul_quant(4, 16, 32, 16, 2, True, "silu_mul", gemv_rows=9).name.endswith(
        "gv4")
    assert grouped_matmul_quant(4, 16, 32, 2, 2, True, "silu_mul", gemv_rows=2).name.endswith(
        "gv1")


def test_grouped_matmul_quant_rejects_odd_k_int4():
    with pytest.raises(CodegenError):
        grouped_matmul_quant(4, 8, 7, 16, 2, True, bits=4)
