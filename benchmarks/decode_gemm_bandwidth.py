"""Where decode time goes: the bandwidth each grouped GEMM kernel of a compiled bench layer
reaches at a small token count, inside the layer's compiled module.

    TVM_NUM_THREADS=2 python benchmarks/decode_gemm_bandwidth.py qwen3 --tokens 1

For each `grouped_matmul` kernel of the layer (`moec bench` shapes, default pipeline): median
time over fresh random routings (so that the touched experts' weights come from memory, not the
caches), the bytes of the expert weights those routings touch, and bytes / time. Compare with
the read bandwidth `moec bench` measures (about 30 GB/s on the 2-core Zen 3 development VM).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import tvm  # noqa: E402

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
        times, touched = [], []
        for rep in range(a.repeat + 2):
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
        t, experts = float(np.median(times)), float(np.median(touched))
        nbytes = experts * n * kk * 4 * (2 if gated else 1)
        print(f"{name}: {a.tokens} tokens, {t * 1e3:.2f} ms, {experts:.0f} experts, "
              f"{nbytes / 1e6:.1f} MB of weights -> {nbytes / t / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()
