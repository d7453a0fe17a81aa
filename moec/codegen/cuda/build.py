"""Compile modules for CUDA with the local nvcc, and inspect what ptxas made of them.

TVM only emits a binary CUDA module when its CUDA runtime plugin (`libtvm_runtime_cuda.so`) is
loaded, and that plugin links against the driver library `libcuda.so.1`, which a GPU-less build
machine does not have. `build_cuda` therefore generates a *stub* `libcuda.so.1` (every driver
entry point the plugin imports, each failing with "no device") in a temporary directory, loads it
into this process only, and then loads the plugin. The stub is never shipped: the exported library
embeds a fatbin (SASS for the target arch + PTX of the same arch for newer GPUs) and needs no
compiler at load time; on the GPU machine the real driver is used.

`tvm_callback_cuda_compile` is overridden to run nvcc here (TVM's default is NVRTC, which needs
the `cuda-bindings` package) and to keep the PTX and the `ptxas -v` log of each compilation, so
tests can check register use, spills and tensor-core instructions without a GPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import tvm
import tvm_ffi

from moec.errors import CodegenError

__all__ = ["CudaCompilation", "build_cuda", "collect_compilations", "cuda_target", "has_mma",
           "ptx_entries", "ptxas_report", "parse_ptxas_log", "find_cuda_tool",
           "ToolNotFoundError"]

# Driver entry points of TVM 0.27's CUDA plugin, used when `nm` is not available to list them.
_DRIVER_SYMBOLS = ("cuDeviceGetName", "cuFuncSetAttribute", "cuGetErrorName", "cuGetErrorString",
                   "cuLaunchKernelEx", "cuModuleGetFunction", "cuModuleLoadData",
                   "cuModuleUnload", "cuTensorMapEncodeTiled")
_NO_DEVICE = 100  # CUDA_ERROR_NO_DEVICE
_plugin_ready = False
_collectors: list[list[CudaCompilation]] = []


@dataclass
class CudaCompilation:
    """One nvcc run: the CUDA source TVM generated, its PTX, the fatbin and the ptxas log."""

    arch: str
    source: str
    ptx: str
    fatbin: bytes
    ptxas_log: str
    report: dict[str, dict[str, int]] = field(default_factory=dict)


class ToolNotFoundError(CodegenError):
    """A program that building CUDA kernels needs (nvcc, ptxas, a C compiler) is not installed.
    The test suite reports tests that stop on it as skipped, with this message."""


def find_cuda_tool(name: str) -> str:
    """Path of a CUDA toolkit program (nvcc, ptxas): PATH first, then the usual install dirs."""
    found = shutil.which(name)
    if found:
        return found
    roots = [os.environ.get("CUDA_HOME", ""), os.environ.get("CUDA_PATH", ""), "/usr/local/cuda"]
    roots += sorted((str(p) for p in Path("/usr/local").glob("cuda-*")), reverse=True)
    for root in roots:
        cand = Path(root) / "bin" / name
        if root and cand.is_file():
            return str(cand)
    raise ToolNotFoundError(f"{name} not found: install the CUDA toolkit (or the "
                            f"nvidia-cuda-nvcc wheel) or put its bin/ on PATH or in CUDA_HOME")


# --------------------------------------------------------------------------- plugin with a stub


def _driver_symbols(plugin: Path) -> list[str]:
    try:
        out = subprocess.run(["nm", "-D", "--undefined-only", str(plugin)], capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return list(_DRIVER_SYMBOLS)
    syms = {ln.split()[-1].split("@")[0] for ln in out.splitlines() if ln.strip()}
    return sorted(s for s in syms if re.fullmatch(r"cu[A-Z]\w*", s))


def _stub_source(symbols: list[str]) -> str:
    # Error-string getters must hand back a valid string: the plugin prints it.
    lines = ["typedef int CUresult;", 'static const char msg[] = "moec build-time stub libcuda";']
    for s in symbols:
        if s in ("cuGetErrorName", "cuGetErrorString"):
            lines.append(f"CUresult {s}(CUresult e, const char** p) "
                         "{ if (p) *p = msg; return 0; }")
        else:
            lines.append(f"CUresult {s}(void) {{ return {_NO_DEVICE}; }}")
    return "\n".join(lines) + "\n"


def _ensure_cuda_codegen() -> None:
    """Make TVM's CUDA codegen produce binary modules in this process (see the module doc)."""
    global _plugin_ready
    if _plugin_ready or tvm.get_global_func("ffi.Module.create.cuda", allow_missing=True):
        _plugin_ready = True
        return
    from tvm.base import _LOADED_LIBS
    from tvm_ffi.libinfo import load_lib_ctypes

    runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    plugin = runtime_dir / "libtvm_runtime_cuda.so"
    if not plugin.is_file():
        raise CodegenError(f"TVM has no CUDA runtime plugin ({plugin} missing)")
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise ToolNotFoundError("a C compiler (cc/gcc) is needed to build the stub libcuda")
    # The stub only has to exist while it is dlopen'ed; the directory goes away right after.
    with tempfile.TemporaryDirectory(prefix="moec_stub_cuda_") as tmp:
        src, lib = Path(tmp) / "stub.c", Path(tmp) / "libcuda.so.1"
        src.write_text(_stub_source(_driver_symbols(plugin)))
        subprocess.run([cc, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(lib),
                        str(src)], check=True, capture_output=True)
        # soname libcuda.so.1: the plugin's DT_NEEDED entry resolves to the loaded stub (the
        # loader matches dependencies by soname whatever the mode), and its symbols resolve in
        # the plugin's own scope. RTLD_LOCAL keeps them out of the process's global scope, so
        # no library loaded later binds a cu* symbol to the stub by accident.
        ctypes.CDLL(str(lib), mode=ctypes.RTLD_LOCAL)
        _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
            package="tvm", target_name="tvm_runtime_cuda", extra_lib_paths=[runtime_dir],
            mode="RTLD_LOCAL")
    if not tvm.get_global_func("ffi.Module.create.cuda", allow_missing=True):
        raise CodegenError("loading TVM's CUDA plugin did not register its module factory")
    _plugin_ready = True


# --------------------------------------------------------------------------- nvcc callback


def _current_arch() -> str:
    tgt = tvm.target.Target.current(allow_none=True)
    arch = str(tgt.attrs.get("arch", "")) if tgt is not None else ""
    if not arch.startswith("sm_"):
        raise CodegenError(f"CUDA target without an sm_XX arch: {tgt}")
    return arch


def _nvcc(code: str, arch: str) -> CudaCompilation:
    num = arch[3:]
    with tempfile.TemporaryDirectory(prefix="moec_nvcc_") as tmp:
        cu, out = Path(tmp) / "k.cu", Path(tmp) / "k.fatbin"
        cu.write_text(code)
        # No --use_fast_math: router scores and top-k choices should match the f32 reference.
        cmd = [find_cuda_tool("nvcc"), "--fatbin", "-O3", "-Xptxas", "-v",
               "-gencode", f"arch=compute_{num},code=sm_{num}",
               "-gencode", f"arch=compute_{num},code=compute_{num}",
               "--keep", "--keep-dir", tmp, "-o", str(out), str(cu)]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
        if res.returncode != 0:
            raise CodegenError(f"nvcc failed for {arch}:\n{res.stderr[-4000:]}")
        ptx_files = sorted(Path(tmp).glob("*.ptx"))
        comp = CudaCompilation(arch, code, ptx_files[0].read_text() if ptx_files else "",
                               out.read_bytes(), res.stderr)
    comp.report = parse_ptxas_log(comp.ptxas_log)
    return comp


def _dump(comp: CudaCompilation, where: str) -> None:
    """TVM_KERNEL_DUMP=dir keeps the intermediates, named by a hash of the source."""
    d = Path(where)
    d.mkdir(parents=True, exist_ok=True)
    stem = d / f"moec_{comp.arch}_{hashlib.sha1(comp.source.encode()).hexdigest()[:10]}"
    stem.with_suffix(".cu").write_text(comp.source)
    stem.with_suffix(".ptx").write_text(comp.ptx)
    stem.with_suffix(".fatbin").write_bytes(comp.fatbin)
    stem.with_suffix(".ptxas.txt").write_text(comp.ptxas_log)


def _tvm_callback_cuda_compile(code: str, *_unused: object) -> bytes:
    comp = _nvcc(code, _current_arch())
    if os.environ.get("TVM_KERNEL_DUMP"):
        _dump(comp, os.environ["TVM_KERNEL_DUMP"])
    for sink in _collectors:
        sink.append(comp)
    return bytearray(comp.fatbin)


@contextlib.contextmanager
def collect_compilations() -> Iterator[list[CudaCompilation]]:
    """Within the block, every nvcc run of a CUDA build is appended to the yielded list."""
    sink: list[CudaCompilation] = []
    _collectors.append(sink)
    try:
        yield sink
    finally:
        _collectors.remove(sink)


def cuda_target(arch: str = "sm_90") -> tvm.target.Target:
    """The CUDA target for `arch` with a generic x86-64 host (the host code is only launches)."""
    return tvm.target.Target({"kind": "cuda", "arch": arch}, host={"kind": "llvm"})


def _drop_unused_from_main() -> tvm.transform.Pass:
    """DeadCodeElimination from `main`, for modules that have one (a module of kernels alone,
    as the tests build, keeps every function)."""

    @tvm.transform.module_pass(opt_level=0)
    def _pass(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        if not any(gv.name_hint == "main" for gv in mod.get_global_vars()):
            return mod
        return tvm.relax.transform.DeadCodeElimination(["main"])(mod)

    return _pass


def relax_pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    """TVM's CUDA Relax pipeline without its fusion passes.

    moec's kernels arrive scheduled (`tirx.is_scheduled`), several as plain TIR without an
    s_tir root block, which TVM's op-pattern analysis (run before FuseOps) cannot read. They
    need no fusion anyway; only what Relax ops legalize to (a reshape, say) is scheduled here,
    by dlight's generic rules."""
    from tvm.relax.backend.cuda import pipeline as cuda_pipeline
    from tvm.s_tir import dlight as dl

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            passes = cuda_pipeline.library_dispatch_passes(target) + [
                tvm.relax.transform.LegalizeOps(),
                # reshapes to views before dlight schedules their copy loops (a scheduled
                # copy no longer reads as a reshape): they cost no kernel and no memory
                tvm.relax.transform.RewriteDataflowReshape(),
                _drop_unused_from_main(),  # the copy functions those reshapes called
                dl.ApplyDefaultSchedule(dl.gpu.GEMV(), dl.gpu.Reduction(),
                                        dl.gpu.GeneralReduction(), dl.gpu.Fallback()),
            ]
            passes += cuda_pipeline.dataflow_lower_passes(target)
            passes += cuda_pipeline.finalize_passes(target)
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline


def build_cuda(mod: tvm.IRModule, arch: str = "sm_90") -> tvm.runtime.Executable:
    """Compile a Relax (or pure TIR) module for `Target({"kind": "cuda", "arch": arch})`.

    The result's exported library embeds an nvcc-built fatbin: SASS for `arch` plus PTX of the
    same compute capability (JIT-compiled by the driver on newer GPUs). Use
    `collect_compilations()` around the call to get the source, PTX and ptxas log.
    """
    if not re.fullmatch(r"sm_\d+a?", arch):
        raise CodegenError(f"CUDA arch must look like sm_90, got {arch!r}")
    find_cuda_tool("nvcc")  # here, not first inside TVM's callback
    _ensure_cuda_codegen()
    target = cuda_target(arch)
    # Our nvcc callback only for this build: TVM's own (NVRTC) is put back afterwards, so that
    # building with moec does not change how TVM compiles CUDA for the rest of the process.
    with _cuda_compile_callback(), target:
        return tvm.compile(mod, target=target, relax_pipeline=relax_pipeline(target))


_CALLBACK = "tvm_callback_cuda_compile"


@contextlib.contextmanager
def _cuda_compile_callback() -> Iterator[None]:
    previous = tvm.get_global_func(_CALLBACK, allow_missing=True)
    tvm_ffi.register_global_func(_CALLBACK, _tvm_callback_cuda_compile, override=True)
    try:
        yield
    finally:
        if previous is not None:
            tvm_ffi.register_global_func(_CALLBACK, previous, override=True)
        else:
            tvm_ffi.remove_global_func(_CALLBACK)


# --------------------------------------------------------------------------- inspection

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(log: str) -> dict[str, dict[str, int]]:
    """`ptxas -v` output -> {kernel: {registers, spill_stores, spill_loads, stack, smem}}."""
    out: dict[str, dict[str, int]] = {}
    entry = props = None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            entry = m.group(1)
            out.setdefault(entry, {"registers": 0, "spill_stores": 0, "spill_loads": 0,
                                   "stack": 0, "smem": 0})
        elif m := _PROPS.search(line):
            props = m.group(1)
        elif (m := _SPILL.search(line)) and props in out:
            out[props].update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                              spill_loads=int(m.group(3)))
        elif (m := _USED.search(line)) and entry in out:
            out[entry]["registers"] = int(m.group(1))
            if s := _SMEM.search(line):
                out[entry]["smem"] = int(s.group(1))
    return out


_EIATTR_REGCOUNT, _EIATTR_FRAME_SIZE = 0x2F, 0x11


def _cubin_registers(data: bytes) -> dict[str, dict[str, int]]:
    """Registers and stack frame per kernel from a cubin's `.nv.info` attributes.

    A cubin does not record spills, so those fields are -1 (compile the PTX for them)."""
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise CodegenError("not a 64-bit cubin")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    hdrs = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]

    def cstr(table: tuple, at: int) -> str:
        base = table[4]
        return data[base + at:data.index(b"\0", base + at)].decode()

    names = {cstr(hdrs[shstrndx], h[0]): h for h in hdrs}
    symtab = names[".symtab"]
    strtab = hdrs[symtab[6]]  # sh_link
    syms = [cstr(strtab, struct.unpack_from("<I", data, symtab[4] + i * 24)[0])
            for i in range(symtab[5] // 24)]
    out: dict[str, dict[str, int]] = {}
    info = names.get(".nv.info")
    pos, end = (info[4], info[4] + info[5]) if info else (0, 0)
    while pos < end:  # records: u8 format, u8 attribute, then u16 size + payload (format 4)
        fmt, attr = data[pos], data[pos + 1]
        size = struct.unpack_from("<H", data, pos + 2)[0] if fmt == 4 else 0
        if fmt == 4 and attr in (_EIATTR_REGCOUNT, _EIATTR_FRAME_SIZE):
            sym, value = struct.unpack_from("<II", data, pos + 4)
            rec = out.setdefault(syms[sym], {"registers": 0, "spill_stores": -1,
                                             "spill_loads": -1, "stack": 0})
            rec["registers" if attr == _EIATTR_REGCOUNT else "stack"] = value
        pos += 4 + size
    # kernels have their own `.nv.info.<name>`; the rest are internal device functions
    return {k: v for k, v in out.items() if f".nv.info.{k}" in names}


def ptxas_report(ptx_or_cubin: str | bytes | os.PathLike, arch: str | None = None
                 ) -> dict[str, dict[str, int]]:
    """Registers and spill bytes per kernel: `ptxas -v` on PTX (text, bytes or a .ptx path).

    `arch` defaults to the PTX's `.target`. A cubin (bytes or path) is read directly: registers
    only, spills -1."""
    data: str | bytes = ptx_or_cubin  # type: ignore[assignment]
    if isinstance(ptx_or_cubin, os.PathLike) or (
            isinstance(ptx_or_cubin, str) and "\n" not in ptx_or_cubin
            and Path(ptx_or_cubin).is_file()):
        data = Path(ptx_or_cubin).read_bytes()
    if isinstance(data, bytes):
        if data[:4] == b"\x7fELF":
            return _cubin_registers(data)
        data = data.decode()
    if arch is None:
        m = re.search(r"^\.target\s+(sm_\w+)", data, re.M)
        arch = m.group(1) if m else "sm_90"
    with tempfile.TemporaryDirectory(prefix="moec_ptxas_") as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(data)
        res = subprocess.run([find_cuda_tool("ptxas"), "-v", f"-arch={arch}", "-o",
                              str(Path(tmp) / "k.cubin"), str(src)], capture_output=True, text=True)
    if res.returncode != 0:
        raise CodegenError(f"ptxas failed:\n{res.stderr[-4000:]}")
    return parse_ptxas_log(res.stderr)


_MMA = re.compile(r"^\s*(?:@%\w+\s+)?(?:wmma\.mma|mma\.sync|wgmma\.mma_async)\b", re.M)
_ENTRY_PTX = re.compile(r"^(?:\.visible\s+|\.weak\s+)?\.entry\s+(\w+)", re.M)


def ptx_entries(ptx: str) -> dict[str, str]:
    """PTX text split by kernel: {entry name: its text up to the next entry}."""
    starts = [(m.start(), m.group(1)) for m in _ENTRY_PTX.finditer(ptx)]
    return {name: ptx[a:b] for (a, name), (b, _) in zip(starts, starts[1:] + [(len(ptx), "")],
                                                         strict=True)}


def has_mma(ptx: str, kernel: str | None = None) -> bool:
    """True when the PTX (or only its entry `kernel`) issues tensor-core math: wmma.mma,
    mma.sync or wgmma."""
    if kernel is not None:
        ptx = ptx_entries(ptx).get(kernel, "")
    return bool(_MMA.search(ptx))
