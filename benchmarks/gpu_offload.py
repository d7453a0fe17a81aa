"""Expert offload's GPU tier (moec/runtime/expert_store.py DeviceStore) on a GPU, for
benchmarks/gpu_check.py `run` (nothing to prepare: it uses the bundle's tiny generation
artifacts, benchmarks/gpu_paged.py, and makes its own weights file).

- `check_store`: an expert cache over a weights file of 3 layers x 8 experts of 3 MiB (so that
  experts straddle the driver's 2 MiB granules and share them with their neighbours), with a
  budget of 5 experts' charges, through 40 tokens of skewed sticky routing: after every
  fetch, each needed expert's bytes are copied back from the device and compared with the
  file's; the device memory mapped, and allocated, never exceeds the budget; the load
  bandwidth (bytes copied host-to-device / time in loads) is reported.
- `check_artifacts`: every tiny generation artifact of the bundle stepped through the
  gpu_paged schedule with `expert_budget` = one layer's experts (a step may route to all of
  them; the layers evict each other's), against the same artifact fully resident on the
  same GPU: the logits must be bitwise equal (the same kernels read the same bytes).

Runs on a CPU too, on tests/generate/fake_libcuda.c (tests/generate/test_offload_device.py).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
LAYERS, EXPERTS, K = 3, 8, 2
ROWS, COLS = 768, 1024  # float32: 3 MiB an expert


def _trace(tokens: int, seed: int = 0) -> list[tuple[int, list[int]]]:
    """Skewed (Zipf 1.0) sticky (40% of a token's choices repeat the previous token's)
    routing, one (layer, ids) per layer call."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, EXPERTS + 1)
    p /= p.sum()
    prev: dict[int, list[int]] = {}
    out = []
    for _ in range(tokens):
        for layer in range(LAYERS):
            if layer in prev and rng.random() < 0.4:
                ids = prev[layer]
            else:
                ids = sorted(int(i) for i in rng.choice(EXPERTS, K, replace=False, p=p))
            prev[layer] = ids
            out.append((layer, ids))
    return out


def _save(tensors: dict[str, np.ndarray], path: Path) -> None:
    """A safetensors file of float32 arrays (written here: the GPU machine may lack the
    safetensors package)."""
    header, off = {}, 0
    for name, a in tensors.items():
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [off,
                                                                                off + a.nbytes]}
        off += a.nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for a in tensors.values():
            f.write(np.ascontiguousarray(a).tobytes())


def check_store(report: list, driver: Any = None, rows: int = ROWS, cols: int = COLS,
                tokens: int = 40) -> None:
    from moec.runtime.cuda_driver import CudaDriver
    from moec.runtime.expert_cache import ExpertCache
    from moec.runtime.expert_store import DeviceStore
    from moec.runtime.weights import _header

    driver = driver or CudaDriver(0)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "weights.safetensors"
        tensors = {f"l{la}.w": rng.standard_normal((EXPERTS, rows, cols)).astype(np.float32)
                   for la in range(LAYERS)}
        _save(tensors, path)
        header, start, _ = _header(path)
        spans = {n: tuple(start + int(o) for o in header[n]["data_offsets"]) for n in tensors}
        offload = {"layers": [{"layer": la, "num_experts": EXPERTS, "k": K,
                               "params": [f"l{la}.w"]} for la in range(LAYERS)]}
        store = DeviceStore(driver, path, spans)
        charge = max(store.charge([(lo + e * rows * cols * 4, rows * cols * 4)])
                     for lo, _ in spans.values() for e in range(EXPERTS))
        budget = 5 * charge
        cache = ExpertCache(path, header, start, offload, budget, store=store)
        host = np.empty((rows, cols), np.float32)
        wrong = 0
        try:
            for layer, ids in _trace(tokens):
                cache.fetch(layer, np.array(ids), None)
                w = store._weights[f"l{layer}.w"]
                for e in ids:
                    driver.copy_to_host(host.ctypes.data, w.base + e * host.nbytes, host.nbytes)
                    wrong += not np.array_equal(host, tensors[f"l{layer}.w"][e])
            s = cache.stats.summary()
            held = store.handles * store.granule
            mapped = store.peak_mapped * store.granule
        finally:
            cache.close()
    ok = wrong == 0 and held <= budget and mapped <= budget
    row = {"offload_store": f"{LAYERS}x{EXPERTS} experts of {rows * cols * 4 / 2**20:.1f} MiB",
           "granule_mib": store.granule / 2**20, "budget_mib": budget / 2**20,
           "peak_mapped_mib": mapped / 2**20, "allocated_mib": held / 2**20,
           "wrong_experts": wrong, "hit_rate": s["hit_rate"], "loads": s["loads"],
           "evictions": s["evictions"],
           "load_gb_s": s["bytes_read"] / s["read_s"] / 1e9 if s["read_s"] else None, "ok": ok}
    report.append(row)
    print(f"  offload store: {row['offload_store']}, granule {row['granule_mib']:.0f} MiB, "
          f"budget {row['budget_mib']:.0f} MiB: peak mapped {row['peak_mapped_mib']:.0f} MiB, "
          f"hit rate {s['hit_rate']:.2f}, {s['loads']} loads at "
          f"{row['load_gb_s'] or 0:.1f} GB/s, wrong experts {wrong} {'ok' if ok else 'FAIL'}")


def check_artifacts(bundle: Path, report: list, device: str = "cuda") -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_paged import load_schedule, run_steps

    from moec.runtime import load

    for art in sorted((bundle / "paged").glob("*.moec")):
        steps, nb, _ = load_schedule(art.with_suffix(".npz"))
        want = run_steps(load(art, device=device), steps, nb)
        probe = load(art, device=device, expert_budget=1 << 40).expert_cache
        # a step of the schedule may route to all of a layer's experts: the budget holds one
        # layer's, so that layers evict each other's
        budget = max(sum(ex.charge for (la, _), ex in probe.experts.items() if la == layer)
                     for layer in probe.layers)
        del probe
        model = load(art, device=device, expert_budget=budget)
        got = run_steps(model, steps, nb)
        same = all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))
        s = model.expert_cache.stats.summary()
        report.append({"offload_artifact": art.name, "budget_mib": budget / 2**20,
                       "hit_rate": s["hit_rate"], "loads": s["loads"],
                       "evictions": s["evictions"], "ok": same})
        print(f"  offload {art.name:24s} budget {budget / 2**20:.0f} MiB: logits "
              f"{'bitwise equal' if same else 'DIFFER'} to resident, {s['loads']} loads")


def check(bundle: Path, report: list) -> None:
    for fn in (lambda: check_store(report), lambda: check_artifacts(bundle, report)):
        try:
            fn()
        except Exception as e:  # report it and go on with the other checks
            report.append({"offload": f"{type(e).__name__}: {str(e)[:300]}", "ok": False})
            print(f"  offload check failed: {type(e).__name__}: {str(e)[:300]}")
