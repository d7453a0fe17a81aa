"""Dynamic gating (the cap-topk pass): latency and error of capping top-2 at 1 on the demo layer,
with a peaked (trained-like) router and a uniform one.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/cap_topk.py [--threads 2] [--tokens 1 64 512] \\
        [--reps 100] [--peak 0.8 0.95] [--json benchmarks/results/cap_topk.json]

The demo layer (moec.models.reference.demo_model: hidden 256, intermediate 512, 8 experts,
top-2, softmax without renormalisation) is compiled three times per router: the default
pipeline (top-2), `default,cap-topk{k=1}@after:fuse-gating` (top-1, the kept weight rescaled to
the top-2 sum) and the same with renormalize=false. Routers: "uniform" is the layer's random
init (near-uniform softmax); "peaked P" scales the router weight so that the mean top-1
probability on the inputs is P (--peak; a trained router's routing is peaked like that).

Latency: the variants of one router are called in turn (in a shuffled order each round) on the
same inputs, --reps rounds per token count, and each variant's median is compared with the
top-2 median of the same rounds: on a loaded machine the load slows all of them alike instead
of deciding the ratio (the ratio of the fastest calls is reported too).
Error against the PyTorch layer (top-2; the uncapped artifact matches it to about 1e-6), on the
MoE block's part of the output (the layer adds a residual, which hides the block's error) and on
the layer output: max |capped - model| / max |model| (moec's usual measure: the worst token) and
the RMS error ||capped - model|| / ||model|| over all tokens (the typical token).
Writes JSON with the machine's load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

VARIANTS = {
    "top-2": "default",
    "cap k=1": "default,cap-topk{k=1}@after:fuse-gating",
    "cap k=1, no renorm": "default,cap-topk{k=1,renormalize=false}@after:fuse-gating",
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 512])
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--peak", type=float, nargs="+", default=[0.8, 0.95], help="mean top-1 "
                    "probability of each peaked router")
    ap.add_argument("--json", default="benchmarks/results/cap_topk.json")
    a = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(a.threads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import numpy as np
    import torch

    import moec
    from moec.models.reference import demo_model
    from moec.passes.manager import relative_error

    torch.set_num_threads(a.threads)
    load_before = os.getloadavg()
    rng = np.random.default_rng(0)
    hidden = demo_model()[1][0].shape[1]
    inputs = {t: [rng.standard_normal((t, hidden)).astype(np.float32) for _ in range(4)]
              for t in a.tokens}
    report: dict = {"machine": {"cpu": platform.processor() or platform.machine(),
                                "cores": os.cpu_count(), "threads": a.threads,
                                "loadavg_before": load_before},
                    "layer": "demo_model(): hidden 256, intermediate 512, 8 experts, top-2",
                    "tokens": a.tokens, "reps": a.reps, "routers": {}}

    def rms(got: np.ndarray, want: np.ndarray) -> float:
        return float(np.linalg.norm(got - want) / np.linalg.norm(want))

    def router_probs(model, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            xt = torch.from_numpy(x)
            h = xt + model.mixer(model.input_norm(xt))
            return torch.softmax(model.mlp.gate(model.post_norm(h)), -1).numpy()

    xs_all = np.concatenate([x for t in a.tokens for x in inputs[t]])
    for router, peak in [*((f"peaked {p}", p) for p in a.peak), ("uniform", None)]:
        model, (ex,) = demo_model()
        if peak is not None:  # bisect the logit scale to the wanted mean top-1 probability
            w0 = model.mlp.gate.weight.detach().clone()
            lo, hi = 1.0, 1000.0
            for _ in range(40):
                mid = (lo * hi) ** 0.5
                with torch.no_grad():
                    model.mlp.gate.weight.copy_(w0 * mid)
                top1 = router_probs(model, xs_all).max(-1).mean()
                lo, hi = (mid, hi) if top1 < peak else (lo, mid)
        p = router_probs(model, xs_all)
        top2 = np.sort(p, -1)[:, -2:]
        info = {"mean_top1_prob": float(p.max(-1).mean()),
                "mean_top1_share_of_top2": float((top2[:, 1] / top2.sum(-1)).mean()),
                "variants": {}}
        print(f"{router} router: mean top-1 probability {info['mean_top1_prob']:.3f}, "
              f"top-1 share of the top-2 weight {info['mean_top1_share_of_top2']:.3f}",
              flush=True)
        models = {}
        for name, passes in VARIANTS.items():
            t0 = time.perf_counter()
            models[name] = moec.compile(model, (ex,), passes=passes,
                                        max_tokens=max(a.tokens)).load_model()
            print(f"  compiled {name} in {time.perf_counter() - t0:.1f} s", flush=True)
        for t in a.tokens:
            xs = inputs[t]
            with torch.no_grad():
                want = [model(torch.from_numpy(x)).numpy() for x in xs]
                resid = [(torch.from_numpy(x) + model.mixer(model.input_norm(
                    torch.from_numpy(x)))).numpy() for x in xs]
            times: dict[str, list[float]] = {n: [] for n in models}
            for m in models.values():  # warm-up
                m(xs[0])
            order = list(models.items())
            for r in range(a.reps):
                random.Random(r).shuffle(order)  # no variant always runs after the same one
                for n, m in order:
                    x = xs[r % len(xs)]
                    t1 = time.perf_counter()
                    m(x)
                    times[n].append(time.perf_counter() - t1)
            base, base_fast = statistics.median(times["top-2"]), min(times["top-2"])
            for n, m in models.items():
                outs = [m(x) for x in xs]
                o, w, h = (np.concatenate(v) for v in (outs, want, resid))
                med, fast = statistics.median(times[n]), min(times[n])
                row = {"median_ms": med * 1e3, "speedup_vs_top2": base / med,
                       "speedup_vs_top2_fastest_calls": base_fast / fast,
                       "max_rel_err_moe_block": relative_error(o - h, w - h),
                       "rms_rel_err_moe_block": rms(o - h, w - h),
                       "max_rel_err_layer": relative_error(o, w), "rms_rel_err_layer": rms(o, w)}
                info["variants"].setdefault(n, {})[str(t)] = row
                print(f"  T={t:<4} {n:<20} {med * 1e3:8.3f} ms  x{base / med:5.2f} "
                      f"(fastest x{base_fast / fast:5.2f})  MoE block error max "
                      f"{row['max_rel_err_moe_block']:.3f} rms {row['rms_rel_err_moe_block']:.3f}"
                      f"  layer rms {row['rms_rel_err_layer']:.1e}", flush=True)
        report["routers"][router] = info
    report["machine"]["loadavg_after"] = os.getloadavg()
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(report, indent=1) + "\n")
    print(f"load average before {load_before}, after {report['machine']['loadavg_after']}; "
          f"wrote {a.json}")


if __name__ == "__main__":
    main()
