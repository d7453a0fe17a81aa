"""What bf16 weights buy on a CPU: moec on a bf16 block against moec on the same block in fp32.

    OMP_WAIT_POLICY=PASSIVE TVM_NUM_THREADS=2 python benchmarks/half_weights.py \\
        --shapes mixtral qwen3 deepseek-v3 --tokens 1 8 64 512 2048

Per `moec bench` shape: the block built in bfloat16 (the float32 weights rounded, as a bf16
checkpoint holds them) is compiled twice, as is (widen-activations: float32 activations, the GEMM
weights stay bf16 and are widened in registers) and converted to float32 (the same values in
fp32 weights). Both artifacts run on the same bf16-exact inputs, called in turn within each
round with the last-level cache flushed before every call (moec.bench.limits.CacheFlush), fresh
inputs from a pool each round; medians of the timed rounds. Also reported: the expert weight
bytes the routing touches per call at each width (the memory a decode step must read), and the
largest difference between the two outputs relative to the largest output (the bf16 artifact
rounds its float32 result to bf16 once: at most 2^-8 = 3.9e-3). Writes
benchmarks/results/half_weights.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "2")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import moec  # noqa: E402
from moec.bench.layer import SHAPES, build_block, make_pool, traffic  # noqa: E402
from moec.bench.limits import CacheFlush  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["mixtral", "qwen3", "deepseek-v3"],
                    choices=sorted(SHAPES))
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 8, 64, 512, 2048])
    ap.add_argument("--repeat", type=int, default=8)
    ap.add_argument("--json", default="benchmarks/results/half_weights.json")
    a = ap.parse_args()
    if min(a.tokens) < 1:
        ap.error("token counts must be >= 1")
    torch.set_num_threads(int(os.environ["TVM_NUM_THREADS"]))
    flush = CacheFlush()
    out = {"command": "python benchmarks/half_weights.py " + " ".join(
        [f"--shapes {' '.join(a.shapes)}", f"--tokens {' '.join(map(str, a.tokens))}",
         f"--repeat {a.repeat}"]), "cpu": platform.processor() or platform.machine(),
        "threads": os.environ["TVM_NUM_THREADS"], "cases": []}
    print(f"{'shape':12s} {'tokens':>6s} | {'fp32 weights':>13s} {'bf16 weights':>13s} "
          f"{'speed-up':>8s} | {'MB fp32':>8s} {'MB bf16':>8s} | max diff")
    for name in a.shapes:
        shape = SHAPES[name]
        block16 = build_block(shape, 0, "bfloat16")
        block32 = build_block(shape, 0, "bfloat16").float()
        ex = torch.randn(5, shape.hidden)
        m16 = moec.compile(block16, (ex.bfloat16(),), max_tokens=max(a.tokens)).load_model()
        m32 = moec.compile(block32, (ex,), max_tokens=max(a.tokens)).load_model()
        systems = {"fp32": m32, "bf16": lambda x, m=m16: m(x.bfloat16()).float()}
        for tokens in a.tokens:
            pool = make_pool(block16, shape, tokens, "uniform", a.repeat + 1)
            xs = [torch.from_numpy(x) for x in pool.xs]
            times: dict[str, list[float]] = {k: [] for k in systems}
            diff = 0.0
            for i, x in enumerate(xs):
                order = list(systems) if i % 2 == 0 else list(systems)[::-1]
                ys = {}
                for k in order:
                    flush()
                    t0 = time.perf_counter()
                    ys[k] = systems[k](x)
                    if i:  # the first round warms up
                        times[k].append(time.perf_counter() - t0)
                if ys["fp32"].numel():
                    scale = float(ys["fp32"].abs().max()) or 1.0
                    diff = max(diff, float((ys["bf16"] - ys["fp32"]).abs().max()) / scale)
            med = {k: statistics.median(v) for k, v in times.items()}
            mb = {w: traffic(shape, pool, size)["bytes"] / 1e6 for w, size in
                  (("fp32", 4), ("bf16", 2))}
            print(f"{name:12s} {tokens:6d} | {med['fp32'] * 1e3:10.2f} ms {med['bf16'] * 1e3:10.2f}"
                  f" ms {med['fp32'] / med['bf16']:7.2f}x | {mb['fp32']:8.1f} {mb['bf16']:8.1f} | "
                  f"{diff:.1e}", flush=True)
            out["cases"].append({"shape": name, "tokens": tokens, "median_s": med,
                                 "times_s": times, "bytes_mb": mb, "max_rel_diff": diff})
        del m16, m32, systems, block16, block32
    path = Path(a.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
