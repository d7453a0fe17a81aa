"""Run the CUDA kernels of moec's library on the CPU, to check their numbers without a GPU.

How: TVM lowers a kernel as for the GPU; its host half (argument checks, launch-dimension
arithmetic) is compiled for the CPU with the device-type checks removed, and its launches
resolve to Python global functions of the kernels' names. Each of those runs the *generated
CUDA source* compiled by g++ against a small emulation header: one OS thread per CUDA thread,
one block at a time, __syncthreads and warp shuffles / __match_any_sync as barriers over
exchange slots, WMMA fragments as whole 16x16 tiles (each lane computing and storing the 8
elements it owns, so the work is not multiplied by 32).

What it cannot show: timing, memory-model subtleties beyond barrier ordering, and bugs the real
nvcc/hardware would add. What it does show: indexing, synchronisation placement, warp logic
and tensor-core data flow of exactly the code that is shipped.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import tvm
import tvm_ffi
from tvm import tirx

from moec.codegen.cuda import build as cuda_build
from moec.codegen.cuda.base import Kernel

HEADER = r"""
#include <atomic>
#include <barrier>
#include <condition_variable>
#include <mutex>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>
typedef unsigned int uint;
typedef unsigned char uchar;
struct dim3 { unsigned x = 1, y = 1, z = 1; };
static thread_local dim3 threadIdx, blockIdx;
static thread_local int emu_lane, emu_warp;
static std::barrier<>* emu_block_bar;
struct EmuWarp { std::barrier<>* bar; uint64_t slot[32]; };
static EmuWarp* emu_warps;
#define __global__
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static
#define __align__(x) alignas(x)
#define __device__
#define __forceinline__ inline
#define CUDART_INF_F INFINITY
#define CUDART_NAN_F NAN
// Warp-serial mode (emu_order = 1: warps in order, -1: reversed): between two block barriers
// only one warp runs, so a missing __syncthreads shows up as a wrong result in one order.
static int emu_order = 0;
struct EmuTurn { std::mutex m; std::condition_variable cv; int pos = 0; int nw = 1; };
static EmuTurn* emu_turn;
inline int emu_turn_warp(int pos) { return emu_order > 0 ? pos : emu_turn->nw - 1 - pos; }
inline void emu_wait_turn() {
  if (!emu_order) return;
  std::unique_lock<std::mutex> lk(emu_turn->m);
  emu_turn->cv.wait(lk, [] { return emu_turn_warp(emu_turn->pos) == emu_warp; });
}
inline void emu_pass_turn();
inline void __syncthreads() {
  emu_pass_turn();
  emu_block_bar->arrive_and_wait();
  emu_wait_turn();
}
template <class T> inline T emu_exchange(T v, int src, bool keep) {
  EmuWarp& w = emu_warps[emu_warp];
  uint64_t bits = 0; std::memcpy(&bits, &v, sizeof(T));
  w.slot[emu_lane] = bits;
  w.bar->arrive_and_wait();
  uint64_t got = w.slot[keep ? emu_lane : src];
  w.bar->arrive_and_wait();
  T r; std::memcpy(&r, &got, sizeof(T)); return r;
}
template <class T> inline T __shfl_sync(uint, T v, int src, int width = 32) {
  return emu_exchange(v, (emu_lane / width) * width + src % width, false); }
template <class T> inline T __shfl_xor_sync(uint, T v, int m, int width = 32) {
  return emu_exchange(v, emu_lane ^ m, false); }
template <class T> inline T __shfl_down_sync(uint, T v, int d, int width = 32) {
  int src = emu_lane + d; return emu_exchange(v, src, src / width != emu_lane / width); }
inline uint __activemask() { return 0xffffffffu; }
inline void __syncwarp(uint = 0xffffffffu) { emu_warps[emu_warp].bar->arrive_and_wait(); }
inline uint __match_any_sync(uint, int v) {
  EmuWarp& w = emu_warps[emu_warp];
  w.slot[emu_lane] = (uint64_t)(uint32_t)v;
  w.bar->arrive_and_wait();
  uint m = 0;
  for (int l = 0; l < 32; ++l) if ((uint32_t)w.slot[l] == (uint32_t)v) m |= 1u << l;
  w.bar->arrive_and_wait();
  return m;
}
inline int __popc(uint x) { return __builtin_popcount(x); }
inline int __ffs(uint x) { return __builtin_ffs((int)x); }
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
template <class T> inline T max(T a, T b) { return a > b ? a : b; }
template <class T> inline T min(T a, T b) { return a < b ? a : b; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
struct half {
  _Float16 v; half() = default; half(float f) : v((_Float16)f) {}
  operator float() const { return (float)v; }
};
struct nv_bfloat16 {
  uint16_t b; nv_bfloat16() = default;
  nv_bfloat16(float f) { uint32_t u; std::memcpy(&u, &f, 4);
    b = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16); }
  operator float() const { uint32_t u = (uint32_t)b << 16; float f; std::memcpy(&f, &u, 4);
    return f; }
};
inline half __float2half_rn(float f) { return half(f); }
inline nv_bfloat16 __float2bfloat16_rn(float f) { return nv_bfloat16(f); }
template <class T> struct alignas(4 * sizeof(T)) emu_vec4 { T x, y, z, w; };
template <class T> struct alignas(2 * sizeof(T)) emu_vec2 { T x, y; };
using half4 = emu_vec4<half>; using half2 = emu_vec2<half>;
using nv_bfloat164 = emu_vec4<nv_bfloat16>; using nv_bfloat162 = emu_vec2<nv_bfloat16>;
inline half4 make_half4(half a, half b, half c, half d) { return {a, b, c, d}; }
inline nv_bfloat164 make_nv_bfloat164(nv_bfloat16 a, nv_bfloat16 b, nv_bfloat16 c,
                                      nv_bfloat16 d) { return {a, b, c, d}; }
struct alignas(16) uint4 { uint x, y, z, w; };
struct alignas(8) uint2 { uint x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) ulonglong4 { unsigned long long x, y, z, w; };
inline uint4 make_uint4(uint a, uint b, uint c, uint d) { return {a, b, c, d}; }
inline uint2 make_uint2(uint a, uint b) { return {a, b}; }
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
template <class T> inline uint emu_pack(T a, T b) {
  uint16_t x, y; std::memcpy(&x, &a, 2); std::memcpy(&y, &b, 2);
  return (uint)x | ((uint)y << 16); }
inline uint __pack_half2(half a, half b) { return emu_pack(a, b); }
inline uint __pack_nv_bfloat162(nv_bfloat16 a, nv_bfloat16 b) { return emu_pack(a, b); }
namespace nvcuda { namespace wmma {
struct matrix_a {}; struct matrix_b {}; struct accumulator {};
struct row_major {}; struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
template <class Use, int M, int N, int K, class T, class L = void> struct fragment { T x[256]; };
template <class U, class T, class L>
inline void load_matrix_sync(fragment<U, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
  for (int i = 0; i < 16; ++i) for (int j = 0; j < 16; ++j)   // x is [row][col] of the tile
    f.x[i * 16 + j] = std::is_same<L, col_major>::value ? p[j * ldm + i] : p[i * ldm + j];
}
template <class F> inline void fill_fragment(F& f, float v) {
  for (int e = 0; e < 256; ++e) f.x[e] = v; }
template <class TA, class LA, class TB, class LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d,
                     const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, TB, LB>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
  for (int e = emu_lane; e < 256; e += 32) {   // this lane's elements of D
    int i = e / 16, j = e % 16; float s = c.x[e];
    for (int k = 0; k < 16; ++k) s += (float)a.x[i * 16 + k] * (float)b.x[k * 16 + j];
    d.x[e] = s;
  }
}
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f,
                              unsigned ldm, layout_t) {
  for (int e = emu_lane; e < 256; e += 32) p[(e / 16) * ldm + e % 16] = f.x[e]; }
} }
inline void emu_pass_turn() {
  if (!emu_order) return;
  emu_warps[emu_warp].bar->arrive_and_wait();  // the whole warp got here
  if (emu_lane == 0) {
    { std::lock_guard<std::mutex> lk(emu_turn->m); emu_turn->pos = (emu_turn->pos + 1) % emu_turn->nw; }
    emu_turn->cv.notify_all();
  }
}
extern "C" void emu_set_order(int order) { emu_order = order; }
static void emu_launch(dim3 g, dim3 b, const std::function<void()>& fn) {
  int n = b.x * b.y * b.z, nw = (n + 31) / 32;
  for (unsigned z = 0; z < g.z; ++z) for (unsigned y = 0; y < g.y; ++y)
  for (unsigned x = 0; x < g.x; ++x) {
    std::barrier<> bar(n); emu_block_bar = &bar;
    EmuTurn turn; turn.nw = nw; emu_turn = &turn;
    std::vector<EmuWarp> warps(nw); std::vector<std::barrier<>*> wb;
    for (int w = 0; w < nw; ++w) warps[w].bar = new std::barrier<>(std::min(32, n - 32 * w));
    emu_warps = warps.data();
    std::vector<std::thread> ts;
    for (int t = 0; t < n; ++t) ts.emplace_back([&, t] {
      threadIdx.x = t % b.x; threadIdx.y = (t / b.x) % b.y; threadIdx.z = t / (b.x * b.y);
      blockIdx.x = x; blockIdx.y = y; blockIdx.z = z; emu_lane = t % 32; emu_warp = t / 32;
      emu_wait_turn(); fn(); emu_pass_turn(); });
    for (auto& th : ts) th.join();
    for (auto& w : warps) delete w.bar;
  }
}
"""

_HOOKED: dict[str, str] = {}
_SIG = re.compile(r'extern "C" __global__ void (?:__launch_bounds__\(\d+(?:, \d+)?\) )?(\w+)\(([^)]*)\)\s*\{')


def _wrapper(name: str, params: str) -> str:
    """extern "C" launcher: argv holds pointers and integers as 64-bit words."""
    casts = []
    for i, p in enumerate(x.strip() for x in params.split(",") if x.strip()):
        ctype = p.rsplit(None, 1)[0].replace("__restrict__", "").strip()
        casts.append(f"({ctype})argv[{i}]")
    return (f'extern "C" void emu_{name}(const int64_t* argv, unsigned gx, unsigned gy, '
            f'unsigned gz, unsigned bx, unsigned by, unsigned bz) {{\n'
            f'  emu_launch(dim3{{gx, gy, gz}}, dim3{{bx, by, bz}}, [&] {{ {name}('
            f'{", ".join(casts)}); }});\n}}\n')


@functools.cache
def _gxx20() -> str:
    """g++, if it compiles C++20 (the emulator's code uses it); else ToolNotFoundError, which
    the suite reports as a skip (tests/conftest.py)."""
    gxx = shutil.which("g++")
    if gxx is None:
        raise cuda_build.ToolNotFoundError("the CUDA emulator needs g++ (C++20), not found")
    probe = subprocess.run([gxx, "-std=c++20", "-fsyntax-only", "-x", "c++", "-"],
                           input="#include <barrier>\nint main() { return 0; }\n",
                           capture_output=True, text=True)
    if probe.returncode:
        raise cuda_build.ToolNotFoundError(f"the CUDA emulator needs g++ with C++20 support "
                                           f"(GCC 10 or newer); {gxx} refused -std=c++20")
    return gxx


def _device_source(device_mods: dict, target: tvm.target.Target) -> str:
    """The CUDA source TVM generates, without running nvcc (a pass-through callback)."""
    sources: list[str] = []

    def grab(code: str, *_: object) -> bytes:
        sources.append(code)
        return bytearray(b"\0")

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", grab, override=True)
    tir_build = importlib.import_module("tvm.tirx.build")
    _, _, finalize_device = tvm.tirx.get_default_tir_pipeline(target)
    with target:
        for dev_target, mod in device_mods.items():
            tir_build.codegen_build(finalize_device()(mod), dev_target)
    return "\n".join(sources)


def _strip_device_checks(node):
    """Host code must accept CPU tensors: drop the device-type checks and the set-device."""
    if isinstance(node, tirx.AssertStmt) and "device_type" in str(node.message_parts):
        return tirx.Evaluate(0)
    if isinstance(node, tirx.Evaluate) and "__tvm_set_device" in str(node.value):
        return tirx.Evaluate(0)
    return node


class Emulated:
    """Kernels compiled for the CPU emulator. `em[name](*arrays)` runs kernel `name` on numpy
    arrays (inputs then outputs; the outputs are filled in place)."""

    def __init__(self, kernels: list[Kernel], workdir: Path) -> None:
        cuda_build._ensure_cuda_codegen()
        target = cuda_build.cuda_target("sm_90")
        tir_build = importlib.import_module("tvm.tirx.build")
        mod = tvm.IRModule({k.name: k.func for k in kernels})
        with target:
            mod = tirx.transform.BindTarget(target.with_host(target.host))(mod)
            pipeline, finalize_host, _ = tvm.tirx.get_default_tir_pipeline(target)
            mod = pipeline(mod)
            host, devices = tir_build.split_host_device_mods(mod)
            host = tvm.IRModule({gv: tvm_ffi.structural_map(
                f, [((tirx.AssertStmt, tirx.Evaluate), _strip_device_checks)])
                for gv, f in host.functions_items()})
            self.host = tir_build.codegen_build(finalize_host()(host), target.host)
        launch_params = {gv.name_hint: [str(p) for p in f.attrs["tirx.kernel_launch_params"]]
                         for m in devices.values() for gv, f in m.functions_items()}
        src = _device_source(devices, target)
        body = src[src.index('extern "C" __global__'):]
        body = re.sub(r"extern __shared__ __align__\((\d+)\) uchar (\w+)\[\];",
                      r"alignas(\1) static uchar \2[233472];", body)
        body = re.sub(r"__shared__ alignas\((\d+)\)", r"alignas(\1) static", body)
        body = re.sub(r'extern "C" __global__ void (?:__launch_bounds__\(\d+(?:, \d+)?\) )?'
                      r'\w+\([^)]*\);\n', "", body)  # forward declarations
        wrappers = "".join(_wrapper(n, p) for n, p in _SIG.findall(body))
        code = HEADER + body + wrappers
        so = workdir / f"emu_{hashlib.sha1(code.encode()).hexdigest()[:12]}.so"
        if not so.exists():
            cpp = so.with_suffix(".cpp")
            cpp.write_text(code)
            res = subprocess.run([_gxx20(), "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread",
                                  "-w", "-o", str(so), str(cpp)], capture_output=True, text=True)
            if res.returncode:
                raise RuntimeError(f"g++ failed:\n{res.stderr[-3000:]}")
        self.lib = ctypes.CDLL(str(so))
        for name, params in launch_params.items():
            # launches resolve by name, process-wide: a second kernel of the same name would
            # silently run in place of the first
            if _HOOKED.get(name, so.name) != so.name:  # the file name is the code hash
                raise ValueError(f"kernel name {name} already emulated with other code")
            _HOOKED[name] = so.name
            tvm_ffi.register_global_func(name, self._launcher(name, params), override=True)

    def _launcher(self, name: str, params: list[str]):
        fn = getattr(self.lib, f"emu_{name}")
        fn.argtypes = [ctypes.POINTER(ctypes.c_int64)] + [ctypes.c_uint] * 6

        def launch(*args):
            kargs, dims = args[:len(args) - len(params)], args[len(args) - len(params):]
            words = [(a.value or 0) if isinstance(a, ctypes.c_void_p) else int(a) for a in kargs]
            ext = dict(zip(params, dims, strict=True))
            grid = [int(ext.get(f"blockIdx.{c}", 1)) for c in "xyz"]
            block = [int(ext.get(f"threadIdx.{c}", 1)) for c in "xyz"]
            assert min(grid) >= 1, f"{name}: zero-size grid {grid} (the CUDA runtime rejects it)"
            dyn = int(ext.get("tirx.use_dyn_shared_memory", 0))
            assert dyn <= 48 * 1024, f"{name}: {dyn} B of dynamic shared memory needs an opt-in"
            argv = (ctypes.c_int64 * max(1, len(words)))(
                *[w - (1 << 64) if w >= 1 << 63 else w for w in words])
            fn(argv, *grid, *block)
            return 0

        return launch

    def order(self, order: int) -> None:
        """0: all threads at once; 1 / -1: one warp at a time between barriers, in warp order
        / reversed (a missing __syncthreads then gives a wrong result in one of them)."""
        self.lib.emu_set_order(ctypes.c_int(order))

    def __getitem__(self, name: str):
        def run(*arrays: np.ndarray) -> None:
            tensors = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays]
            self.host[name](*tensors)
            for a, t in zip(arrays, tensors, strict=True):
                a[...] = t.numpy()
        return run


def emulate(kernels: list[Kernel], workdir: Path | None = None) -> Emulated:
    """Compile `kernels` (one g++ run) for the CPU emulator; the .so is cached in `workdir`."""
    return Emulated(kernels, Path(workdir or tempfile.mkdtemp(prefix="moec_emu_")))
