"""The paged KV-cache kernels (moec/codegen/kernels/attention.py) against the IR's numpy
references (moec/ir/kv_ops.py), on fresh random data: grouped-query ratios 1, 2, 3 and 8, head
dims that are and are not multiples of the vector width, block sizes 4 and 16, sliding
windows, chunked attention, sinks, steps that mix prefill chunks (over an existing cache) and
decode rows, sequences with no new token, empty steps, blocks scattered through the pool, and
decode contexts long enough to be split across threads (up to MAX_SPLITS ranges).

Tolerance: |got - ref| <= 2e-6 * max(1, max |ref|) (float32 kernels, float64 reference)."""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from moec.codegen.kernels import attention as A
from moec.codegen.target import host_target
from moec.ir.kv_ops import cache_write_ref, paged_attention_ref

L, NB = 2, 64


def _build(*kernels):
    mod = tvm.IRModule({k.name: k.func for k in kernels})
    return tvm.compile(mod, target=host_target())


def _t(a):
    return tvm.runtime.tensor(np.ascontiguousarray(a), tvm.cpu())


def _step(rng, seqs, bs):
    """Step arrays for sequences given as (q_len, kv_len), blocks scattered over the pool."""
    perm = rng.permutation(NB)
    mb = max([-(-kv // bs) for _, kv in seqs] + [1])
    table = np.zeros((len(seqs), mb), np.int32)
    q_start, used, t = [], 0, 0
    for b, (n, kv) in enumerate(seqs):
        nblk = -(-kv // bs)
        table[b, :nblk] = perm[used:used + nblk]
        used += nblk
        q_start.append(t)
        t += n
    q_len = np.array([n for n, _ in seqs], np.int32)
    kv_len = np.array([kv for _, kv in seqs], np.int32)
    return t, np.array(q_start, np.int32), q_len, kv_len, table


def _check(got, ref):
    tol = 2e-6 * max(1.0, float(np.abs(ref).max(initial=0)))
    err = float(np.abs(got - ref).max(initial=0))
    assert err <= tol, f"max error {err:.3g} > {tol:.3g}"


GEOMETRIES = [  # Hq, Hkv, D, Dv
    (4, 4, 8, 8), (4, 2, 16, 12), (6, 2, 12, 20), (8, 1, 64, 64)]
VARIANTS = [  # window, chunk, sinks
    (0, 0, False), (5, 0, False), (0, 8, False), (0, 0, True), (6, 0, True)]
CASES = [(g, bs, v) for g in GEOMETRIES for bs in (4, 16) for v in VARIANTS
         if (GEOMETRIES.index(g) + VARIANTS.index(v) + bs) % 3 == 0 or v == (0, 0, False)]


@pytest.mark.parametrize("geo,bs,var", CASES, ids=lambda x: str(x).replace(" ", ""))
def test_paged_attention_general_and_decode(geo, bs, var):
    hq, hkv, d, dv = geo
    window, chunk, sinks = var
    rng = np.random.default_rng(hash((geo, bs, var)) % 2**32)
    layer = 1
    scale = d ** -0.5
    gen = A.paged_attention(L, hq, hkv, d, dv, bs, layer, scale, window, chunk, sinks)
    dec = A.paged_attention(L, hq, hkv, d, dv, bs, layer, scale, window, chunk, sinks,
                            decode=True)
    ex = _build(gen, dec)
    kc = rng.standard_normal((L, NB, hkv, d, bs)).astype(np.float32)
    vc = rng.standard_normal((L, NB, hkv, bs, dv)).astype(np.float32)
    sk = rng.standard_normal(hq).astype(np.float32) * 2 if sinks else None
    attrs = {"layer": layer, "scale": scale, "window": window, "chunk": chunk}

    def run(kernel, seqs, decode):
        t, qs, ql, kl, table = _step(rng, seqs, bs)
        q = rng.standard_normal((1, hq, t, d)).astype(np.float32)
        ref = paged_attention_ref(q, kc, vc, qs, ql, kl, table, sk, attrs)
        args = [_t(a) for a in (q, kc, vc, qs, ql, kl, table)]
        if sinks:
            args.append(_t(sk))
        out = tvm.runtime.tensor(np.full((1, t, hq, dv), 7.0, np.float32), tvm.cpu())
        extra = [tvm.runtime.empty((t, hq, A.MAX_SPLITS, dv + 2), "float32", tvm.cpu())] \
            if decode else []
        ex[kernel.name](*args, out, *extra)
        got = out.numpy()
        rows = np.zeros(t, bool)
        for s0, n in zip(qs, ql, strict=True):
            rows[s0:s0 + n] = True
        _check(got[:, rows], ref[:, rows])
        return got

    # prefill chunks over empty and over existing caches, decode rows, an idle sequence
    run(gen, [(1, 1), (7, 7), (5, 23), (1, 40), (19, 19), (0, 9)], False)
    run(gen, [(33, 33)], False)
    run(gen, [], False)  # an empty step
    # decode: one token per sequence, short and long (split) contexts
    run(dec, [(1, k) for k in (1, bs - 1, bs, bs + 1, 4 * bs + 3)], True)
    run(dec, [(1, NB * bs // 2), (1, 2)], True)
    run(gen, [(1, NB * bs // 2), (1, 2)], False)  # the general kernel on the same shape


@pytest.mark.parametrize("transposed", [False, True])
def test_cache_write_in_place(transposed):
    rng = np.random.default_rng(3)
    h, bs, d, layer = 2, 4, 12, 1
    k = A.cache_write(L, h, bs, d, layer, transposed)
    ex = _build(k)
    shape = (L, NB, h, d, bs) if transposed else (L, NB, h, bs, d)
    cache = rng.standard_normal(shape).astype(np.float32)
    for t in (0, 1, 9):
        x = rng.standard_normal((1, h, t, d)).astype(np.float32)
        slots = rng.choice(NB * bs, t, replace=False).astype(np.int32)
        ref = cache_write_ref(cache, x, slots, layer, transposed)
        c = _t(cache)
        ex[k.name](c, _t(x), _t(slots))
        np.testing.assert_array_equal(c.numpy(), ref)
        cache = ref


def test_cache_write_skips_slots_outside_the_pool():
    h, bs, d = 1, 4, 8
    k = A.cache_write(L, h, bs, d, 0, False)
    ex = _build(k)
    cache = np.zeros((L, 2, h, bs, d), np.float32)
    c = _t(cache)
    ex[k.name](c, _t(np.ones((1, h, 3, d), np.float32)), _t(np.array([-1, 8, 3], np.int32)))
    want = cache.copy()
    want[0, 0, :, 3] = 1
    np.testing.assert_array_equal(c.numpy(), want)


@pytest.mark.parametrize("xs,cs", [
    ((1, 4, "T", 16), (1, 1, "T", 16)),   # q after permute, rotate-half tables
    ((1, "T", 4, 64), (1, "T", 1, 64)),   # before permute
    (("T", 2, 12), ("T", 1, 6)),          # half tables (GPT-OSS), odd halves
    ((2, 3, 8), (1, 3, 8))])
def test_rope_kernel(xs, cs):
    from moec.codegen.kernels.nn import rope
    from moec.ir.nn_ops import rope_ref

    k = rope(xs, cs)
    ex = _build(k)
    rng = np.random.default_rng(5)
    for t in (0, 1, 9):
        xshape = tuple(t if d == "T" else d for d in xs)
        cshape = tuple(t if d == "T" else d for d in cs)
        x = rng.standard_normal(xshape).astype(np.float32)
        c, s = (rng.standard_normal(cshape).astype(np.float32) for _ in range(2))
        y = tvm.runtime.tensor(np.full(xshape, 7.0, np.float32), tvm.cpu())
        ex[k.name](_t(x), _t(c), _t(s), y)
        np.testing.assert_allclose(y.numpy(), rope_ref(x, c, s), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("lead,h,n,k", [((1, "T"), 4, 12, 8), (("T",), 3, 40, 16),
                                         ((1, "T"), 2, 64, 20)])
def test_linear_heads_kernel(lead, h, n, k):
    from moec.codegen.kernels.nn import linear_heads
    from moec.ir.nn_ops import linear_heads_ref

    kern = linear_heads(lead, h, n, k)
    ex = _build(kern)
    rng = np.random.default_rng(6)
    w = rng.standard_normal((h, n, k)).astype(np.float32)
    for t in (0, 1, 5):
        sh = tuple(t if d == "T" else d for d in lead)
        x = rng.standard_normal((*sh, h, k)).astype(np.float32)
        y = tvm.runtime.tensor(np.full((*sh, h, n), 7.0, np.float32), tvm.cpu())
        ex[kern.name](_t(x), _t(kern.arg_transforms[1](w)), y)
        _check(y.numpy(), linear_heads_ref(x, w))
