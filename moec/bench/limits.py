"""The machine's two limits, measured in the benchmark's own process and thread setting.

- memory bandwidth: the best of a large copy (torch `copy_` of 128 MiB, 4x the L3 of the machine
  this was written on; read + write bytes, the STREAM convention), a large read (torch `sum`
  of 128 MiB), and the same read by a TVM kernel that keeps four streams per thread in flight
  as moec's decode GEMMs do (torch's sum reads one; the GEMMs read faster than it here, and a
  limit that a kernel beats is no limit), GB/s;
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


def bandwidth(mib: int = 128, reps: int = 10, tvm_kernel: bool = True) -> dict[str, Any]:
    """{"copy_gbs", "read_gbs", "tvm_read_gbs" (None when not measured), "gbs" (the best)} in
    GB/s (1e9 bytes)."""
    import torch

    n = mib * (1 << 20) // 4
    src = torch.rand(n)
    dst = torch.empty_like(src)
    nbytes = src.numel() * 4
    copy = 2 * nbytes / _best(lambda: dst.copy_(src), reps) / 1e9
    read = nbytes / _best(lambda: src.sum(), reps) / 1e9
    out: dict[str, Any] = {"copy_gbs": copy, "read_gbs": read, "tvm_read_gbs": None,
                           "tvm_error": None}
    if tvm_kernel:
        try:
            out["tvm_read_gbs"] = nbytes / _tvm_read_time(src.numpy(), reps) / 1e9
        except Exception as e:  # the limit is optional: say why it is missing
            out["tvm_error"] = f"{type(e).__name__}: {e}"
    out["gbs"] = max(v for v in (copy, read, out["tvm_read_gbs"]) if v is not None)
    out["bytes"] = float(nbytes)
    return out


STREAMS = 4  # read streams per parallel task of the TVM read kernel
CHUNK = 1 << 19  # floats per parallel task (2 MiB)


def _read_kernel(n: int) -> Any:
    """Sum of a float32 [n] array (n a multiple of STREAMS * CHUNK) into one 8-wide partial sum
    per 2 MiB chunk: each task reads its chunk as STREAMS interleaved contiguous streams."""
    from tvm.script import tirx as T

    chunks, part = n // CHUNK, CHUNK // STREAMS

    @T.prim_func
    def read_sum(x: T.handle, y: T.handle):
        X = T.match_buffer(x, (chunks, STREAMS, part), "float32")
        Y = T.match_buffer(y, (chunks, 8), "float32")
        for c in T.parallel(chunks):
            acc = T.alloc_buffer((STREAMS, 8), "float32")
            for s in T.unroll(STREAMS):
                for j in T.vectorized(8):
                    acc[s, j] = T.float32(0)
            for i in range(part // 8):
                for s in T.unroll(STREAMS):
                    for j in T.vectorized(8):
                        acc[s, j] = acc[s, j] + X[c, s, i * 8 + j]
            for j in T.vectorized(8):
                Y[c, j] = acc[0, j] + acc[1, j] + acc[2, j] + acc[3, j]

    return read_sum.with_attr("global_symbol", "read_sum")


def _tvm_read_time(x: Any, reps: int) -> float:
    import numpy as np
    import tvm

    from moec.codegen.target import host_target

    n = x.size // (STREAMS * CHUNK) * (STREAMS * CHUNK)
    ex = tvm.compile(tvm.IRModule({"read_sum": _read_kernel(n)}), target=host_target())
    src = tvm.runtime.tensor(np.ascontiguousarray(x[:n]).reshape(n // CHUNK, STREAMS, -1))
    out = tvm.runtime.empty((n // CHUNK, 8), "float32")
    f = ex["read_sum"]
    f(src, out)
    got, want = float(out.numpy().astype(np.float64).sum()), float(x[:n].astype(np.float64).sum())
    if abs(got - want) > 1e-4 * abs(want) + 1e-3:  # a read that skipped data would be fast
        raise RuntimeError(f"TVM read kernel summed {got}, numpy {want}")
    return _best(lambda: f(src, out), reps) * x.size / n


def gemm_rate(n: int = 2048, reps: int = 10, tvm_kernel: bool = True,
              dtype: str = "float32") -> dict[str, Any]:
    """{"torch_gflops", "tvm_gflops" (None when not measured), "gflops" (the better)}. With
    dtype bfloat16 also "torch_bf16_gflops": torch's linear (x @ w.T, nn.Linear's layout) on
    bf16 operands, native on CPUs with avx512_bf16 / AMX; it counts towards "gflops" too, as a
    bf16 layer may run at the faster of the two. (On the AVX2 development VM the bf16 `a @ b`
    of two square matrices ran at about 1 GFLOP/s and the linear at about 20.)"""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    flops = 2.0 * n ** 3
    out: dict[str, Any] = {"n": n, "torch_gflops": flops / _best(lambda: a @ b, reps) / 1e9,
                           "tvm_gflops": None, "tvm_error": None, "torch_bf16_gflops": None}
    if dtype == "bfloat16":
        a16, b16 = a.bfloat16(), b.bfloat16()
        lin = torch.nn.functional.linear
        out["torch_bf16_gflops"] = flops / _best(lambda: lin(a16, b16), reps) / 1e9
    if tvm_kernel:
        try:
            out["tvm_gflops"] = flops / _tvm_linear_time(a.numpy(), b.numpy(), reps) / 1e9
        except Exception as e:  # the limit is optional: say why it is missing
            out["tvm_error"] = f"{type(e).__name__}: {e}"
    out["gflops"] = max(v for v in (out["torch_gflops"], out["tvm_gflops"],
                                     out["torch_bf16_gflops"]) if v is not None)
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


class CacheFlush:
    """Evicts the last-level cache: one call writes a buffer twice its size (moec.codegen.tune
    `flush_bytes`; 64 MiB here). Run before each timed call of a case, outside the
    stopwatch, so that no system finds in the L3 the experts that the system before it read for
    the same input (the DeepSeek-V3-like layer at 1 token reads about 25 MB: it fits)."""

    def __init__(self, nbytes: int | None = None) -> None:
        import numpy as np

        from moec.codegen.tune import flush_bytes

        self.buf = np.ones((nbytes or flush_bytes()) // 4, np.float32)

    def __call__(self) -> None:
        self.buf += 1.0


class ReadProbe:
    """One TVM 4-stream read of `mib` MiB per call, in GB/s: the bandwidth the machine gives
    right now, measured between the rounds of a case (on a shared VM it changed 1.5x within
    one benchmark run here, so a run-wide best alone can make any case look far from it).
    128 MiB, 4x the L3 here: a 64 MiB read measured up to 52 GB/s, partly from the L3."""

    def __init__(self, mib: int = 128) -> None:
        import numpy as np
        import tvm

        from moec.codegen.target import host_target

        n = mib * (1 << 20) // 4 // (STREAMS * CHUNK) * (STREAMS * CHUNK)
        self.nbytes = 4 * n
        self.fn = tvm.compile(tvm.IRModule({"read_sum": _read_kernel(n)}),
                              target=host_target())["read_sum"]
        data = np.random.default_rng(0).random(n, dtype=np.float32)
        self.src = tvm.runtime.tensor(data.reshape(n // CHUNK, STREAMS, -1))
        self.out = tvm.runtime.empty((n // CHUNK, 8), "float32")
        self.fn(self.src, self.out)

    def __call__(self) -> float:
        t = time.perf_counter()
        self.fn(self.src, self.out)
        return self.nbytes / (time.perf_counter() - t) / 1e9


def measure(reps: int = 10, tvm_kernel: bool = True, dtype: str = "float32") -> dict[str, Any]:
    """Both limits, with the wall time the measurement took."""
    t0 = time.perf_counter()
    bw = bandwidth(reps=reps, tvm_kernel=tvm_kernel)
    gemm = gemm_rate(reps=reps, tvm_kernel=tvm_kernel, dtype=dtype)
    return {"bandwidth": bw, "gemm": gemm, "seconds": time.perf_counter() - t0}
