"""CUDA kernels of generation with a paged KV cache (moec/codegen/cuda/paged_attention.py),
without a GPU:

1. the generated CUDA of `paged_attention` (general step kernel and split decode kernel) run by
   the emulator (emulator.py) against moec/ir/kv_ops.py's reference, with the case matrix of
   the CPU kernels' test (tests/codegen/test_attention_kernels.py): grouped-query ratios 1, 2,
   3 and 8, head dims on and off the warp width, block sizes 4 and 16, sliding windows, chunked
   attention, sinks, steps that mix prefill chunks over existing caches with decode rows,
   sequences with no new token, empty steps, blocks scattered through the pool and decode
   contexts split across blocks (2 ranges with the default tiling, up to MAX_SPLITS with a
   forced one that also cuts GQA groups and slices the head dim). The cache slots a sequence
   does not own, and its own slots past kv_len, hold NaN, unused block-table entries point at
   such blocks, the decode scratch starts as NaN and step rows outside every sequence must stay
   untouched: a kernel that reads a value it must not, or writes where it must not, fails.
   Tolerance: |got - ref| <= tol * max(1, max |ref|), tol = 2e-5 (float32), 2e-3 (float16),
   1.6e-2 (bfloat16): float64 reference on the same rounded inputs, so the half tolerances are
   about 2 units in the last place of the output (one rounding of a float32 result). The
   default run takes 8 of the 18 cases in float32 (every geometry, block size, variant and
   tiling) and 3 in fp16 / bf16; `-m slow` runs them all.
2. `cache_write` in place (both layouts, float32 / float16 / bfloat16 caches, a float32 x into
   a float16 cache), exact; slots outside the pool skipped.
3. ptxas for sm_90 (fp16, float32; bf16 with -m slow) and sm_80 (bf16) at real model shapes:
   no spills, at most 255 registers, static shared memory under 46 KiB.
4. whole tiny generation artifacts (Qwen3-MoE in bf16, GPT-OSS with sinks and sliding windows in
   float32) compiled for cuda:sm_90 with both entry points (`main`, `decode`).
5. (with a GPU only, `-m gpu`) the kernels on the device, and generation steps of a tiny model
   against the CPU artifact.
6. the CPU side of benchmarks/gpu_paged.py (gpu_check's paged part): its step schedule and its
   kernel library build; nn.py's embedding over a symbolic table (the logits rows' gather).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import tvm

from moec.codegen.cuda import nn as N
from moec.ir.kv_ops import cache_write_ref, paged_attention_ref

from .emulator import emulate
from .test_cuda_build import _block_extents, build
from .test_cuda_emulated import NP
from .test_cuda_nn import named

PA = importlib.import_module("moec.codegen.cuda.paged_attention")

L, NB = 2, 64
TOL = {"float32": 2e-5, "float16": 2e-3, "bfloat16": 1.6e-2}

GEOMETRIES = [  # Hq, Hkv, D, Dv
    (4, 4, 8, 8), (4, 2, 16, 12), (6, 2, 12, 20), (8, 1, 64, 64)]
VARIANTS = [  # window, chunk, sinks
    (0, 0, False), (5, 0, False), (0, 8, False), (0, 0, True), (6, 0, True)]
CASES = [(g, bs, v) for g in GEOMETRIES for bs in (4, 16) for v in VARIANTS
         if (GEOMETRIES.index(g) + VARIANTS.index(v) + bs) % 3 == 0 or v == (0, 0, False)]
# cut GQA groups (2 heads per decode block, 4 rows per general block), 2 lanes per key, and a
# split per 32 visible keys: decode contexts of 512 keys are cut into MAX_SPLITS ranges. Every
# variant (window, chunk, sinks, both, none) runs with each tiling.
FORCED = PA.PagedConfig(ds=2, rows=4, decode_heads=2, split_keys=32)
FORCED_CASES = {1, 2, 5, 6, 11, 12, 15, 16}
# the default run: every geometry, block size, variant and tiling; -m slow runs all of CASES
QUICK = {1, 3, 6, 8, 11, 12, 13, 14}
HALF_CASES = {"float16": [8, 14], "bfloat16": [11]}  # half dtypes (more with -m slow)
HALF_SLOW = [6, 9, 12, 17]


def _config(i: int):
    return FORCED if i in FORCED_CASES else None


def _kernels(i: int, dtype: str):
    (hq, hkv, d, dv), bs, (window, chunk, sinks) = CASES[i]
    out = []
    for dec in (False, True):
        k = N.paged_attention(L, hq, hkv, d, dv, bs, 1, d ** -0.5, window, chunk, sinks, dtype,
                              dec, config=_config(i))
        out.append(named(k, f"{k.name}_{i}"))
    return out


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    """The emulator library holding case i's kernels: one g++ run for the cases of the default
    run in a dtype, one per case for the others."""
    workdir = tmp_path_factory.mktemp("emu_paged")
    cache: dict[tuple[tuple[int, ...], str], object] = {}

    def get(i: int, dtype: str):
        quick = sorted(QUICK) if dtype == "float32" else HALF_CASES[dtype]
        group = tuple(quick) if i in quick else (i,)
        if (group, dtype) not in cache:
            cache[group, dtype] = emulate([k for c in group for k in _kernels(c, dtype)],
                                          workdir)
        return cache[group, dtype]

    return get


def _step(rng, seqs, bs, nb=NB):
    """Step arrays for sequences given as (q_len, kv_len), blocks scattered over the pool;
    block-table entries past a sequence's blocks name the last block, which no one owns."""
    perm = rng.permutation(nb - 1)
    mb = max([-(-kv // bs) for _, kv in seqs] + [1])
    table = np.full((len(seqs), mb), nb - 1, np.int32)
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


def _poison(kc, vc, kv_len, table, bs):
    """NaN in every cache slot of layer 1 that no sequence holds below its kv_len."""
    own = np.zeros((kc.shape[1], bs), bool)
    for kv, row in zip(kv_len, table, strict=True):
        pos = np.arange(kv)
        own[row[pos // bs], pos % bs] = True
    kc, vc = kc.copy(), vc.copy()
    kc[1].transpose(0, 3, 1, 2)[~own] = np.nan
    vc[1].transpose(0, 2, 1, 3)[~own] = np.nan
    return kc, vc


def _check(got, ref, dtype: str) -> None:
    got, ref = got.astype(np.float64), ref.astype(np.float64)
    tol = TOL[dtype] * max(1.0, float(np.abs(ref).max(initial=0)))
    err = float(np.abs(got - ref).max(initial=0))
    assert err <= tol, f"max error {err:.3g} > {tol:.3g}"


def run_case(em, i: int, dtype: str) -> None:
    (hq, hkv, d, dv), bs, (window, chunk, sinks) = CASES[i]
    gen, dec = _kernels(i, dtype)
    rng = np.random.default_rng(1000 + i)
    np_dt = NP[dtype]
    kc0 = rng.standard_normal((L, NB, hkv, d, bs)).astype(np_dt)
    vc0 = rng.standard_normal((L, NB, hkv, bs, dv)).astype(np_dt)
    sk = (rng.standard_normal(hq) * 2).astype(np_dt) if sinks else None
    attrs = {"layer": 1, "scale": d ** -0.5, "window": window, "chunk": chunk}

    def go(kernel, seqs, decode):
        t, qs, ql, kl, table = _step(rng, seqs, bs)
        kc, vc = _poison(kc0, vc0, kl, table, bs)
        q = rng.standard_normal((1, hq, t, d)).astype(np_dt)
        ref = paged_attention_ref(q, kc, vc, qs, ql, kl, table, sk, attrs)
        out = np.full((1, t, hq, dv), 7.0, np_dt)
        args = [q, kc, vc, qs, ql, kl, table, *([sk] if sinks else []), out]
        if decode:
            args.append(np.full((t, hq, PA.MAX_SPLITS, dv + 2), np.nan, np.float32))
        em[kernel.name](*args)
        rows = np.zeros(t, bool)
        for s0, n in zip(qs, ql, strict=True):
            rows[s0:s0 + n] = True
        _check(out[:, rows], ref[:, rows], dtype)
        assert (out[:, ~rows] == 7.0).all(), "a row outside every sequence was written"

    # prefill chunks over empty and over existing caches, decode rows, an idle sequence
    go(gen, [(1, 1), (7, 7), (5, 23), (1, 40), (19, 19), (0, 9)], False)
    go(gen, [(33, 33)], False)
    go(gen, [], False)  # an empty step
    # decode: one token per sequence, short and long (split) contexts
    go(dec, [(1, k) for k in (1, bs - 1, bs, bs + 1, 4 * bs + 3)], True)
    go(dec, [(1, NB * bs // 2), (1, 2)], True)
    go(dec, [], True)
    go(gen, [(1, NB * bs // 2), (1, 2)], False)  # the general kernel on the same shape


def _case_id(i: int) -> str:
    g, bs, v = CASES[i]
    return f"{i}-{g}-bs{bs}-{v}{'-forced' if i in FORCED_CASES else ''}".replace(" ", "")


@pytest.mark.parametrize("i", [i if i in QUICK else pytest.param(i, marks=pytest.mark.slow)
                               for i in range(len(CASES))], ids=_case_id)
def test_paged_attention_float32(emu, i):
    run_case(emu(i, "float32"), i, "float32")


@pytest.mark.parametrize("dtype,i", [(d, i) for d, ids in HALF_CASES.items() for i in ids]
                         + [pytest.param(d, i, marks=pytest.mark.slow) for d in HALF_CASES
                            for i in HALF_SLOW])
def test_paged_attention_half(emu, dtype, i):
    run_case(emu(i, dtype), i, dtype)


@pytest.mark.parametrize("order", [1, pytest.param(-1, marks=pytest.mark.slow)])
def test_paged_attention_warp_serial_orders(emu, order):
    """One warp at a time between block barriers, forwards and backwards: a warp reading a
    K / V tile before all of it is staged, or overwriting it early, or the decode merge reading
    a warp's partial result before it is stored, fails here."""
    for i in (6, 8):  # GQA 2:1, window (and sinks); the forced tiling and the default one
        em = emu(i, "float32")
        em.order(order)
        try:
            run_case(em, i, "float32")
        finally:
            em.order(0)


def test_decode_splits_where_expected():
    """The cases above do reach split decode contexts: the number of ranges per sequence."""
    for cfg, bs, want in ((None, 16, 2), (FORCED, 16, PA.MAX_SPLITS), (FORCED, 4, 4)):
        kv = NB * bs // 2
        c = cfg or PA.PagedConfig()
        got = max(1, min(PA.MAX_SPLITS, (kv - 1) // c.kt + 1, kv // c.split_keys))
        assert got == want, (cfg, bs, got)


CW = [(tr, dt, xdt) for tr in (False, True) for dt, xdt in [
    ("float32", "float32"), ("float16", "float16"), ("bfloat16", "bfloat16"),
    ("float16", "float32")]]
CW_H, CW_BS, CW_D, CW_LAYER = 2, 4, 12, 1


def _cw_name(tr: bool, dt: str, xdt: str) -> str:
    return f"cw_{int(tr)}_{dt}_{xdt}"


@pytest.fixture(scope="module")
def emu_cw(tmp_path_factory):
    return emulate([named(N.cache_write(L, CW_H, CW_BS, CW_D, CW_LAYER, tr, dt, xdt),
                          _cw_name(tr, dt, xdt)) for tr, dt, xdt in CW],
                   tmp_path_factory.mktemp("emu_cw"))


@pytest.mark.parametrize("transposed,dtype,x_dtype", CW)
def test_cache_write_in_place(emu_cw, transposed, dtype, x_dtype):
    h, bs, d, layer = CW_H, CW_BS, CW_D, CW_LAYER
    run = emu_cw[_cw_name(transposed, dtype, x_dtype)]
    rng = np.random.default_rng(3)
    shape = (L, NB, h, d, bs) if transposed else (L, NB, h, bs, d)
    cache = rng.standard_normal(shape).astype(NP[dtype])
    for t in (0, 1, 9, 40):
        x = rng.standard_normal((1, h, t, d)).astype(NP[x_dtype])
        slots = rng.choice(NB * bs, t, replace=False).astype(np.int32)
        ref = cache_write_ref(cache, x, slots, layer, transposed)
        got = cache.copy()
        run(got, x, slots)
        np.testing.assert_array_equal(got.view(np.uint8), ref.view(np.uint8))
        cache = ref
    # slots outside the pool are skipped
    got = np.zeros(shape, NP[dtype])
    run(got, np.ones((1, h, 3, d), NP[x_dtype]), np.array([-1, NB * bs, 3], np.int32))
    want = np.zeros(shape, NP[dtype])
    if transposed:
        want[layer, 0, :, :, 3] = 1
    else:
        want[layer, 0, :, 3] = 1
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("v,r", [(5, 3), (1, 0), (7, 7)])
def test_embedding_of_activation_rows(v, r):
    """nn.py's embedding with a symbolic table (a generation step's hidden states gathered at
    its logits rows; the CUDA lowering of a generation artifact needs it): ids clamped."""
    from .test_cuda_definitions import cpu_run

    rng = np.random.default_rng(v)
    w = rng.standard_normal((v, 16)).astype(np.float32)
    ids = rng.integers(-2, v + 2, r).astype(np.int64)
    (got,) = cpu_run(N.define_embedding("T", 16, ("R",), "float32"), [w, ids],
                     [((r, 16), "float32")])
    np.testing.assert_array_equal(got, w[np.clip(ids, 0, v - 1)])


def test_every_grid_is_at_least_one_block():
    ks = [N.cache_write(L, 2, 4, 8, 0, True)]
    ks += [k for i in (0, 1) for k in _kernels(i, "float16")]
    for k in ks:
        extents = _block_extents(k.func)
        assert extents, k.name
        for ext in extents:
            ok = isinstance(ext, tvm.tirx.IntImm) and ext.value >= 1
            ok = ok or (isinstance(ext, tvm.tirx.Max) and isinstance(ext.b, tvm.tirx.IntImm)
                        and ext.b.value == 1)
            assert ok, f"{k.name}: blockIdx extent {ext} may be 0"


def test_config_choices_and_errors():
    assert PA.paged_config(8, 128, 128, "float16") == PA.PagedConfig()
    assert PA.paged_config(1, 256, 256, "float32").ds > 1  # K / V tiles of fewer keys
    assert PA.paged_config(8, 512, 512, "float32").decode_heads < 8
    for rep, d, dv, dt in [(8, 128, 128, "float32"), (1, 192, 128, "float32"),
                           (16, 576, 512, "bfloat16")]:
        cfg = PA.paged_config(rep, d, dv, dt)
        assert max(cfg.smem(rep, d, dv, dt, dec) for dec in (False, True)) <= PA.SMEM_BUDGET
    with pytest.raises(Exception, match="multiple"):
        N.paged_attention(L, 6, 4, 16, 16, 16, 0, 1.0)
    with pytest.raises(Exception, match="power of two"):
        N.paged_attention(L, 4, 2, 16, 16, 12, 0, 1.0)
    with pytest.raises(Exception, match="shared memory"):
        N.paged_attention(L, 4, 2, 4096, 4096, 16, 0, 1.0)
    with pytest.raises(Exception, match="layer"):
        N.cache_write(L, 2, 16, 8, L, False)
    assert N.MAX_SPLITS == PA.MAX_SPLITS


# --------------------------------------------------------------------------- ptxas

SHAPES = [  # Hq, Hkv, D, Dv, window, chunk, sinks: Qwen3-30B-A3B, GPT-OSS (sliding + sinks),
    # DeepSeek-V3 (MLA heads as lowered), Llama 4 (chunked), a 256-dim MQA-like group
    (32, 4, 128, 128, 0, 0, False), (64, 8, 64, 64, 128, 0, True), (16, 16, 192, 128, 0, 0, False),
    (40, 8, 128, 128, 0, 8192, False), (64, 4, 256, 256, 0, 0, False)]


def ptx_set(dtype: str, shapes=SHAPES):
    ks = []
    for hq, hkv, d, dv, w, c, s in shapes:
        for dec in (False, True):
            k = N.paged_attention(4, hq, hkv, d, dv, 16, 1, d ** -0.5, w, c, s, dtype, dec)
            ks.append(named(k, f"{k.name}_{hq}x{hkv}x{d}x{dv}"))
    for tr in (False, True):
        k = N.cache_write(4, 8, 16, 128, 1, tr, dtype)
        ks.append(named(k, f"{k.name}_{int(tr)}"))
    return ks


def _no_spills(comp, kernels):
    for k in kernels:
        entries = [e for e in comp.report if e.startswith(f"{k.name}_kernel")]
        assert entries, (k.name, sorted(comp.report))
        for e in entries:
            r = comp.report[e]
            assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (e, r)
            assert 0 < r["registers"] <= 255, (e, r)
            assert r["smem"] <= PA.SMEM_BUDGET, (e, r)


@pytest.mark.parametrize("dtype", ["float16",  # bf16: sm_80 below, all with -m slow
                                   pytest.param("float32", marks=pytest.mark.slow),
                                   pytest.param("bfloat16", marks=pytest.mark.slow)])
def test_sm90_build_no_spills(dtype):
    kernels = ptx_set(dtype)
    _, comp = build(kernels)
    _no_spills(comp, kernels)
    # the decode kernel is two launches: the split kernel and the merge
    assert sum(e.startswith("paged_decode") for e in comp.report) == 2 * len(SHAPES)


def test_sm80_build_no_spills():
    kernels = ptx_set("bfloat16", SHAPES[:3])
    _, comp = build(kernels, "sm_80")
    assert comp.arch == "sm_80" and ".target sm_80" in comp.ptx
    _no_spills(comp, kernels)


# --------------------------------------------------------------------------- whole artifacts


def _generation_artifact(family: str, dtype: str, tmp_path: Path):
    """A tiny checkpoint of tests/generate/families.py compiled for cuda:sm_90; (artifact,
    ptxas reports)."""
    pytest.importorskip("transformers", reason="transformers is a test extra")
    import torch

    import moec
    from moec.codegen.cuda.build import collect_compilations

    sys.path.insert(0, str(Path(__file__).parents[1] / "generate"))
    from families import model as family_model

    family_model(family).to(getattr(torch, dtype)).save_pretrained(tmp_path / "ckpt")
    with collect_compilations() as comps:
        art = moec.compile(str(tmp_path / "ckpt"), target="cuda:sm_90", max_tokens=64)
    return art, {k: v for c in comps for k, v in c.report.items()}


@pytest.mark.parametrize("family,dtype", [("qwen3_moe", "bfloat16"),
                                          pytest.param("gpt_oss", "float32",
                                                       marks=pytest.mark.slow)])
def test_generation_artifact_builds_for_sm90(family, dtype, tmp_path):
    art, report = _generation_artifact(family, dtype, tmp_path)
    assert art.target["kind"] == "cuda" and art.target["arch"] == "sm_90"
    stats = art.executable.stats()
    assert "fn=main" in stats and "fn=decode" in stats  # both entry points
    assert art.signature.inputs[2].dtype == dtype  # the caches in the model's dtype
    for prefix in ("cache_write", "paged_attention", "paged_decode"):
        names = [k for k in report if k.startswith(f"{prefix}_{dtype}")]
        assert names, (prefix, sorted(report))
        for k in names:
            r = report[k]
            assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (k, r)
    gen = art.meta["generation"]
    assert gen["block_size"] == 16 and gen["layers"] >= 2
    path = art.save(tmp_path / f"{family}.moec")
    assert path.exists()


# --------------------------------------------------------------------------- on a GPU

HAS_GPU = __import__("torch").cuda.is_available()
GPU_SHAPES = [  # Hq, Hkv, D, Dv, window, chunk, sinks, dtype
    (32, 4, 128, 128, 0, 0, False, "bfloat16"), (64, 8, 64, 64, 128, 0, True, "float16"),
    (16, 16, 192, 128, 0, 0, False, "bfloat16"), (8, 2, 80, 80, 0, 256, False, "float32")]


def _gpu_paged():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_paged.py"
    spec = importlib.util.spec_from_file_location("gpu_paged", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s[:4])) + s[7])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="no CUDA device")
def test_paged_attention_on_gpu(shape):
    """Both kernels on the device against the reference (float64, same rounded inputs): a mixed
    step over existing caches and a decode step with contexts split into up to MAX_SPLITS."""
    from moec.codegen import cuda as C

    from .test_cuda_gpu import dev, to_np

    hq, hkv, d, dv, window, chunk, sinks, dtype = shape
    nb, bs = 640, 16
    gen, dec = (N.paged_attention(L, hq, hkv, d, dv, bs, 1, d ** -0.5, window, chunk, sinks,
                                  dtype, x) for x in (False, True))
    ex = C.build_cuda(tvm.IRModule({k.name: k.func for k in (gen, dec)}))
    rng = np.random.default_rng(7)
    kc, vc = (to_np(dev(rng.standard_normal(s).astype(np.float32), dtype)) for s in
              ((L, nb, hkv, d, bs), (L, nb, hkv, bs, dv)))
    sk = to_np(dev(rng.standard_normal(hq).astype(np.float32) * 2, dtype)) if sinks else None
    attrs = {"layer": 1, "scale": d ** -0.5, "window": window, "chunk": chunk}
    for kernel, seqs in ((gen, [(1, 1), (300, 300), (77, 577), (1, 900), (0, 40)]),
                         (dec, [(1, k) for k in (1, 15, 16, 17, 700, 2048, 4100)])):
        t, qs, ql, kl, table = _step(rng, seqs, bs, nb)
        q = to_np(dev(rng.standard_normal((1, hq, t, d)).astype(np.float32), dtype))
        want = paged_attention_ref(q, kc, vc, qs, ql, kl, table, sk, attrs)
        args = [dev(a, dtype) for a in (q, kc, vc)] + [dev(a) for a in (qs, ql, kl, table)]
        args += [dev(sk, dtype)] if sinks else []
        out = dev(np.zeros((1, t, hq, dv), np.float32), dtype)
        extra = [dev(np.zeros((t, hq, PA.MAX_SPLITS, dv + 2), np.float32))] \
            if kernel is dec else []
        ex[kernel.name](*args, out, *extra)
        __import__("torch").cuda.synchronize()
        rows = np.zeros(t, bool)
        for s0, n in zip(qs, ql, strict=True):
            rows[s0:s0 + n] = True
        _check(to_np(out)[:, rows], want[:, rows], dtype)


@pytest.mark.parametrize("family,dtype", [("qwen3_moe", "float32"), ("gpt_oss", "float32"),
                                          ("qwen3_moe", "bfloat16")])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="no CUDA device")
def test_generation_steps_on_gpu(family, dtype, tmp_path):
    """benchmarks/gpu_paged.py's schedule (chunked prefill beside decode rows, decode steps
    through the decode entry point, a split context, idle sequences) on the GPU against the
    same checkpoint compiled for the CPU: every step's logits, max|gpu - cpu| / max|cpu| <=
    1e-3 (float32), 5e-2 (bfloat16)."""
    import torch

    import moec
    from moec.runtime import load

    gp = _gpu_paged()
    pytest.importorskip("transformers", reason="transformers is a test extra")
    sys.path.insert(0, str(Path(__file__).parents[1] / "generate"))
    from families import model as family_model

    m = family_model(family).to(getattr(torch, dtype))
    m.config.max_position_embeddings = gp.MAX_POSITION
    m.save_pretrained(tmp_path / "ckpt")
    models = [load(moec.compile(str(tmp_path / "ckpt"), target=tgt, max_tokens=gp.MAX_TOKENS)
                   .save(tmp_path / f"{tgt}.moec"), device=dev)
              for tgt, dev in (("cpu", "cpu"), ("cuda", "cuda"))]
    steps, nb = gp.step_schedule(models[0].geometry.vocab_size, models[0].geometry.block_size)
    want, got = (gp.run_steps(mm, steps, nb) for mm in models)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        err = float(np.abs(g - w).max() / np.abs(w).max())
        assert err <= gp.GEN_TOL[dtype], (i, err)


# --------------------------------------------------------------------------- gpu_check's side


def test_gpu_check_step_schedule(tmp_path):
    """The schedule benchmarks/gpu_paged.py replays on the GPU: chunked prefill beside decode
    rows, three-sequence decode steps (the decode entry point) with a context the decode
    kernel splits, idle sequences; every position written once, at a slot of its own blocks."""
    gp = _gpu_paged()
    steps, nb = gp.step_schedule(128, 16)
    done = [0, 0, 0]
    seen: set[int] = set()
    for st in steps:
        t = len(st["ids"])
        assert 0 < t <= gp.MAX_TOKENS and st["positions"].max() < gp.MAX_POSITION
        assert (st["kv_len"] == np.array(done) + st["q_len"]).all()
        assert (st["q_start"] == np.cumsum([0, *st["q_len"][:-1]])).all()
        assert not seen & set(st["slots"].tolist())
        seen |= set(st["slots"].tolist())
        table, bs = st["block_table"], 16
        for b in range(3):
            pos = np.arange(done[b], st["kv_len"][b])
            rows = slice(st["q_start"][b], st["q_start"][b] + st["q_len"][b])
            assert (st["positions"][rows] == pos).all()
            assert (st["slots"][rows] == table[b, pos // bs] * bs + pos % bs).all()
        assert table.max() < nb
        done = list(st["kv_len"])
    assert done == [p + g for p, g in zip(gp.PROMPTS, gp.NEW_TOKENS, strict=True)]
    decode = [st for st in steps if (st["q_len"] == 1).all()]
    assert len(decode) == min(gp.NEW_TOKENS)
    assert max(st["kv_len"].max() for st in decode) >= 2 * PA.SPLIT_KEYS  # split in two
    assert any((st["q_len"] > 1).any() and (st["q_len"] == 1).any() for st in steps)
    assert any((st["q_len"] == 0).any() for st in steps)
    gp.save_schedule(tmp_path / "s.npz", steps, nb, [np.full(3, i, np.float32)
                                                      for i in range(len(steps))])
    steps2, nb2, logits = gp.load_schedule(tmp_path / "s.npz")
    assert nb2 == nb and len(steps2) == len(steps) and logits[-1][0] == len(steps) - 1
    for a, b in zip(steps, steps2, strict=True):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_gpu_check_builds_paged_kernels(tmp_path):
    gp = _gpu_paged()
    meta = gp.build_kernels(tmp_path, "float16", {"tiny": (4, 2, 16, 16, 8, 0, True)})
    assert (tmp_path / "kernels.so").stat().st_size > 0
    assert meta["kernels"]["tiny"]["decode"] == "paged_decode_tiny"
    assert meta["max_splits"] == PA.MAX_SPLITS
