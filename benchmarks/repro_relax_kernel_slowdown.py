"""Regression check (found by `moec bench`): the fused gate+up grouped GEMM must run as fast
inside moec's lowered Relax module as when the same PrimFunc is compiled on its own.

    TVM_NUM_THREADS=2 python benchmarks/repro_relax_kernel_slowdown.py

Mixtral-like layer (H 1024, I 3584, 8 experts, top-2), 512 tokens, one routing, the same
arguments for both builds. It was 8x slower in the module (Zen 3, 2 threads: 91 ms alone,
748 ms in the module): every scratch buffer and scalar binding of the kernel was a
`TVMBackendAllocWorkspace` call (`scope="local"` and `v = expr` in TVMScript), and whether LLVM
could still keep the accumulators in registers depended on what else was in the LLVM module.
With scratch on the stack (moec/codegen/kernels/base.py) both builds take about 90-100 ms.
"""

from __future__ import annotations

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


def best_ms(fn, args, reps: int = 3) -> float:
    fn(*args)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main() -> None:
    shape = SHAPES["mixtral"]
    tokens, k, e, h, inter = 512, shape.top_k, shape.experts, shape.hidden, shape.intermediate
    graph = from_torch(build_block(shape), (torch.randn(5, h),), max_tokens=2048)
    PassManager(parse_pipeline("default")).run(graph)
    low = lower(graph)
    name = next(gv.name_hint for gv in low.mod.get_global_vars() if "silu_mul" in gv.name_hint)
    alone = tvm.compile(tvm.IRModule({name: low.mod[name]}), target=host_target())
    whole = tvm.compile(low.mod, target=host_target())
    block_m = int(name.split("_bm_")[1].split("_")[0])

    rng = np.random.default_rng(0)
    x = tvm.runtime.tensor(rng.standard_normal((tokens, h), np.float32))
    w = rng.standard_normal((e, inter, h), np.float32) * 0.03
    pack = grouped_matmul(e, inter, h, block_m, k, True, "silu_mul").arg_transforms[1]
    packed = tvm.runtime.tensor(pack(w))
    sorted_ids, tile_expert = random_layout(tokens, e, k, block_m, rng)
    rows = len(sorted_ids)
    args = [x, packed, packed, tvm.runtime.tensor(sorted_ids), tvm.runtime.tensor(tile_expert),
            tvm.runtime.empty((rows, inter), "float32")]
    print(f"{name}, {tokens} tokens, load {os.getloadavg()[0]:.1f}")
    print(f"  PrimFunc compiled alone:        {best_ms(alone[name], args):8.1f} ms")
    in_relax = whole.mod.get_function(name, True)
    print(f"  same PrimFunc in Relax module:  {best_ms(in_relax, args):8.1f} ms")


if __name__ == "__main__":
    main()
