"""Expert-parallel communication-overhead benchmark on the Mixtral-like layer.

    python benchmarks/ep_bench.py                       # compile once, then EP 1 / 2 / 4
    python benchmarks/ep_bench.py --ranks 2 --tokens 64 # a subset

The model is one `DecoderLayer` (RMSNorm -> linear mixer -> RMSNorm -> MoE) at Mixtral's
per-layer MoE sizes: hidden 1024, expert intermediate 3584, 8 experts, top-2, fp32 (the expert
weights alone are 352 MiB). It is compiled once with `ep=True` (kept at --artifact, reused when
present). Then:

- `moec bench ART` (one process, all cores): the single-process baseline;
- for each N in --ranks: `torchrun --standalone --nproc-per-node N -m moec.cli bench ART --ep N
  --check`: per layer, median ms per call in the dispatch all-to-all, the expert compute, the
  combine all-to-all and the rest, on every rank, plus the equality of every rank's outputs
  with the single-process model on the same tokens, and the memory each rank holds.

`--tokens` are global: they are split evenly over the ranks. Results: one JSON per run under
benchmarks/results/ (`ep_mixtral_layer_ep{N}.json`) and a summary `ep_mixtral_layer.json`.
On a machine with fewer cores than ranks the ranks share cores (TVM_NUM_THREADS = cores //
ranks, at least 1), so expert compute does not get faster with more ranks there; the point of
the numbers is the split between communication and compute.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = {"hidden": 1024, "intermediate": 3584, "experts": 8, "top_k": 2}


def compile_layer(path: Path) -> None:
    import moec
    from moec.models.reference import demo_model

    module, example = demo_model(seed=0, **SIZES)
    t0 = time.perf_counter()
    art = moec.compile(module, example, max_tokens=4096, ep=True, progress=True)
    art.save(path)
    print(f"compiled {path} in {time.perf_counter() - t0:.0f} s", flush=True)


def run_bench(art: Path, ranks: int, tokens: list[int], repeat: int, out: Path) -> dict:
    cli = ["-m", "moec.cli", "bench", str(art), "--tokens", *map(str, tokens), "--repeat",
           str(repeat), "--json", str(out)]
    env = dict(os.environ)
    if ranks == 1:
        cmd = [sys.executable, *cli]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               str(ranks), *cli, "--ep", str(ranks), "--check", "--timeout", "600"]
        cores = len(os.sched_getaffinity(0))
        env.setdefault("TVM_NUM_THREADS", str(max(1, cores // ranks)))
    print("$", " ".join(cmd), flush=True)
    load_before = os.getloadavg()[0]
    subprocess.run(cmd, check=True, env=env)
    report = json.loads(out.read_text())
    # The machine may be shared: say how busy it was around the run.
    report["load_average_1min"] = [load_before, os.getloadavg()[0]]
    out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def summarize(reports: dict[int, dict]) -> dict:
    rows = []
    for n, rep in sorted(reports.items()):
        for j, total in enumerate(rep["tokens"]):
            runs = [r["runs"][j] for r in rep["ranks"]]
            row = {"ranks": n, "tokens": total, "tokens_per_rank": [r.get("local_tokens", total)
                                                                   for r in runs],
                   "total_ms_max_rank": max(r["total"] for r in runs) * 1e3,
                   "load_average_1min": rep["load_average_1min"]}
            if "layers" in runs[0]:
                (layer,) = runs[0]["layers"]
                for ph in ("dispatch_a2a", "expert_compute", "combine_a2a", "rest"):
                    row[f"{ph}_ms_mean"] = sum(r["layers"][layer][ph] for r in runs) / n * 1e3
                    row[f"{ph}_ms_max"] = max(r["layers"][layer][ph] for r in runs) * 1e3
                row["max_rel_err"] = max(r["max_rel_err"] for r in runs)
                row["bitwise_equal"] = all(r["bitwise_equal"] for r in runs)
            rows.append(row)
    memory = {}
    for n, rep in sorted(reports.items()):
        memory[n] = [{"rank": r["rank"],
                      "rss_growth_at_load_mib": (r["rss_after_load_bytes"]
                                                 - r["rss_before_load_bytes"]) / 2**20,
                      **({"weights_held_mib": (r["memory"]["shared_bytes"]
                                               + r["memory"]["expert_bytes"]) / 2**20,
                          "artifact_weights_mib": r["memory"]["artifact_bytes"] / 2**20}
                         if "memory" in r else {})} for r in rep["ranks"]]
    return {"rows": rows, "memory": memory}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifact", default=str(Path("/tmp") / "moec-mixtral-layer-ep.moec"))
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--tokens", type=int, nargs="+", default=[64, 512])
    p.add_argument("--repeat", type=int, default=10)
    a = p.parse_args()
    art = Path(a.artifact)
    if not (art / "manifest.json").is_file():
        compile_layer(art)
    RESULTS.mkdir(parents=True, exist_ok=True)
    reports = {n: run_bench(art, n, a.tokens, a.repeat, RESULTS / f"ep_mixtral_layer_ep{n}.json")
               for n in a.ranks}
    summary = {"model": {"kind": "DecoderLayer (demo_model)", **SIZES, "dtype": "float32"},
               "cores": len(os.sched_getaffinity(0)), **summarize(reports)}
    (RESULTS / "ep_mixtral_layer.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary["rows"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
