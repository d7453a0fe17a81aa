"""The CUDA quantised grouped GEMM (`grouped_matmul_quant`, gemm_quant.py) against the reference
of moe.grouped_matmul_q (which dequantises, then runs moe.grouped_matmul's reference):

- its te definition, built for the CPU: float32 within 2e-5, float16 within 1e-2 (the weights
  are dequantised to the compute dtype, as on the GPU);
- the generated CUDA, run by the CPU emulator: fp16/bf16 within rel/abs 1e-2 (the output and,
  group-wise, the dequantised weights are rounded to the half type), float32 within 1e-4;
- the sm_90 build: no spills and no local memory, tensor cores (mma) for fp16/bf16, weights
  read from global memory as int8 / uint8; a Relax module calling two of them builds;
- on a CUDA device (`-m gpu`, skipped without one): the emulated cases.

Padding rows and rows of unused tiles are unspecified, as for moe.grouped_matmul."""

from __future__ import annotations

import dataclasses
import functools
import re

import numpy as np
import pytest
import torch  # a hard dependency of moec
import tvm
from tvm import relax, tirx

from moec.codegen import cuda as C
from moec.codegen.cuda.base import Kernel
from moec.codegen.cuda.build import collect_compilations, has_mma
from moec.codegen.cuda.gemm_quant import define_grouped_matmul_quant
from moec.errors import CodegenError
from moec.ir.moe_ops import align_ref
from moec.ir.quant_ops import quantize

from .emulator import emulate
from .test_cuda_build import FATBIN_MAGIC, _kernel_source
from .test_cuda_definitions import _CPU, close, ref
from .test_cuda_emulated import NP

# quantisation formats: (bits, group_size); group_size >= K is one group (per channel)
INT8_CHANNEL, INT8_GROUP, INT4_G32, INT4_G64 = (8, 128), (8, 16), (4, 32), (4, 64)


def route(tokens: int, e: int, k: int, how: str, seed: int) -> np.ndarray:
    """Distinct expert choices per token: `uniform`, or `skewed` (a few experts get most)."""
    rng = np.random.default_rng(seed)
    if tokens == 0:
        return np.zeros((0, k), np.int32)
    p = rng.dirichlet(np.ones(e) * 0.3) if how == "skewed" else np.full(e, 1.0 / e)
    return np.stack([rng.choice(e, k, replace=False, p=p) for _ in range(tokens)]).astype(
        np.int32)


def operands(e: int, n: int, kd: int, bm: int, top: int, gather: bool, act: str, bias: bool,
             bits: int, gs: int, dtype, tokens: int, how: str = "skewed", seed: int = 0):
    """(inputs in the op's order, sorted_ids, tile_expert) for `tokens` routed tokens."""
    rng = np.random.default_rng(seed)
    sid, eid, _ = align_ref(route(tokens, e, top, how, seed), e, bm)
    nw = 2 if act.endswith("_mul") else 1
    x = rng.standard_normal((tokens if gather else len(sid), kd)).astype(dtype)
    qs = [p for _ in range(nw) for p in quantize(
        (rng.standard_normal((e, n, kd)) / 8).astype(np.float32), bits, gs)]
    bs = [rng.standard_normal((e, n)).astype(dtype) for _ in range(nw if bias else 0)]
    return [x, *qs, *bs, sid, eid], sid, eid


def reference(xs, bm, top, gather, act, bias, bits, gs) -> np.ndarray:
    return ref("moe.grouped_matmul_q", xs, block_m=bm, top_k=top, gather=gather,
               activation=act, bias=bias, bits=bits, group_size=gs)[0]


def used_rows(sid: np.ndarray, eid: np.ndarray, bm: int, tokens: int, top: int,
              gather: bool) -> np.ndarray:
    rows = np.repeat(eid >= 0, bm)  # rows of unused tiles are unspecified,
    if gather:  # and so are padding rows (the reference writes 0, the kernel act(bias))
        rows &= sid < tokens * top
    return rows


# --------------------------------------------------------------------------- te definition

DEF_E, DEF_N, DEF_K, DEF_BM, DEF_TOP = 5, 32, 64, 16, 2
DEF_CASES = [  # (activation, gather, bias, dtype)
    ("silu_mul", True, False, "float32"),
    ("none", False, True, "float32"),
    ("clamped_swiglu_mul", True, True, "float16"),
]


@functools.cache
def _cpu_definition(act: str, gather: bool, bias: bool, bits: int, gs: int, dtype: str):
    func = define_grouped_matmul_quant(DEF_E, DEF_N, DEF_K, DEF_BM, DEF_TOP, gather, act, bits,
                                       gs, dtype, bias)
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), _CPU)


@pytest.mark.parametrize("quant", [INT8_CHANNEL, INT8_GROUP, INT4_G32, INT4_G64],
                         ids=lambda q: f"int{q[0]}_g{q[1]}")
@pytest.mark.parametrize("act,gather,bias,dtype", DEF_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("how", ["skewed", "uniform"])
@pytest.mark.parametrize("tokens", [0, 1, 37])
def test_definition(quant, act, gather, bias, dtype, how, tokens):
    bits, gs = quant
    xs, sid, eid = operands(DEF_E, DEF_N, DEF_K, DEF_BM, DEF_TOP, gather, act, bias, bits, gs,
                            dtype, tokens, how, seed=tokens)
    ex = _cpu_definition(act, gather, bias, bits, gs, dtype)
    out = tvm.runtime.empty((len(sid), DEF_N), dtype, tvm.cpu())
    ex["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in xs], out)
    want = reference(xs, DEF_BM, DEF_TOP, gather, act, bias, bits, gs)
    rows = used_rows(sid, eid, DEF_BM, tokens, DEF_TOP, gather)
    close(out.numpy()[rows], want[rows], dtype)


def test_definition_last_group_short():
    """K = 40 in groups of 16: the last int8 group holds 8 columns; int4 with K = 48 in 32s."""
    for kd, bits, gs in ((40, 8, 16), (48, 4, 32)):
        func = define_grouped_matmul_quant(4, 24, kd, 16, 2, True, "silu_mul", bits, gs,
                                           "float32")
        ex = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), _CPU)
        xs, sid, eid = operands(4, 24, kd, 16, 2, True, "silu_mul", False, bits, gs,
                                np.float32, 20)
        out = tvm.runtime.empty((len(sid), 24), "float32", tvm.cpu())
        ex["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in xs], out)
        want = reference(xs, 16, 2, True, "silu_mul", False, bits, gs)
        rows = used_rows(sid, eid, 16, 20, 2, True)
        close(out.numpy()[rows], want[rows], "float32")


def test_rejects_bad_arguments():
    with pytest.raises(CodegenError):
        C.grouped_matmul_quant(4, 8, 7, 16, 2, True, bits=4)  # int4 needs an even K
    with pytest.raises(CodegenError):
        C.grouped_matmul_quant(4, 8, 16, 16, 2, True, bits=3)
    with pytest.raises(CodegenError):
        C.grouped_matmul_quant(4, 8, 16, 16, 2, True, "swish")
    with pytest.raises(CodegenError):
        C.grouped_matmul_quant(4, 8, 16, 16, 2, True, dtype="int8")


# --------------------------------------------------------------------------- emulated CUDA

EMU = {  # name: (E, N, K, block_m, top_k, gather, activation, bias, bits, group_size, dtype)
    "up_i8c": (8, 64, 128, 32, 2, True, "silu_mul", False, 8, 128, "float16"),
    "down_i4g32": (8, 64, 64, 16, 2, False, "none", True, 4, 32, "bfloat16"),
    "up_i8g32": (8, 32, 64, 16, 2, True, "gelu_mul", False, 8, 32, "bfloat16"),
    "swiglu_i4c": (8, 32, 64, 16, 2, True, "clamped_swiglu_mul", True, 4, 64, "float16"),
    "up_i4g16_f32": (8, 32, 64, 16, 2, True, "silu_mul", False, 4, 16, "float32"),
}
EMU_SLOW = {  # shapes off the main path: SIMT fallbacks for half types, groups across vectors
    "odd_bm8": (4, 100, 40, 8, 2, True, "silu_mul", False, 4, 8, "float16"),
    "odd_k48": (4, 64, 48, 32, 1, False, "relu", False, 8, 6, "float16"),
    "odd_bm128": (4, 128, 64, 128, 2, True, "gelu_tanh_mul", False, 4, 32, "bfloat16"),
    "odd_f32": (4, 64, 64, 64, 2, False, "none", True, 8, 128, "float32"),
}


def _named(kernel: Kernel, name: str) -> Kernel:
    """Names of their own (the emulator's launch hooks are process-wide)."""
    name = f"gmmq_{name}"
    return dataclasses.replace(kernel, func=kernel.func.with_attr("global_symbol", name),
                               name=name)


def _kernels(cases: dict) -> list[Kernel]:
    return [_named(C.grouped_matmul_quant(*c[:7], bits=c[8], group_size=c[9], dtype=c[10],
                                          bias=c[7]), n) for n, c in cases.items()]


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return emulate(_kernels(EMU), tmp_path_factory.mktemp("emu_quant"))


def _run_emulated(em, name: str, case: tuple, tokens: int, how: str = "skewed") -> None:
    e, n, kd, bm, top, gather, act, bias, bits, gs, dtype = case
    xs, sid, eid = operands(e, n, kd, bm, top, gather, act, bias, bits, gs, NP[dtype], tokens,
                            how, seed=tokens + 1)
    want = reference(xs, bm, top, gather, act, bias, bits, gs)
    got = np.zeros((len(sid), n), NP[dtype])
    em[f"gmmq_{name}"](*xs, got)
    rows = used_rows(sid, eid, bm, tokens, top, gather)
    tol = 1e-4 if dtype == "float32" else 1e-2
    np.testing.assert_allclose(got[rows].astype(np.float32), want[rows].astype(np.float32),
                               rtol=tol, atol=tol)


@pytest.mark.parametrize("name", list(EMU))
@pytest.mark.parametrize("tokens,how", [(0, "skewed"), (37, "skewed"), (37, "uniform")])
def test_emulated(emu, name, tokens, how):
    _run_emulated(emu, name, EMU[name], tokens, how)


@pytest.mark.parametrize("order", [1, -1])
def test_emulated_warp_serial(emu, order):
    """One warp at a time between barriers, both orders: the register-staged dequantised tile
    and the accumulator staging need their __syncthreads (see test_cuda_emulated.py)."""
    emu.order(order)
    try:
        _run_emulated(emu, "up_i8c", EMU["up_i8c"], 37)
    finally:
        emu.order(0)


@pytest.mark.slow
@pytest.mark.parametrize("order", [0, -1])
def test_emulated_odd_configs(tmp_path, order):
    em = emulate(_kernels(EMU_SLOW), tmp_path)
    em.order(order)
    for name, case in EMU_SLOW.items():
        _run_emulated(em, name, case, 150)
    em.order(0)


# --------------------------------------------------------------------------- sm_90 build

# DeepSeek-V2-Lite-like experts (E=64, top-6, H=2048, I=1408): gate/up with gather, down; and
# GPT-OSS-like decode tiles with the biased clamped SwiGLU
BUILD = [  # (E, N, K, block_m, top_k, gather, activation, bias, bits, group_size)
    (64, 1408, 2048, 64, 6, True, "silu_mul", False, 8, 2048),
    (64, 2048, 1408, 64, 6, False, "none", False, 8, 128),
    (64, 1408, 2048, 64, 6, True, "silu_mul", False, 4, 128),
    (32, 512, 256, 16, 4, True, "clamped_swiglu_mul", True, 4, 32),
]


@pytest.fixture(scope="module")
def half_build():
    kernels = {(c, dt): C.grouped_matmul_quant(*c[:7], bits=c[8], group_size=c[9], dtype=dt,
                                               bias=c[7])
               for dt in ("float16", "bfloat16") for c in BUILD}
    kernels[("fp32", "float32")] = C.grouped_matmul_quant(*BUILD[2][:7], bits=4, group_size=128,
                                                          dtype="float32")
    with collect_compilations() as comps:
        C.build_cuda(tvm.IRModule({k.name: k.func for k in kernels.values()}))
    (comp,) = comps
    return kernels, comp


def test_build_sm90_no_spills_tensor_cores(half_build):
    kernels, comp = half_build
    assert len({k.name for k in kernels.values()}) == len(kernels)
    assert comp.arch == "sm_90" and comp.fatbin[:4] == FATBIN_MAGIC
    for (_, dtype), k in kernels.items():
        entry = f"{k.name}_kernel"
        r = comp.report[entry]
        # no spills, and no local memory at all (the dequantised vector stays in registers)
        assert r["spill_stores"] == r["spill_loads"] == r["stack"] == 0, (k.name, r)
        assert 0 < r["registers"] <= 255, (k.name, r)
        assert has_mma(comp.ptx, entry) == (dtype != "float32"), k.name
        # the weights are read as bytes: int8, or packed int4 in uint8
        params = re.search(rf"void __launch_bounds__\(\d+\) {entry}\(([^)]*)\)", comp.source)
        qtype = "signed char" if k.name.startswith("grouped_matmul_q8") else "uchar"
        assert f"{qtype}* __restrict__ q_ptr" in params.group(1), k.name
        assert "q_ptr[" in _kernel_source(comp.source, entry), k.name


def test_relax_quantised_experts_build():
    """gate/up (int4, gather) -> down (int8 per channel) through Relax call_tir with a symbolic
    token count, as the lowering emits them: the module builds and embeds a fatbin."""
    e, h, i, bm, top = 8, 256, 128, 16, 2
    ku = C.grouped_matmul_quant(e, i, h, bm, top, True, "silu_mul", 4, 64, "bfloat16")
    kd = C.grouped_matmul_quant(e, h, i, bm, top, False, "none", 8, 128, "bfloat16")
    tok = tirx.Var("T", "int64")
    rows = (tok * top // bm + e) * bm

    def var(name, shape, dtype):
        return relax.Var(name, relax.TensorType(shape, dtype))

    x = var("x", (tok, h), "bfloat16")
    sid, eid = var("sid", (rows,), "int32"), var("eid", (tok * top // bm + e,), "int32")
    up = [var(f"{n}{w}", shape, dt) for w in ("", "2") for n, shape, dt in (
        ("q", (e, i, h // 2), "uint8"), ("s", (e, i, h // 64), "float32"),
        ("z", (e, i, h // 64), "float32"))]
    down = [var("qd", (e, h, i), "int8"), var("sd", (e, h, 1), "float32")]
    bb = relax.BlockBuilder()
    with bb.function("main", [x, *up, *down, sid, eid]):
        gu, gd = bb.add_func(ku.func, ku.name), bb.add_func(kd.func, kd.name)
        with bb.dataflow():
            hid = bb.emit(relax.call_tir(gu, [x, *up, sid, eid],
                                         relax.TensorType((rows, i), "bfloat16")))
            out = bb.emit_output(bb.emit(relax.call_tir(gd, [hid, *down, sid, eid],
                                                        relax.TensorType((rows, h), "bfloat16"))))
        bb.emit_func_output(out)
    with collect_compilations() as comps:
        C.build_cuda(bb.get())
    (comp,) = comps
    assert {f"{ku.name}_kernel", f"{kd.name}_kernel"} <= set(comp.report)
    assert comp.fatbin[:4] == FATBIN_MAGIC


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", list(EMU))
@pytest.mark.parametrize("tokens,how", [(0, "skewed"), (1, "skewed"), (300, "skewed"),
                                        (300, "uniform")])
def test_gpu(name, tokens, how):
    """The emulated cases on a CUDA device (deselected by default, like test_cuda_gpu.py)."""
    e, n, kd, bm, top, gather, act, bias, bits, gs, dtype = EMU[name]
    xs, sid, eid = operands(e, n, kd, bm, top, gather, act, bias, bits, gs, NP[dtype], tokens,
                            how, seed=tokens + 1)
    want = reference(xs, bm, top, gather, act, bias, bits, gs)
    k = C.grouped_matmul_quant(*EMU[name][:7], bits=bits, group_size=gs, dtype=dtype, bias=bias)
    ex = C.build_cuda(tvm.IRModule({k.name: k.func}))

    def dev(a: np.ndarray):
        a = np.ascontiguousarray(a)
        if a.dtype == NP["bfloat16"]:
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).cuda()
        return torch.from_numpy(a).cuda()

    out = dev(np.zeros((len(sid), n), NP[dtype]))
    ex[k.name](*[dev(a) for a in xs], out)
    torch.cuda.synchronize()
    got = out.float().cpu().numpy()
    rows = used_rows(sid, eid, bm, tokens, top, gather)
    tol = 1e-4 if dtype == "float32" else 1e-2
    np.testing.assert_allclose(got[rows], want[rows].astype(np.float32), rtol=tol, atol=tol)
