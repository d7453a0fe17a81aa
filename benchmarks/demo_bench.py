"""The demo model: max error and median time per call, moec vs PyTorch eager, in one run.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/demo_bench.py [--threads 2] [--tokens 1 64 512]

Both sides use the same inputs, rotated through a pool of 8 so caches do not flatter either;
threads are set explicitly (torch.set_num_threads and TVM_NUM_THREADS). Writes
benchmarks/results/demo_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path


def median_time(fn, pool: int, reps: int) -> tuple[float, float, float]:
    for i in range(2):
        fn(i % pool)
    ts = []
    for i in range(reps):
        t = time.perf_counter()
        fn(i % pool)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), min(ts), max(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 512])
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(a.threads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import numpy as np
    import torch

    import moec
    from moec.models.reference import demo_model
    from moec.passes.manager import relative_error

    torch.set_num_threads(a.threads)
    module, example = demo_model()
    t0 = time.perf_counter()
    art = moec.compile(module, example, max_tokens=max(4096, max(a.tokens)))
    compile_s = time.perf_counter() - t0
    model = art.load_model()
    hidden = example[0].shape[1]
    rng = np.random.default_rng(0)
    rows = []
    print(f"demo model: hidden {hidden}, compile {compile_s:.1f} s, threads {a.threads}")
    print(f"{'tokens':>6} {'max rel err':>11} {'moec ms':>9} {'torch ms':>9} {'torch/moec':>10}")
    for n in a.tokens:
        xs = [rng.standard_normal((n, hidden)).astype(np.float32) for _ in range(8)]
        txs = [torch.from_numpy(x) for x in xs]
        with torch.inference_mode():
            err = max(relative_error(model(x), module(t).numpy())
                      for x, t in zip(xs, txs, strict=True))
            m = median_time(lambda i, xs=xs: model(xs[i]), 8, a.reps)
            t = median_time(lambda i, txs=txs: module(txs[i]), 8, a.reps)
        rows.append({"tokens": n, "max_rel_err": err, "moec_ms": m[0] * 1e3,
                     "moec_min_max_ms": [m[1] * 1e3, m[2] * 1e3], "torch_ms": t[0] * 1e3,
                     "torch_min_max_ms": [t[1] * 1e3, t[2] * 1e3], "speedup": t[0] / m[0]})
        print(f"{n:>6} {err:>11.2e} {m[0] * 1e3:>9.3f} {t[0] * 1e3:>9.3f} {t[0] / m[0]:>9.2f}x")
    out = Path(__file__).parent / "results" / "demo_bench.json"
    out.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                               "threads": a.threads, "compile_s": compile_s, "rows": rows},
                              indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
