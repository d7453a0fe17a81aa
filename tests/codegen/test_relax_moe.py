"""The kernels' calling contract from Relax: int64 symbolic dims and symbolic output sizes.

A whole gated MoE FFN (align -> grouped_matmul(gather, silu_mul) -> grouped_matmul -> combine)
is built as one Relax function over a symbolic token count T, with `relax.call_tir` output shapes
written as expressions of T (S = ((T*k)//block_m + E)*block_m), exported to a shared library,
reloaded, and run at several T against a per-token numpy loop (rtol=atol=1e-4).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import tvm
from tvm import relax, tirx

from moec.codegen.kernels import align, align_sizes, combine, grouped_matmul
from moec.codegen.target import host_target

E, H, INTER, K, BM = 4, 32, 48, 2, 8


def _build_ffn():
    ka = align(E, K, BM)
    kup = grouped_matmul(E, INTER, H, BM, K, True, "silu_mul")
    kdown = grouped_matmul(E, H, INTER, BM, K, False, "none")
    kc = combine(H, K)
    t = tirx.Var("T", "int64")
    tl, s = align_sizes(t, K, E, BM)
    f32, i32 = "float32", "int32"

    def packed(kern, i, n, kdim):
        shape = kern.arg_transforms[i](np.zeros((E, n, kdim), np.float32)).shape
        return relax.TensorType(shape, f32)

    x = relax.Var("x", relax.TensorType((t, H), f32))
    ids = relax.Var("ids", relax.TensorType((t, K), i32))
    wts = relax.Var("weights", relax.TensorType((t, K), f32))
    wg = relax.Var("w_gate", packed(kup, 1, INTER, H))
    wu = relax.Var("w_up", packed(kup, 2, INTER, H))
    wd = relax.Var("w_down", packed(kdown, 1, H, INTER))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, ids, wts, wg, wu, wd]):
        gv = {k.name: bb.add_func(k.func, k.name) for k in (ka, kup, kdown, kc)}
        with bb.dataflow():
            layout = bb.emit(relax.call_tir(gv[ka.name], [ids], [
                relax.TensorType((s,), i32), relax.TensorType((tl,), i32),
                relax.TensorType((t, K), i32)]))
            sorted_ids = bb.emit(relax.TupleGetItem(layout, 0))
            tile_expert = bb.emit(relax.TupleGetItem(layout, 1))
            slot_row = bb.emit(relax.TupleGetItem(layout, 2))
            hidden = bb.emit(relax.call_tir(gv[kup.name], [x, wg, wu, sorted_ids, tile_expert],
                                            relax.TensorType((s, INTER), f32)))
            y = bb.emit(relax.call_tir(gv[kdown.name], [hidden, wd, sorted_ids, tile_expert],
                                       relax.TensorType((s, H), f32)))
            out = bb.emit(relax.call_tir(gv[kc.name], [y, wts, slot_row],
                                         relax.TensorType((t, H), f32)))
            result = bb.emit_output(out)
        bb.emit_func_output(result)
    return bb.get(), kup, kdown


@pytest.fixture(scope="module")
def ffn(tmp_path_factory):
    mod, kup, kdown = _build_ffn()
    path = str(tmp_path_factory.mktemp("relax") / "moe_ffn.so")
    tvm.compile(mod, target=host_target()).export_library(path)
    vm = relax.VirtualMachine(tvm.runtime.load_module(path), tvm.cpu())
    return vm, kup, kdown


def _silu(v):
    return v / (1.0 + np.exp(-v))


@pytest.mark.parametrize("t", [0, 1, 7, 64])
def test_moe_ffn_symbolic_tokens(ffn, t):
    vm, kup, kdown = ffn
    rng = np.random.default_rng(t)
    x = rng.standard_normal((t, H)).astype(np.float32)
    ids = np.argsort(rng.random((t, E)), axis=1)[:, :K].astype(np.int32)
    wts = rng.random((t, K)).astype(np.float32)
    wg, wu = (rng.standard_normal((2, E, INTER, H)) / math.sqrt(H)).astype(np.float32)
    wd = (rng.standard_normal((E, H, INTER)) / math.sqrt(INTER)).astype(np.float32)
    args = [x, ids, wts, kup.arg_transforms[1](wg), kup.arg_transforms[2](wu),
            kdown.arg_transforms[1](wd)]
    out = vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args]).numpy()
    ref = np.zeros((t, H))
    for tok in range(t):
        v = x[tok].astype(np.float64)
        for j in range(K):
            e = ids[tok, j]
            ref[tok] += wts[tok, j] * (wd[e] @ (_silu(wg[e] @ v) * (wu[e] @ v)))
    assert out.shape == (t, H)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
