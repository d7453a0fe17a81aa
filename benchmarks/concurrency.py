"""Throughput of one CompiledModel called serially, from N threads at once (calls serialised by
the model's lock), and of N models (one per thread, truly parallel).

    python benchmarks/concurrency.py [--artifact demo.moec] [--threads 8] [--calls 400]

Without --artifact it compiles the small reference model (hidden 64, 8 experts, top-2). Prints
a table and writes benchmarks/results/concurrency.json. Set TVM_NUM_THREADS to choose the
kernels' own thread count; the results depend on it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np


def _artifact(path: str | None) -> str:
    if path:
        return path
    import moec
    from moec.models.reference import demo_model

    module, example = demo_model(seed=1, hidden=64, intermediate=96, experts=8, top_k=2)
    out = Path(tempfile.mkdtemp(prefix="moec-conc-")) / "demo.moec"
    return str(moec.compile(module, example, max_tokens=64).save(out))


def _threaded(models: list[Any], xs: list[np.ndarray], threads: int, calls: int) -> float:
    def work(i: int) -> None:
        model = models[i % len(models)]
        for j in range(i, calls, threads):
            model(xs[j % len(xs)])

    ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", default=None)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--calls", type=int, default=400)
    ap.add_argument("--tokens", type=int, default=32)
    a = ap.parse_args()

    from moec.runtime import load

    path = _artifact(a.artifact)
    model = load(path)
    hidden = model.signature.inputs[0].shape[1]
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((a.tokens, hidden)).astype(np.float32) for _ in range(16)]
    for x in xs:
        model(x)  # warm up
    t0 = time.perf_counter()
    for j in range(a.calls):
        model(xs[j % len(xs)])
    serial = time.perf_counter() - t0
    shared = _threaded([model], xs, a.threads, a.calls)
    per_thread = [load(path) for _ in range(a.threads)]
    own = _threaded(per_thread, xs, a.threads, a.calls)
    rows = {"serial, 1 thread": serial, f"{a.threads} threads, one shared model": shared,
            f"{a.threads} threads, one model each": own}
    print(f"{a.calls} calls of {a.tokens} tokens, TVM_NUM_THREADS="
          f"{os.environ.get('TVM_NUM_THREADS', 'unset')}, {os.cpu_count()} CPUs")
    for name, t in rows.items():
        print(f"  {name:<34} {t:7.3f} s  {a.calls / t:8.0f} calls/s")
    results = {"calls": a.calls, "tokens": a.tokens, "threads": a.threads,
               "tvm_num_threads": os.environ.get("TVM_NUM_THREADS"), "cpus": os.cpu_count(),
               "machine": platform.machine(), "seconds": rows}
    out = Path(__file__).parent / "results" / "concurrency.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
