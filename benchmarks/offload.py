"""Expert offload benchmark: a generation artifact run with its routed experts under budgets.

    python benchmarks/offload.py ARTIFACT --fractions 1 0.5 0.25 0.125 --policies lru lfu \\
        --prompt 128 --new 64 --json benchmarks/results/offload.json

Each cell runs in a fresh process (peak RSS its own; the page cache is dropped before it,
posix_fadvise DONTNEED on the weights file, so no cell starts with the experts cached by the
previous one): `moec.load(ARTIFACT, expert_budget=f * all experts' bytes, ...)`, one greedy
generation (EOS ignored) of --new tokens after a --prompt token prompt, batch 1. Reported:
prefill and decode tokens/s, the expert cache's hit rate, prefetch accuracy (predicted experts
the next layer used), bytes read per generated token, the share of read time hidden behind
compute (overlap), peak RSS; and the same without a budget (fraction "resident") for the
baseline. The tokens of every cell are compared with the resident run's (they must be equal).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def _hwm_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def worker(a: argparse.Namespace) -> None:
    import numpy as np

    import moec

    weights = Path(a.artifact) / "weights.safetensors"
    fd = os.open(weights, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    kw = {} if a.budget is None else {"expert_budget": int(a.budget), "expert_policy": a.policy,
                                      "prefetch": not a.no_prefetch}
    lm = moec.load(a.artifact, max_batch=1, max_seq_len=a.prompt + a.new + 8, **kw)
    g = lm.step_model.geometry
    prompt = [int(t) for t in np.random.default_rng(0).integers(3, g.vocab_size, a.prompt)]
    eng = lm.engine
    t0 = time.perf_counter()
    req = eng.add(prompt, eng.params(max_new_tokens=a.new, ignore_eos=True))
    while req.first_token_time is None:
        eng.step()
    t1 = time.perf_counter()
    eng.run_until_done([req])
    t2 = time.perf_counter()
    row = {"prefill_tok_s": a.prompt / (t1 - t0), "decode_tok_s": (a.new - 1) / (t2 - t1),
           "tokens": req.output, "peak_rss_gb": _hwm_gb()}
    cache = lm.step_model.expert_cache
    if cache is not None:
        s = cache.stats.summary()
        row.update(hit_rate=s["hit_rate"], prefetch_accuracy=s["prefetch_accuracy"],
                   overlap=s["overlap"], bytes_per_token=s["bytes_read"] / (a.prompt + a.new),
                   wait_s=s["wait_s"], read_s=s["read_s"])
    print("RESULT " + json.dumps(row))


def _pct(v: float | None) -> str:
    return "    -" if v is None else f"{100 * v:5.1f}%"


def expert_bytes(artifact: str) -> int:
    import moec

    lm = moec.load(artifact, expert_budget=1 << 62)
    return sum(ex.nbytes for ex in lm.step_model.expert_cache.experts.values())


def run(a: argparse.Namespace) -> None:
    total = expert_bytes(a.artifact)
    cells = [("resident", None, "-", False)]
    for f in a.fractions:
        for pol in a.policies:
            for pf in (True, False) if a.both_prefetch else (True,):
                cells.append((f, int(total * f), pol, pf))
    rows, ref = [], None
    for frac, budget, pol, pf in cells:
        cmd = [sys.executable, __file__, "worker", a.artifact, "--prompt", str(a.prompt),
               "--new", str(a.new), "--policy", pol if pol != "-" else "lru"]
        if budget is not None:
            cmd += ["--budget", str(budget)]
        if not pf:
            cmd.append("--no-prefetch")
        env = {**os.environ, "TVM_NUM_THREADS": str(a.threads)}
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
        if res.returncode or not line:
            print(f"{frac} {pol} failed:\n{res.stderr[-1500:]}", file=sys.stderr)
            continue
        r = json.loads(line[0][7:])
        toks = r.pop("tokens")
        ref = toks if ref is None else ref
        r.update(fraction=frac, budget=budget, policy=pol, prefetch=pf, same_tokens=toks == ref)
        rows.append(r)
        print(f"{str(frac):8s} {pol:3s} prefetch={pf!s:5s} decode {r['decode_tok_s']:6.1f} "
              f"tok/s prefill {r['prefill_tok_s']:7.1f} tok/s hit {_pct(r.get('hit_rate'))} "
              f"acc {_pct(r.get('prefetch_accuracy'))} rss {r['peak_rss_gb']:.2f} GB "
              f"same={r['same_tokens']}", flush=True)
    out = {"command": "python benchmarks/offload.py " + " ".join(sys.argv[1:]),
           "expert_bytes": total, "rows": rows}
    if a.json:
        tmp = Path(a.json).with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=1))
        tmp.replace(a.json)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd")
    w = sub.add_parser("worker")
    w.add_argument("artifact")
    w.add_argument("--budget", type=int, default=None)
    w.add_argument("--policy", default="lru")
    w.add_argument("--no-prefetch", action="store_true")
    w.add_argument("--prompt", type=int, default=128)
    w.add_argument("--new", type=int, default=64)
    r = sub.add_parser("run")
    r.add_argument("artifact")
    r.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.125])
    r.add_argument("--policies", nargs="+", default=["lru", "lfu"])
    r.add_argument("--both-prefetch", action="store_true", help="also run without prefetch")
    r.add_argument("--prompt", type=int, default=128)
    r.add_argument("--new", type=int, default=64)
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--json", default=None)
    a = p.parse_args()
    if a.cmd == "worker":
        worker(a)
    elif a.cmd == "run":
        run(a)
    else:
        p.print_help()


if __name__ == "__main__":
    main()
