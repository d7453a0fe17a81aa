"""CUDA kernels of the whole-model ops (moec/codegen/cuda/nn.py and flash_attention.py), without a GPU:

1. the te definitions of the gather / position / copy kernels, built for the CPU, against the
   reference ops, with symbolic token dims of length 0 and 1 among the sizes;
2. the generated CUDA of every kernel run by the emulator (emulator.py) in fp32 and fp16 (and
   bf16 for attention): exact for copies and positions, rel err <= 1e-2 for fp16 (2e-2 for
   bf16, whose P tile carries 8 mantissa bits), 2e-5 for fp32 math; attention in both
   schedules (tensor cores and SIMT), GQA and MHA, odd head dims, warp-serial orders;
3. a ptxas build for sm_90 in fp16 and bf16: no spills, tensor cores in the WMMA attention;
4. the CUDA lowering (moec/codegen/lower_nn.py) picking these builders;
5. (with a GPU only, `-m gpu`) attention and the copies on the device.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tvm
from tvm import tirx

from moec.codegen import cuda as C
from moec.codegen.cuda import flash_attention as A
from moec.codegen.cuda import nn as N
from moec.codegen.cuda.build import has_mma
from moec.ir.nn_ops import attention_ref

from .emulator import emulate
from .test_cuda_build import _block_extents, _entry, build
from .test_cuda_definitions import cpu_run, ref
from .test_cuda_emulated import NP

TOL = {"float32": 2e-5, "float16": 1e-2, "bfloat16": 2e-2}


def close(got: np.ndarray, want: np.ndarray, dtype: str) -> None:
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32),
                               rtol=TOL[dtype], atol=TOL[dtype])


def named(kernel: C.Kernel, name: str) -> C.Kernel:
    """Kernel renamed (the emulator's launch hooks are process-wide: names must be unique)."""
    return dataclasses.replace(kernel, func=kernel.func.with_attr("global_symbol", name),
                               name=name)


def rand(shape, dtype: str, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal(shape) * scale
    return x.astype(NP.get(dtype, dtype))


# --------------------------------------------------------------------------- 1. te definitions


@pytest.mark.parametrize("op", ["cos", "sin"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("t", [0, 1, 5])
def test_trig_definition(op, dtype, t):
    x = rand((t, 8), dtype, t, scale=4.0)
    (got,) = cpu_run(N.define_unary_trig(op, ("T", 8), dtype), [x], [((t, 8), dtype)])
    close(got, ref(f"core.{op}", [x])[0], dtype)


@pytest.mark.parametrize("dtype", ["float32", "int64"])
@pytest.mark.parametrize("t", [0, 1, 5])
def test_broadcast_definition(dtype, t):
    x = (rand((1, t, 1), "float32", t) * 100).astype(dtype)
    (got,) = cpu_run(N.define_broadcast_to((1, "T", 1), (3, "T", 4), dtype), [x],
                     [((3, t, 4), dtype)])
    np.testing.assert_array_equal(got, ref("core.broadcast_to", [x], shape=[3, -1, 4])[0])


@pytest.mark.parametrize("perm", [(1, 0, 2), (2, 0, 1)])
@pytest.mark.parametrize("t", [0, 1, 5])
def test_permute_dims_definition(perm, t):
    x = rand((t, 3, 8), "float16", t)
    want = ref("core.permute_dims", [x], perm=list(perm))[0]
    (got,) = cpu_run(N.define_permute_dims(("T", 3, 8), perm, "float16"), [x],
                     [(want.shape, "float16")])
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("t", [0, 1, 5])
def test_slice_definition_inner_axis(t):
    x = rand((t, 12), "float32", t)
    want = ref("core.slice", [x], axis=1, start=2, step=3)[0]
    (got,) = cpu_run(N.define_slice_axis(("T", 12), ("T", 4), 1, 2, 3, "float32"), [x],
                     [(want.shape, "float32")])
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("t", [1, 2, 6])  # a slice of length 0, 1 and 5 of a symbolic dim
def test_slice_definition_symbolic_axis(t):
    x = rand((t, 4), "int64" if t == 2 else "float32", t, scale=100.0)
    want = ref("core.slice", [x], axis=0, start=1)[0]
    (got,) = cpu_run(N.define_slice_axis(("T", 4), ("S", 4), 0, 1, 1, str(x.dtype)), [x],
                     [(want.shape, str(x.dtype))])
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("t,u", [(0, 2), (1, 0), (3, 1)])
def test_concat_definition(t, u):
    a, b = rand((t, 4), "float32", 1), rand((u, 4), "float32", 2)
    (got,) = cpu_run(N.define_concat2(("T", 4), ("U", 4), 0, "float32"), [a, b],
                     [((t + u, 4), "float32")])
    np.testing.assert_array_equal(got, ref("core.concat", [a, b], axis=0)[0])
    a2 = rand((t, 3), "float16", 3)
    b2 = rand((t, 5), "float16", 4)
    (got,) = cpu_run(N.define_concat2(("T", 3), ("T", 5), -1, "float16"), [a2, b2],
                     [((t, 8), "float16")])
    np.testing.assert_array_equal(got, ref("core.concat", [a2, b2], axis=-1)[0])


@pytest.mark.parametrize("ids_shape,id_dtype", [(("T",), "int64"), ((2, "T"), "int32")])
@pytest.mark.parametrize("t", [0, 1, 7])
def test_embedding_definition(ids_shape, id_dtype, t):
    rng = np.random.default_rng(t)
    w = rand((50, 16), "float16", 5)
    shape = tuple(t if d == "T" else d for d in ids_shape)
    ids = rng.integers(0, 50, shape).astype(id_dtype)
    (got,) = cpu_run(N.define_embedding(50, 16, ids_shape, "float16", id_dtype), [w, ids],
                     [((*shape, 16), "float16")])
    np.testing.assert_array_equal(got, ref("core.embedding", [w, ids])[0])


def test_embedding_definition_clamps_ids():
    w = rand((10, 4), "float32")
    ids = np.array([-3, 0, 9, 12], np.int64)
    (got,) = cpu_run(N.define_embedding(10, 4, ("T",), "float32"), [w, ids], [((4, 4), "float32")])
    np.testing.assert_array_equal(got, w[[0, 0, 9, 9]])


@pytest.mark.parametrize("like,axis,dtype,like_dtype", [
    (("T", 4), 0, "int64", "float32"), ((2, "T"), -1, "int32", "int64")])
@pytest.mark.parametrize("t", [0, 1, 6])
def test_arange_definition(like, axis, dtype, like_dtype, t):
    x = np.zeros(tuple(t if d == "T" else d for d in like), like_dtype)
    (got,) = cpu_run(N.define_arange(like, axis, dtype, like_dtype), [x], [((t,), dtype)])
    want = ref("core.arange", [x], axis=axis, dtype={"int64": "i64", "int32": "i32"}[dtype])[0]
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------------- 2. emulated CUDA

ATTN = {  # name: (B, Hq, Hkv, D, Dv, config or None = default)
    "attn": (1, 4, 2, 32, 32, None),  # fp16: tensor cores, key tiles of 64; fp32: SIMT
    "attn_mha": (2, 2, 2, 16, 48, A.WmmaConfig(16)),  # fp16: 16-column P.V chunks, 16-key tiles
    "attn_simt": (1, 4, 1, 32, 32, A.SimtConfig(2, 16)),
    "attn_odd": (1, 3, 3, 24, 20, A.SimtConfig(1, 8)),  # head dims off the WMMA grid
}


def _attn_kernel(name: str, dtype: str):
    b, hq, hkv, d, dv, cfg = ATTN[name]
    if dtype == "float32" and isinstance(cfg, A.WmmaConfig):
        cfg = None
    return named(C.attention(b, hq, hkv, d, dv, 0.3, dtype, config=cfg), f"{name}_{dtype}")


def nn_kernels(dtype: str):
    ks = [
        C.unary_trig("cos", ("T", 8), dtype),
        C.unary_trig("sin", ("T", 8), dtype),
        named(C.broadcast_to((1, "T", 1), (3, "T", 4), dtype), "bcast"),
        C.permute_dims(("T", 3, 8), (1, 0, 2), dtype),
        C.slice_axis(("T", 12), ("T", 4), 1, 2, 3, dtype),
        C.concat2(("T", 4), ("U", 4), 0, dtype),
        named(C.embedding(50, 16, ("T",), dtype, "int64"), "embedding"),
        named(C.arange(("T", 4), 0, "int64", dtype), "arange"),
    ]
    ks = [k if k.name.endswith(dtype) else named(k, f"{k.name}_{dtype}") for k in ks]
    ks += [_attn_kernel(n, dtype) for n in ATTN]
    if dtype == "float16":
        ks.append(_attn_kernel("attn", "bfloat16"))
    return ks


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("emu_nn")
    cache: dict[str, object] = {}

    def get(dtype: str):
        if dtype not in cache:
            cache[dtype] = emulate(nn_kernels(dtype), workdir)
        return cache[dtype]

    return get


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("t", [0, 1, 7])
def test_copies_and_positions(emu, dtype, t):
    em = emu(dtype)
    x = rand((t, 8), dtype, t, scale=4.0)
    for op in ("cos", "sin"):
        got = np.zeros_like(x)
        em[f"{op}_{dtype}"](x, got)
        close(got, ref(f"core.{op}", [x])[0], dtype)
    cases = [
        ("bcast", [rand((1, t, 1), dtype, 1)], "core.broadcast_to", {"shape": [3, -1, 4]}),
        ("permute_dims", [rand((t, 3, 8), dtype, 2)], "core.permute_dims", {"perm": [1, 0, 2]}),
        ("slice", [rand((t, 12), dtype, 3)], "core.slice", {"axis": 1, "start": 2, "step": 3}),
        ("concat", [rand((t, 4), dtype, 4), rand((2, 4), dtype, 5)], "core.concat", {"axis": 0}),
        ("embedding", [rand((50, 16), dtype, 6),
                       np.random.default_rng(t).integers(0, 50, t).astype(np.int64)],
         "core.embedding", {}),
    ]
    for name, xs, op, attrs in cases:
        want = ref(op, xs, **attrs)[0]
        got = np.zeros(want.shape, want.dtype)
        em[f"{name}_{dtype}"](*xs, got)
        np.testing.assert_array_equal(got, want)
    got = np.full(t, -1, np.int64)
    em[f"arange_{dtype}"](rand((t, 4), dtype), got)
    np.testing.assert_array_equal(got, np.arange(t))


def _run_attention(em, name: str, dtype: str, t: int) -> None:
    b, hq, hkv, d, dv, _ = ATTN[name]
    q, k, v = (rand((b, h, t, n), dtype, i) for i, (h, n) in enumerate(
        [(hq, d), (hkv, d), (hkv, dv)]))
    got = np.full((b, t, hq, dv), np.nan, NP[dtype])
    em[f"{name}_{dtype}"](q, k, v, got)
    close(got, attention_ref(q, k, v, 0.3), dtype)


@pytest.mark.parametrize("dtype,name", [("float32", n) for n in ATTN]
                         + [("float16", n) for n in ATTN] + [("bfloat16", "attn")])
@pytest.mark.parametrize("t", [0, 1, 37, 70])
def test_attention(emu, dtype, name, t):
    _run_attention(emu("float32" if dtype == "float32" else "float16"), name, dtype, t)


@pytest.mark.parametrize("order", [1, -1])
def test_attention_warp_serial_orders(emu, order):
    """One warp at a time between block barriers, forwards and backwards: a warp reading a
    K / V tile before all of it is stored, or another overwriting it early, fails here."""
    em = emu("float16")
    em.order(order)
    try:
        for name in ("attn", "attn_simt"):
            _run_attention(em, name, "float16", 70)
        _run_attention(em, "attn", "bfloat16", 37)
    finally:
        em.order(0)


def test_attention_large_scores_stay_finite(emu):
    """Scores in the thousands: the online softmax subtracts the running max, so no exp
    overflows; and a row whose later key tiles are all masked keeps its sums."""
    em = emu("float16")
    b, hq, hkv, d, dv, _ = ATTN["attn"]
    t = 70
    q = rand((b, hq, t, d), "float16", 1, scale=8.0)
    k = rand((b, hkv, t, d), "float16", 2, scale=8.0)
    v = rand((b, hkv, t, dv), "float16", 3)
    got = np.zeros((b, t, hq, dv), np.float16)
    em["attn_float16"](q, k, v, got)
    assert np.isfinite(got.astype(np.float32)).all()
    close(got, attention_ref(q, k, v, 0.3), "float16")


# --------------------------------------------------------------------------- 3. ptxas, sm_90

HEADS = [(64, 64), (128, 128), (192, 128), (16, 12), (256, 256)]  # the last two: SIMT


def build_set(dtype: str):
    ks = [k for k in nn_kernels(dtype) if not k.name.startswith("attn")]
    ks += [named(C.attention(2, 8, 2, d, dv, 0.125, dtype), f"attn_{d}x{dv}_{dtype}")
           for d, dv in HEADS]
    return ks


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_sm90_build_no_spills(dtype):
    kernels = build_set(dtype)
    _, comp = build(kernels)
    for k in kernels:
        r = comp.report[_entry(comp, k)]
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (k.name, r)
        assert 0 < r["registers"] <= 255, (k.name, r)
    for k in kernels:
        if k.name.startswith("attn"):
            d, dv = (int(x) for x in k.name.split("_")[1].split("x"))
            uses_wmma = isinstance(A.attention_config(d, dv, dtype), A.WmmaConfig)
            assert uses_wmma == A.wmma_fits(d, dv, dtype) == ((d, dv) not in HEADS[3:])
            assert has_mma(comp.ptx, _entry(comp, k)) == uses_wmma, k.name


def test_every_grid_is_at_least_one_block():
    for k in build_set("float16") + [_attn_kernel(n, "float32") for n in ATTN]:
        extents = _block_extents(k.func)
        assert extents, k.name
        for ext in extents:
            ok = isinstance(ext, tirx.IntImm) and ext.value >= 1
            ok = ok or (isinstance(ext, tirx.Max) and isinstance(ext.b, tirx.IntImm)
                        and ext.b.value == 1)
            assert ok, f"{k.name}: blockIdx extent {ext} may be 0"


def test_attention_config_choices():
    assert A.attention_config(128, 128, "float16") == A.WmmaConfig(32)
    assert A.attention_config(64, 64, "bfloat16") == A.WmmaConfig(64)
    assert isinstance(A.attention_config(128, 128, "float32"), A.SimtConfig)
    assert isinstance(A.attention_config(72, 72, "float16"), A.SimtConfig)  # not in 16s
    for d, dv in [(64, 64), (128, 128), (256, 256), (576, 512), (24, 20)]:
        cfg = A.attention_config(d, dv, "float16")
        smem = cfg.smem(d, dv) if isinstance(cfg, A.WmmaConfig) else cfg.smem(d, dv, "float16")
        assert smem <= A.SMEM_BUDGET
    with pytest.raises(Exception, match="multiple"):
        C.attention(1, 3, 2, 16, 16, 1.0, "float16")


# --------------------------------------------------------------------------- 4. lowering


def test_cuda_lowering_uses_the_cuda_nn_builders():
    from moec.codegen import lower as L
    from moec.codegen.kernels import nn as cpu_nn
    from moec.codegen.lower_nn import _library
    from moec.ir.builder import IRBuilder

    b = IRBuilder()
    t = b.dim("T", 1, 64)
    ids = b.input("ids", (t,), "i64")
    table = b.param("embed", rand((40, 32), "float16"))
    x = b.op("core.embedding", [table, ids])
    heads = b.op("core.permute_dims", [b.op("core.reshape", [x], {"shape": [1, -1, 2, 16]})],
                 {"perm": [0, 2, 1, 3]})
    lo = b.op("core.slice", [heads], {"axis": 3, "start": 0, "stop": 8})
    hi = b.op("core.slice", [heads], {"axis": 3, "start": 8})
    rot = b.op("core.concat", [hi, lo], {"axis": 3})
    pos = b.op("core.cos", [b.op("core.cast", [b.op("core.arange", [ids])], {"dtype": "f16"})])
    y = b.op("core.attention", [rot, heads, heads], {"scale": 0.25})
    b.output(y, pos)
    lowered = L.lower(b.graph, library=C)
    funcs = {gv.name_hint: f for gv, f in lowered.mod.functions_items()
             if isinstance(f, tirx.PrimFunc)}
    for kind in ("embedding", "permute_dims", "slice", "concat", "arange", "cos", "attention"):
        names = [n for n in funcs if n.startswith(kind)]
        assert names, (kind, sorted(funcs))
        for n in names:  # scheduled for the GPU: bound to blockIdx
            assert _block_extents(funcs[n]), n
    gpu, cpu = (_library(type("Lw", (), {"cuda": c})()) for c in (True, False))
    for name in ("embedding", "attention", "concat2", "paged_attention", "cache_write"):
        assert getattr(gpu, name) is getattr(N, name), name  # the CUDA builders
    assert cpu.embedding is cpu_nn.embedding and cpu.attention is cpu_nn.attention
    assert isinstance(lowered.mod, tvm.IRModule)


@pytest.mark.slow
def test_cuda_lowered_module_builds(monkeypatch):
    """The lowered Relax module of the test above through nvcc: the whole-model kernels link
    into one library with a symbolic token count."""
    from moec.codegen import lower as L
    from moec.codegen.cuda.build import collect_compilations

    captured = {}
    orig = L.lower

    def spy(*a, **k):
        captured["lowered"] = orig(*a, **k)
        return captured["lowered"]

    monkeypatch.setattr(L, "lower", spy)
    test_cuda_lowering_uses_the_cuda_nn_builders()
    with collect_compilations() as comps:
        C.build_cuda(captured["lowered"].mod)
    (comp,) = comps
    for name, r in comp.report.items():
        assert r["spill_stores"] == 0, (name, r)
    assert any(n.startswith("attention_float16") for n in comp.report)


# --------------------------------------------------------------------------- 5. on a GPU

# Skipped without a device; `pytest -m gpu` runs them (test_cuda_gpu.py's helpers).
HAS_GPU = __import__("torch").cuda.is_available()


@pytest.mark.parametrize("dtype,d,dv", [("float16", 128, 128), ("bfloat16", 128, 128),
                                        ("float16", 64, 64), ("bfloat16", 192, 128),
                                        ("float16", 80, 80), ("float16", 72, 72),
                                        ("float32", 128, 128)])
@pytest.mark.parametrize("t", [1, 100, 300])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="no CUDA device")
def test_attention_on_gpu(dtype, d, dv, t):
    from .test_cuda_gpu import dev, run, to_np

    b, hq, hkv = 2, 8, 2
    xs = [to_np(dev(rand((b, h, t, n), "float32", i), dtype))
          for i, (h, n) in enumerate([(hq, d), (hkv, d), (hkv, dv)])]
    want = attention_ref(*xs, d ** -0.5)
    (got,) = run(C.attention(b, hq, hkv, d, dv, d ** -0.5, dtype),
                 [dev(x, dtype) for x in xs], [((b, t, hq, dv), dtype)])
    close(to_np(got), want, dtype)


@pytest.mark.parametrize("t", [0, 1, 300])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="no CUDA device")
def test_copies_on_gpu(t):
    from .test_cuda_gpu import dev, run, to_np

    dtype = "float16"
    x = rand((t, 4, 64), dtype, 1)
    ids = np.random.default_rng(t).integers(0, 50, t).astype(np.int64)
    w = rand((50, 64), dtype, 2)
    cases = [
        (C.permute_dims(("T", 4, 64), (1, 0, 2), dtype), [x], "core.permute_dims",
         {"perm": [1, 0, 2]}),
        (C.slice_axis(("T", 4, 64), ("T", 4, 32), 2, 32, 1, dtype), [x], "core.slice",
         {"axis": 2, "start": 32}),
        (C.concat2(("T", 4, 64), ("T", 4, 64), 2, dtype), [x, x], "core.concat", {"axis": 2}),
        (C.embedding(50, 64, ("T",), dtype, "int64"), [w, ids], "core.embedding", {}),
        (C.unary_trig("cos", ("T", 4, 64), dtype), [x], "core.cos", {}),
    ]
    for kern, xs, op, attrs in cases:
        want = ref(op, xs, **attrs)[0]
        (got,) = run(kern, [dev(a) for a in xs], [(want.shape, str(want.dtype))])
        close(to_np(got), want, dtype)
