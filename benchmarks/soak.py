"""Soak test: many calls of one model with varying token counts, watching resident memory.

    python benchmarks/soak.py                          # 10,000 calls of the small demo model
    python benchmarks/soak.py --artifact m.moec --calls 100000 --bound-mb 64

Procedure: load the artifact (without --artifact, compile the small reference model: hidden 64,
8 experts, top-2, max_tokens 64), warm up with every token count 0..max once (TVM's pooled
allocator keeps one buffer per size it has seen, so memory legitimately grows until every size
was used), take the resident set size (RSS, psutil) as the baseline, then make `--calls` calls
with token counts drawn uniformly from 0..max; numpy and torch inputs alternate, and every 50th
call passes a bad input (too many tokens) so the error path is soaked as well. RSS is sampled
20 times. The run passes when the final RSS exceeds the baseline by at most `--bound-mb`
(default 16 MiB: a leak of even 2 KiB per call would exceed it over 10,000 calls).

Writes benchmarks/results/soak.json and exits 1 when the bound is exceeded. The test suite runs
a 300-call version (tests/reliability/test_soak.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_BOUND_MB = 16.0


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def soak(model: Any, calls: int, bound_mb: float = DEFAULT_BOUND_MB, seed: int = 0,
         samples: int = 20) -> dict[str, Any]:
    """Run the soak on a loaded model; returns the measurements (see the module docstring)."""
    import torch

    from moec.errors import InputError

    spec = model.signature.inputs[0]
    hidden = int(spec.shape[1])
    max_t = model.signature.dims[spec.shape[0]].max
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal((max_t, hidden)).astype(np.float32)
    for n in range(max_t + 1):  # warm-up: every size once
        model(pool[:n])
        model(torch.from_numpy(pool[:n]))
    gc.collect()
    base = rss_bytes()
    trace = [(0, base)]
    every = max(1, calls // samples)
    refused = 0
    t0 = time.perf_counter()
    for i in range(1, calls + 1):
        n = int(rng.integers(0, max_t + 1))
        if i % 50 == 0:
            try:
                model(np.zeros((max_t + 1, hidden), np.float32))
            except InputError:
                refused += 1
        elif i % 2:
            model(pool[:n].copy())
        else:
            model(torch.from_numpy(pool[:n].copy()))
        if i % every == 0 or i == calls:
            if i == calls:  # a full collection is slow in a big process: only at both ends
                gc.collect()
            trace.append((i, rss_bytes()))
    seconds = time.perf_counter() - t0
    growth = trace[-1][1] - base
    peak = max(r for _, r in trace) - base
    half = trace[len(trace) // 2 :]
    slope = float(np.polyfit([c for c, _ in half], [r for _, r in half], 1)[0]) if len(
        half) > 2 else 0.0
    return {
        "calls": calls, "max_tokens": max_t, "hidden": hidden, "seconds": seconds,
        "refused_bad_inputs": refused, "rss_baseline_mb": base / 2**20,
        "rss_growth_mb": growth / 2**20, "rss_peak_growth_mb": peak / 2**20,
        "bytes_per_call_second_half": slope, "bound_mb": bound_mb,
        "ok": growth <= bound_mb * 2**20,
        "trace": [{"calls": c, "rss_mb": r / 2**20} for c, r in trace],
    }


def _compile_demo() -> Path:
    import moec
    from moec.models.reference import demo_model

    module, example = demo_model(seed=1, hidden=64, intermediate=96, experts=8, top_k=2)
    out = Path(tempfile.mkdtemp(prefix="moec-soak-")) / "demo.moec"
    return moec.compile(module, example, max_tokens=64).save(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", default=None, help="default: compile the small demo model")
    ap.add_argument("--calls", type=int, default=10_000)
    ap.add_argument("--bound-mb", type=float, default=DEFAULT_BOUND_MB)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "soak.json"))
    a = ap.parse_args()

    from moec.runtime import load

    model = load(a.artifact or _compile_demo())
    r = soak(model, a.calls, a.bound_mb, a.seed)
    print(f"{r['calls']} calls (0..{r['max_tokens']} tokens) in {r['seconds']:.1f} s; RSS "
          f"{r['rss_baseline_mb']:.1f} MiB after warm-up, growth {r['rss_growth_mb']:+.2f} MiB "
          f"(peak {r['rss_peak_growth_mb']:+.2f}, bound {r['bound_mb']} MiB), "
          f"{r['bytes_per_call_second_half']:+.1f} bytes/call over the second half: "
          f"{'OK' if r['ok'] else 'FAILED'}")
    r.update(artifact=str(a.artifact or "demo (compiled)"),
             tvm_num_threads=os.environ.get("TVM_NUM_THREADS"))
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(r, indent=2) + "\n")
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
