"""Where decode time goes: the bandwidth each grouped GEMM kernel of a compiled bench layer
reaches at a small token count, inside the layer's compiled module.

    TVM_NUM_THREADS=2 python benchmarks/decode_gemm_bandwidth.py qwen3 --tokens 1

For each `grouped_matmul` kernel of the layer (`moec bench` shapes, default pipeline): median
time over fresh random routings (so that the touched experts' weights come from memory, not the
caches), the bytes of the expert weights those routings touch, and bytes / time; and, called in
turn with the kernel, the TVM 4-stream read of 128 MiB that `moec bench` takes as its bandwidth
limit (moec.bench.limits), so that the ratio holds on a machine whose bandwidth drifts (the
2-core Zen 3 development VM read 24-44 GB/s within one hour).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import tvm  # noqa: E402

from moec.bench import limits  # noqa: E402
from moec.bench.layer import SHAPES, build_block  # noqa: E402
from moec.codegen.kernels import grouped_matmul  # noqa: E402
from moec.codegen.lower import lower  # noqa: E402
from moec.codegen.target import host_target  # noqa: E402
from moec.codegen.tune import random_layout  # noqa: E402
from moec.frontend import from_torch  # noqa: E402
from moec.passes import PassManager, parse_pipeline  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=10)
    a = ap.parse_args()
    shape = SHAPES[a.shape]
    k, e, h, inter = shape.top_k, shape.experts, shape.hidden, shape.intermediate
    graph = from_torch(build_block(shape), (torch.randn(5, h),), max_tokens=4096)
    PassManager(parse_pipeline("default")).run(graph)
    low = lower(graph)
    module = tvm.compile(low.mod, target=host_target()).mod
    rng = np.random.default_rng(0)
    probe = limits.ReadProbe(mib=128)
    for name in sorted(gv.name_hint for gv in low.mod.get_global_vars()
                       if gv.name_hint.startswith("grouped_matmul")):
        gated = "_mul_" in name
        block_m = int(name.split("_bm_")[1].split("_")[0])
        n, kk = (inter, h) if gated else (h, inter)
        kern = grouped_matmul(e, n, kk, block_m, k, gated, "silu_mul" if gated else "none")
        # gate and up are two weights in memory (one passed twice would be read from cache)
        packed = [tvm.runtime.tensor(kern.arg_transforms[1](
            rng.standard_normal((e, n, kk), np.float32) * 0.03)) for _ in range(1 + gated)]
        fn = module.get_function(name, True)
        times, touched, reads = [], [], []
        for rep in range(a.repeat + 2):
            read = probe()
            sorted_ids, tile_expert = random_layout(a.tokens, e, k, block_m, rng)
            rows = len(sorted_ids)
            x = tvm.runtime.tensor(rng.standard_normal((a.tokens if gated else rows, kk),
                                                       np.float32))
            args = [x, *packed, tvm.runtime.tensor(sorted_ids),
                    tvm.runtime.tensor(tile_expert), tvm.runtime.empty((rows, n), "float32")]
            t0 = time.perf_counter()
            fn(*args)
            if rep >= 2:  # the first two warm up
                times.append(time.perf_counter() - t0)
                touched.append(len({int(t) for t in tile_expert if 0 <= t < e}))
                reads.append(read)
        per_call = [x * n * kk * 4 * (2 if gated else 1) / t / 1e9
                    for x, t in zip(touched, times, strict=True)]
        t, experts = float(np.median(times)), float(np.median(touched))
        gbs, rd = float(np.median(per_call)), float(np.median(reads))
        ratio = float(np.median(np.array(per_call) / np.array(reads)))
        print(f"{name}: {a.tokens} tokens, {t * 1e3:.2f} ms, {experts:.0f} experts -> "
              f"{gbs:.1f} GB/s; TVM read in turn {rd:.1f} GB/s; kernel / read {ratio:.2f}")


if __name__ == "__main__":
    main()
