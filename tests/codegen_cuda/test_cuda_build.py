"""Build-only checks of the CUDA kernel library (no GPU needed): every kernel compiles with nvcc
for sm_90 (a subset for sm_80), no kernel spills registers, the grouped GEMMs use tensor cores
in fp16/bf16, every grid survives a zero token count, and a Relax MoE block builds into a
library that embeds a fatbin."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import tvm
from tvm import relax, tirx

from moec.codegen import cuda as C
from moec.codegen.cuda import build as cuda_build
from moec.codegen.cuda.build import (
    CudaCompilation,
    collect_compilations,
    has_mma,
    parse_ptxas_log,
    ptx_entries,
    ptxas_report,
)

from .cases import BM, K_TOP, E, H, I, float32_set, kernel_set, sm80_set

FATBIN_MAGIC = b"\x50\xed\x55\xba"


def build(kernels: list[C.Kernel], arch: str = "sm_90"
          ) -> tuple[tvm.runtime.Executable, CudaCompilation]:
    mod = tvm.IRModule({k.name: k.func for k in kernels})
    with collect_compilations() as comps:
        ex = C.build_cuda(mod, arch)
    assert len(comps) == 1  # one nvcc run for the whole module
    return ex, comps[0]


@pytest.fixture(scope="module", params=["float16", "bfloat16"])
def half_build(request):
    kernels = kernel_set(request.param)
    ex, comp = build(kernels)
    return request.param, kernels, ex, comp


@pytest.fixture(scope="module")
def fp32_build():
    kernels = float32_set()
    ex, comp = build(kernels)
    return kernels, ex, comp


def _entry(comp: CudaCompilation, kernel: C.Kernel) -> str:
    names = [n for n in comp.report if n == f"{kernel.name}_kernel"]
    assert names, f"{kernel.name}: no kernel in the ptxas log ({sorted(comp.report)})"
    return names[0]


def test_every_kernel_compiles_without_spills(half_build):
    dtype, kernels, _, comp = half_build
    assert comp.arch == "sm_90" and comp.fatbin[:4] == FATBIN_MAGIC
    for k in kernels:
        r = comp.report[_entry(comp, k)]
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (k.name, r)
        assert 0 < r["registers"] <= 255, (k.name, r)


def test_grouped_gemms_use_tensor_cores(half_build):
    dtype, kernels, _, comp = half_build
    gemms = [k for k in kernels if k.name.startswith(("grouped_matmul", "linear"))]
    assert len(gemms) == 4
    for k in gemms:
        assert has_mma(comp.ptx, _entry(comp, k)), f"{k.name}: no mma in its PTX"
    others = [k for k in kernels if k not in gemms]
    assert not any(has_mma(comp.ptx, _entry(comp, k)) for k in others)


def _kernel_source(source: str, entry: str) -> str:
    """The body of kernel `entry` in the generated CUDA (up to the next kernel)."""
    m = re.search(rf"void __launch_bounds__\(\d+\) {entry}\([^)]*\)\s*\{{", source)
    assert m, entry
    body = source[m.end():]
    return body.split('extern "C"')[0]


def test_gemm_barriers_around_accumulator_staging(half_build):
    """The accumulators are staged in shared memory that aliases the operand tiles: a barrier
    must separate the last tensor-core reads from the stores, and the stores from the epilogue
    (TVM's planner does not see either; gemm.py inserts them)."""
    _, kernels, _, comp = half_build
    for k in kernels:
        if not k.name.startswith(("grouped_matmul", "linear")):
            continue
        src = _kernel_source(comp.source, f"{k.name}_kernel")
        last_mma = src.rindex("mma_sync(")
        first_store = src.index("store_matrix_sync(")
        first_out = src.index("O_ptr[", first_store)
        assert "__syncthreads()" in src[last_mma:first_store], k.name
        assert "__syncthreads()" in src[first_store:first_out], k.name


def test_library_embeds_fatbin_not_source(half_build, tmp_path: Path):
    _, _, ex, _ = half_build
    lib = tmp_path / "kernels.so"
    ex.export_library(str(lib))
    data = lib.read_bytes()
    assert FATBIN_MAGIC in data
    assert b"__global__" not in data  # no CUDA source left for a compiler at load time


def test_float32_uses_simt_without_spills(fp32_build):
    kernels, _, comp = fp32_build
    for k in kernels:
        entry = _entry(comp, k)
        assert comp.report[entry]["spill_stores"] == 0, (k.name, comp.report[entry])
        assert not has_mma(comp.ptx, entry)


def test_sm80_build():
    kernels = sm80_set()
    _, comp = build(kernels, "sm_80")
    assert comp.arch == "sm_80" and ".target sm_80" in comp.ptx
    for k in kernels:
        assert comp.report[_entry(comp, k)]["spill_stores"] == 0
    assert has_mma(comp.ptx, _entry(comp, kernels[0]))


def test_ptxas_report_matches_the_build_log(fp32_build, tmp_path: Path):
    _, _, comp = fp32_build
    want = {n: r["registers"] for n, r in comp.report.items()}
    assert {n: r["registers"] for n, r in ptxas_report(comp.ptx).items()} == want
    ptx, cubin = tmp_path / "k.ptx", tmp_path / "k.cubin"
    ptx.write_text(comp.ptx)
    subprocess.run([cuda_build.find_cuda_tool("ptxas"), "-arch=sm_90", "-o", str(cubin), str(ptx)],
                   check=True)
    assert {n: r["registers"] for n, r in ptxas_report(cubin).items()} == want


def test_parse_ptxas_log_and_has_mma():
    log = """ptxas info    : Compiling entry function 'k1_kernel' for 'sm_90'
ptxas info    : Function properties for k1_kernel
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 32768 bytes smem
ptxas info    : Compiling entry function 'k2_kernel' for 'sm_90'
ptxas info    : Function properties for k2_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 12 registers, used 0 barriers
"""
    r = parse_ptxas_log(log)
    assert r["k1_kernel"] == {"registers": 255, "spill_stores": 4, "spill_loads": 4,
                              "stack": 8, "smem": 32768}
    assert r["k2_kernel"]["registers"] == 12 and r["k2_kernel"]["spill_stores"] == 0
    ptx = (".visible .entry a(\n\tld.global.f32 %f1, [%rd1];\n"
           ".visible .entry b(\n\twmma.mma.sync.aligned.row.col.m16n16k16.f32.f16 {%f1}, {};\n")
    assert set(ptx_entries(ptx)) == {"a", "b"}
    assert has_mma(ptx) and has_mma(ptx, "b") and not has_mma(ptx, "a")


def _block_extents(func: tirx.PrimFunc) -> list[tirx.PrimExpr]:
    out: list[tirx.PrimExpr] = []

    def visit(node):
        if isinstance(node, tirx.For) and node.thread_binding is not None and str(
                node.thread_binding.thread_tag).startswith("blockIdx"):
            out.append(node.extent)
        if isinstance(node, tirx.AttrStmt) and node.attr_key == "thread_extent" and str(
                node.node.thread_tag).startswith("blockIdx"):
            out.append(node.value)
        return node

    import tvm_ffi

    tvm_ffi.structural_map(func, [((tirx.For, tirx.AttrStmt), visit)])
    return out


def test_every_grid_is_at_least_one_block():
    """A symbolic token count of 0 must not give a zero grid (the CUDA runtime rejects it):
    every blockIdx extent is a constant or max(..., 1)."""
    for k in kernel_set("float16"):
        extents = _block_extents(k.func)
        assert extents, k.name
        for ext in extents:
            ok = isinstance(ext, tirx.IntImm) and ext.value >= 1
            ok = ok or (isinstance(ext, tirx.Max) and isinstance(ext.b, tirx.IntImm)
                        and ext.b.value == 1)
            assert ok, f"{k.name}: blockIdx extent {ext} may be 0"


def moe_block(dtype: str) -> tvm.IRModule:
    """Relax: router -> align -> grouped gate/up (silu_mul, gather) -> grouped down -> combine,
    with a symbolic token count, as moec's lowering emits it."""
    tok = tirx.Var("T", "int64")
    tiles = tok * K_TOP // BM + E
    rows = tiles * BM
    kr = C.router(H, E, K_TOP, "softmax", "score_topk", True, 1.0, False, 1, 1, "max", dtype)
    ka = C.align(E, K_TOP, BM)
    ku = C.grouped_matmul(E, I, H, BM, K_TOP, True, "silu_mul", dtype)
    kd = C.grouped_matmul(E, H, I, BM, K_TOP, False, "none", dtype)
    kc = C.combine(H, K_TOP, dtype)
    x = relax.Var("x", relax.TensorType((tok, H), dtype))
    wr = relax.Var("wr", relax.TensorType((E, H), dtype))
    wg = relax.Var("wg", relax.TensorType((E, I, H), dtype))
    wu = relax.Var("wu", relax.TensorType((E, I, H), dtype))
    wd = relax.Var("wd", relax.TensorType((E, H, I), dtype))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, wr, wg, wu, wd]):
        g = {k.name: bb.add_func(k.func, k.name) for k in (kr, ka, ku, kd, kc)}
        with bb.dataflow():
            r = bb.emit(relax.call_tir(g[kr.name], [x, wr], [
                relax.TensorType((tok, K_TOP), "float32"),
                relax.TensorType((tok, K_TOP), "int32")]))
            wts, ids = bb.emit(relax.TupleGetItem(r, 0)), bb.emit(relax.TupleGetItem(r, 1))
            a = bb.emit(relax.call_tir(g[ka.name], [ids], [
                relax.TensorType((rows,), "int32"), relax.TensorType((tiles,), "int32"),
                relax.TensorType((tok, K_TOP), "int32")]))
            sid, eid, srow = (bb.emit(relax.TupleGetItem(a, i)) for i in range(3))
            h = bb.emit(relax.call_tir(g[ku.name], [x, wg, wu, sid, eid],
                                       relax.TensorType((rows, I), dtype)))
            y = bb.emit(relax.call_tir(g[kd.name], [h, wd, sid, eid],
                                       relax.TensorType((rows, H), dtype)))
            out = bb.emit_output(bb.emit(relax.call_tir(g[kc.name], [y, wts, srow],
                                                        relax.TensorType((tok, H), dtype))))
        bb.emit_func_output(out)
    return bb.get()


def test_relax_moe_block_builds(tmp_path: Path):
    with collect_compilations() as comps:
        ex = C.build_cuda(moe_block("bfloat16"))
    (comp,) = comps
    assert {"align_kernel", "combine_bfloat16_kernel"} <= set(comp.report)
    lib = tmp_path / "moe.so"
    ex.export_library(str(lib))
    assert FATBIN_MAGIC in lib.read_bytes()


def test_nd_row_ops_lower_through_2d_views():
    """Softmax, RMSNorm, mean and sum over the last axis of a 3-D tensor (attention heads) are
    lowered for CUDA as their 2-D kernels on [rows, n] views: the reshapes cost no kernel, and
    every reduction is a cross-thread one (warp shuffles), not the racy shared-memory update TVM
    emitted for a row of several fused loops. The builders refuse such rows themselves."""
    import numpy as np

    from moec.codegen.lower import lower
    from moec.errors import CodegenError
    from moec.ir import parse

    g = parse("""
        dim T: 0..64
        input %x: f16[T, 4, 64]
        param @w: f16[64]
        %s: f16[T, 4, 64] = core.softmax(%x) {axis=-1}
        %r: f16[T, 4, 64] = core.rmsnorm(%s, @w) {eps=1e-6}
        %m: f16[T, 4, 1] = core.mean(%r) {axis=2, keepdim=true}
        %q: f16[T, 4] = core.sum(%r) {axis=-1}
        output %m, %q
    """)
    g.param_data["w"] = np.ones(64, np.float16)
    with collect_compilations() as comps:
        C.build_cuda(lower(g, library=C).mod)
    (comp,) = comps
    assert sorted(k.split("_")[0] for k in comp.report) == ["mean", "rmsnorm", "softmax", "sum"]
    for name in comp.report:
        assert "__shfl" in _kernel_source(comp.source, name), name
    with pytest.raises(CodegenError, match="rows, n"):
        C.softmax((2, "T", 64), -1, "float16")


def test_a_cuda_build_leaves_process_state_as_it_was(fp32_build):
    """Building registers moec's nvcc callback only for the build (TVM's own is put back), and
    the build-time stub libcuda stays out of the process's global symbol scope (it was loaded
    RTLD_GLOBAL)."""
    import ctypes

    import tvm_ffi

    name = "tvm_callback_cuda_compile"
    before = tvm.get_global_func(name, allow_missing=True)
    tvm_ffi.register_global_func(name, lambda *_: bytearray(b"sentinel"), override=True)
    try:
        build(float32_set()[:1])
        assert bytes(tvm.get_global_func(name)("code", "ptx")) == b"sentinel"
    finally:
        if before is not None:
            tvm_ffi.register_global_func(name, before, override=True)
        else:
            tvm_ffi.remove_global_func(name)

    class DlInfo(ctypes.Structure):
        _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                    ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]

    libc = ctypes.CDLL(None)
    libc.dlsym.restype = ctypes.c_void_p
    libc.dlsym.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    addr = libc.dlsym(None, b"cuModuleLoadData")  # RTLD_DEFAULT: the global scope
    if addr:  # a real driver library may provide it; the stub must not
        info = DlInfo()
        assert libc.dladdr(ctypes.c_void_p(addr), ctypes.byref(info))
        assert b"moec_stub_cuda" not in (info.dli_fname or b""), info.dli_fname
