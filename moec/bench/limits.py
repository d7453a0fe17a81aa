"""The machine's two limits, measured in the benchmark's own process and thread setting.

- memory bandwidth: the best of a large copy (torch `copy_` of 128 MiB, 4x the L3 of the machine
  this was written on; read + write bytes, the STREAM convention) and a large read (torch `sum`
  of 128 MiB), GB/s;
- fp32 GEMM rate: the best of torch.matmul on a 2048 x 2048 x 2048 product and moec's own TVM
  linear kernel (moec.codegen.kernels.linear) on the same product, GFLOP/s.

Each is the best of several repetitions: a limit is what the machine can do, and on a shared
machine the best repetition is the one least disturbed by other jobs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def _best(fn: Callable[[], Any], reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bandwidth(mib: int = 128, reps: int = 10) -> dict[str, float]:
    """{"copy_gbs", "read_gbs", "gbs" (the better)} in GB/s (1e9 bytes)."""
    import torch

    n = mib * (1 << 20) // 4
    src = torch.rand(n)
    dst = torch.empty_like(src)
    nbytes = src.numel() * 4
    copy = 2 * nbytes / _best(lambda: dst.copy_(src), reps) / 1e9
    read = nbytes / _best(lambda: src.sum(), reps) / 1e9
    return {"copy_gbs": copy, "read_gbs": read, "gbs": max(copy, read), "bytes": float(nbytes)}


def gemm_rate(n: int = 2048, reps: int = 10, tvm_kernel: bool = True) -> dict[str, Any]:
    """{"torch_gflops", "tvm_gflops" (None when not measured), "gflops" (the better)}."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    flops = 2.0 * n ** 3
    out: dict[str, Any] = {"n": n, "torch_gflops": flops / _best(lambda: a @ b, reps) / 1e9,
                           "tvm_gflops": None, "tvm_error": None}
    if tvm_kernel:
        try:
            out["tvm_gflops"] = flops / _tvm_linear_time(a.numpy(), b.numpy(), reps) / 1e9
        except Exception as e:  # the limit is optional: say why it is missing
            out["tvm_error"] = f"{type(e).__name__}: {e}"
    out["gflops"] = max(v for v in (out["torch_gflops"], out["tvm_gflops"]) if v is not None)
    return out


def _tvm_linear_time(x: Any, w: Any, reps: int) -> float:
    import tvm

    from moec.codegen.kernels.linear import linear
    from moec.codegen.target import host_target

    m, k = x.shape
    kern = linear("M", k, w.shape[0])
    ex = tvm.compile(tvm.IRModule({kern.name: kern.func}), target=host_target())
    args = [tvm.runtime.tensor(x), tvm.runtime.tensor(kern.arg_transforms[1](w)),
            tvm.runtime.empty((m, w.shape[0]), "float32")]
    f = ex[kern.name]
    return _best(lambda: f(*args), reps)


def measure(reps: int = 10, tvm_kernel: bool = True) -> dict[str, Any]:
    """Both limits, with the wall time the measurement took."""
    t0 = time.perf_counter()
    bw = bandwidth(reps=reps)
    gemm = gemm_rate(reps=reps, tvm_kernel=tvm_kernel)
    return {"bandwidth": bw, "gemm": gemm, "seconds": time.perf_counter() - t0}
