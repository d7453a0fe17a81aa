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

Against bounds. Each worker traces the cache's expert accesses and replays them with Belady's
MIN under the same budget (moec.runtime.cache_replay): `belady_hit_rate`, the best a demand
cache could do on that run's routing, and `hit_to_belady` = hit_rate / belady_hit_rate (with
prefetch it can pass 1: prefetched experts are hits MIN's demand loading cannot have). The run
measures the disk's read bandwidth once (`disk_bandwidth`: O_DIRECT reads of the weights file in
4 MiB aligned chunks; where O_DIRECT is refused, e.g. tmpfs, pread after posix_fadvise DONTNEED,
which on tmpfs measures memory: the JSON names the method) and gives each cell an I/O roofline
for decode, max(resident decode time per token, bytes read per decode token / bandwidth), and
`decode_vs_roofline` = decode time per token / roofline (1 = at the bound). With
--both-prefetch, `prefetch_wait_removed` = 1 - wait with prefetch / wait without (same fraction
and policy): the share of the time the model waited for reads that prefetch took away.

Routing. The experts a real artifact uses are its router's choice; the benchmark reports how
skewed that was, from the cache's trace: `top_quarter_share`, the share of a layer's expert uses
that its most used quarter of experts took (0.25: uniform), and `repeat`, the share of a decode
fetch's experts that the previous fetch of the same layer used too (k/E: by chance). The models
made by `python benchmarks/generate.py`'s checkpoint() for "qwen3-big" (random weights: skewed,
sticky routing, as trained models show) and "qwen3-big-uniform" (attention output scaled down:
near-uniform routing) give both kinds; synthetic traces are replayed in the tests too
(tests/runtime/test_cache_policy.py).

Larger than memory. With --memory-limit (e.g. 4GB; needs a writable cgroup v1 memory
controller, /sys/fs/cgroup/memory, as root) the cells of --limited-fractions run again inside a
memory cgroup of that size, which counts the page cache too, so a model bigger than the limit
must really run from disk. With --llama-gguf and --llama-python (an interpreter with
llama-cpp-python) llama.cpp runs the same model, converted from the same checkpoint, with its
default memory-mapped weights, once without a limit and once inside the same cgroup: its pages
come and go as the kernel's page cache pleases, the comparison for moec's budgeted cache
(benchmarks/generate.py's llama worker: greedy, the same prompt token ids).
"""

from __future__ import annotations

import argparse
import json
import mmap
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


def disk_bandwidth(path: Path, total: int = 256 << 20, chunk: int = 4 << 20
                   ) -> dict[str, object]:
    """Sequential read bandwidth of the file's disk: up to `total` bytes from its start in
    `chunk`-byte aligned reads, with O_DIRECT (past the page cache); where O_DIRECT is refused,
    pread of chunks whose page-cache copy was just dropped (posix_fadvise DONTNEED)."""
    size = os.path.getsize(path)
    total = max(chunk, min(total, size // chunk * chunk))
    buf = mmap.mmap(-1, chunk)  # page aligned, as O_DIRECT wants
    for method in ("O_DIRECT", "pread+fadvise"):
        direct = method == "O_DIRECT"
        try:
            fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECT", 0) if direct else 0))
        except OSError:
            continue
        try:
            if not direct:
                os.posix_fadvise(fd, 0, total, os.POSIX_FADV_DONTNEED)
            got, t = 0, time.perf_counter()
            for off in range(0, total, chunk):
                n = os.preadv(fd, [buf], off)
                got += n
                if not direct:
                    os.posix_fadvise(fd, off, n, os.POSIX_FADV_DONTNEED)
                if n < chunk:
                    break
            dt = time.perf_counter() - t
        except OSError:
            if direct:
                continue  # e.g. EINVAL: the file system takes O_DIRECT opens but not reads
            raise
        finally:
            os.close(fd)
        return {"bytes_per_s": got / dt if dt > 0 else float("inf"), "method": method,
                "bytes": got, "chunk": chunk}
    raise OSError(f"cannot read {path}")


def bounds(rows: list[dict], bandwidth: float) -> None:
    """Add to each budget row its decode I/O roofline (s/token) and decode time over it, and,
    to rows with prefetch that have a twin without it, the share of read wait it removed."""
    base = next((r for r in rows if r["budget"] is None), None)
    res_s = 1 / base["decode_tok_s"] if base else 0.0
    twin = {(r["fraction"], r["policy"]): r for r in rows
            if r["budget"] is not None and not r["prefetch"]}
    for r in rows:
        if r["budget"] is None:
            continue
        roof = max(res_s, r["decode_bytes_per_token"] / bandwidth)
        r["roofline_s_per_token"] = roof
        r["decode_vs_roofline"] = (1 / r["decode_tok_s"]) / roof if roof > 0 else None
        off = twin.get((r["fraction"], r["policy"]))
        if r["prefetch"] and off is not None:
            r["prefetch_wait_removed"] = 1 - r["wait_s"] / off["wait_s"] if off["wait_s"] \
                else None


def worker(a: argparse.Namespace) -> None:

    import moec

    weights = Path(a.artifact) / "weights.safetensors"
    fd = os.open(weights, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    kw = {} if a.budget is None else {"expert_budget": int(a.budget), "expert_policy": a.policy,
                                      "prefetch": not a.no_prefetch}
    lm = moec.load(a.artifact, max_batch=1, max_seq_len=a.prompt + a.new + 8, **kw)
    prompt = _prompt(a.prompt, lm.step_model.geometry.vocab_size)
    eng = lm.engine
    cache = lm.step_model.expert_cache
    if cache is not None:
        cache.trace = []

    def read() -> int:
        return sum(s.bytes_read for s in cache.stats.layers.values()) if cache else 0

    t0 = time.perf_counter()
    req = eng.add(prompt, eng.params(max_new_tokens=a.new, ignore_eos=True))
    while req.first_token_time is None:
        eng.step()
    t1 = time.perf_counter()
    b1 = read()
    eng.run_until_done([req])
    t2 = time.perf_counter()
    row = {"prefill_tok_s": a.prompt / (t1 - t0), "decode_tok_s": (a.new - 1) / (t2 - t1),
           "tokens": req.output, "peak_rss_gb": _hwm_gb()}
    if cache is not None:
        s = cache.stats.summary()
        opt = cache.belady_hit_rate()
        row.update(hit_rate=s["hit_rate"], prefetch_accuracy=s["prefetch_accuracy"],
                   overlap=s["overlap"], bytes_per_token=s["bytes_read"] / (a.prompt + a.new),
                   decode_bytes_per_token=(read() - b1) / max(1, a.new - 1),
                   wait_s=s["wait_s"], read_s=s["read_s"], belady_hit_rate=opt,
                   hit_to_belady=s["hit_rate"] / opt if opt and s["hit_rate"] is not None
                   else None, **routing_skew(cache.trace, cache.layers))
    print("RESULT " + json.dumps(row))


def _prompt(n: int, vocab: int) -> list[int]:
    """The prompt's token ids: benchmarks/generate.py's, so that llama.cpp gets the same."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from generate import _prompts  # noqa: PLC0415

    return _prompts(n, 1, vocab)[0]


def routing_skew(trace: list, layers: dict) -> dict[str, float]:
    """How skewed and how sticky the traced routing was (module doc): `top_quarter_share` and
    `repeat`, averaged over the layers."""
    import numpy as np

    shares, repeats = [], []
    for layer, info in layers.items():
        fetches = [set(ids) for la, ids in trace if la == layer]
        if not fetches:
            continue
        n = int(info["num_experts"])
        counts = np.sort(np.bincount([e for f in fetches for e in f], minlength=n))[::-1]
        shares.append(counts[: max(1, n // 4)].sum() / max(1, counts.sum()))
        single = [f for f in fetches if len(f) == int(info["k"])]  # one token: decode
        repeats += [len(a & b) / len(b) for a, b in zip(single, single[1:], strict=False)]
    return {"top_quarter_share": float(np.mean(shares)) if shares else None,
            "repeat": float(np.mean(repeats)) if repeats else None}


class MemoryCgroup:
    """A cgroup v1 memory controller group limiting its processes (page cache included) to
    `limit` bytes; `preexec` puts a child in it."""

    ROOT = Path("/sys/fs/cgroup/memory")

    def __init__(self, limit: int) -> None:
        self.path = self.ROOT / f"moec-offload-bench-{os.getpid()}"
        try:
            self.path.mkdir(exist_ok=True)
            (self.path / "memory.limit_in_bytes").write_text(str(limit))
        except OSError as e:
            raise SystemExit(f"--memory-limit needs a writable cgroup v1 memory controller at "
                             f"{self.ROOT} (run as root): {e}") from e
        self.limit = limit

    def preexec(self) -> None:
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak(self) -> int:
        return int((self.path / "memory.max_usage_in_bytes").read_text())

    def reset(self) -> None:
        (self.path / "memory.max_usage_in_bytes").write_text("0")

    def close(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass


def _drop_page_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _pct(v: float | None) -> str:
    return "    -" if v is None else f"{100 * v:5.1f}%"


def expert_bytes(artifact: str) -> int:
    import moec

    lm = moec.load(artifact, expert_budget=1 << 62)
    return sum(ex.nbytes for ex in lm.step_model.expert_cache.experts.values())


def run(a: argparse.Namespace) -> None:
    total = expert_bytes(a.artifact)
    disk = disk_bandwidth(Path(a.artifact) / "weights.safetensors", a.disk_mb << 20)
    print(f"disk read {disk['bytes_per_s'] / 1e9:.2f} GB/s ({disk['method']}, "
          f"{disk['bytes'] / 2**20:.1f} MiB)", flush=True)
    cells = [("resident", None, "-", False, False)]
    for f in a.fractions:
        for pol in a.policies:
            for pf in (True, False) if a.both_prefetch else (True,):
                cells.append((f, int(total * f), pol, pf, False))
    cgroup = None
    if a.memory_limit:
        from moec.engine.kv_pool import parse_bytes

        cgroup = MemoryCgroup(parse_bytes(a.memory_limit))
        for f in a.limited_fractions:
            cells.append((f, int(total * f), a.policies[0], False, True))
    if a.llama_gguf:
        cells.append(("llama.cpp", None, "mmap", False, False))
        if cgroup is not None:
            cells.append(("llama.cpp", None, "mmap", False, True))
    rows, ref = [], None
    env = {**os.environ, "TVM_NUM_THREADS": str(a.threads)}
    for frac, budget, pol, pf, limited in cells:
        if frac == "llama.cpp":
            script = Path(__file__).resolve().parent / "generate.py"
            cmd = [a.llama_python, str(script), "worker", "--system", "llama-f32", "--path",
                   a.llama_gguf, "--prompt", str(a.prompt), "--batch", "1", "--new", str(a.new),
                   "--threads", str(a.threads)]
        else:
            cmd = [sys.executable, __file__, "worker", a.artifact, "--prompt", str(a.prompt),
                   "--new", str(a.new), "--policy", pol if pol != "-" else "lru"]
            if budget is not None:
                cmd += ["--budget", str(budget)]
            if not pf:
                cmd.append("--no-prefetch")
        if frac == "llama.cpp" or limited:  # nothing of the model cached from the cell before
            _drop_page_cache(a.llama_gguf if frac == "llama.cpp" else
                             str(Path(a.artifact) / "weights.safetensors"))
        if limited:
            cgroup.reset()
        t = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, env=env,
                             preexec_fn=cgroup.preexec if limited else None)
        line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
        if res.returncode or not line:
            print(f"{frac} {pol} limited={limited} failed (exit {res.returncode}):\n"
                  f"{res.stderr[-1500:]}", file=sys.stderr)
            rows.append({"fraction": frac, "budget": budget, "policy": pol, "prefetch": pf,
                         "memory_limit": cgroup.limit if limited else None,
                         "failed": f"exit {res.returncode}", "wall_s": time.perf_counter() - t})
            continue
        r = json.loads(line[0][7:])
        if frac == "llama.cpp":
            r = {"prefill_tok_s": a.prompt / r["ttft_s"], "decode_tok_s": r["decoded"] /
                 r["decode_s"], "peak_rss_gb": r["peak_rss_gb"]}
        toks = r.pop("tokens", None)
        ref = toks if ref is None else ref
        r.update(fraction=frac, budget=budget, policy=pol, prefetch=pf,
                 same_tokens=None if toks is None else toks == ref,
                 memory_limit=cgroup.limit if limited else None)
        if limited:
            r["cgroup_peak_gb"] = cgroup.peak() / 1e9  # RSS and page cache together
        rows.append(r)
        print(f"{str(frac):9s} {pol:8s} prefetch={pf!s:5s} limited={limited!s:5s} decode "
              f"{r['decode_tok_s']:6.1f} tok/s prefill {r['prefill_tok_s']:7.1f} tok/s hit "
              f"{_pct(r.get('hit_rate'))} (MIN {_pct(r.get('belady_hit_rate'))}) acc "
              f"{_pct(r.get('prefetch_accuracy'))} rss {r['peak_rss_gb']:.2f} GB"
              + (f" cgroup peak {r['cgroup_peak_gb']:.2f} GB" if limited else "")
              + f" same={r['same_tokens']}", flush=True)
    if cgroup is not None:
        cgroup.close()
    bounds([r for r in rows if "failed" not in r and r["fraction"] != "llama.cpp"
            and not r.get("memory_limit")], disk["bytes_per_s"])
    for r in rows:
        if "roofline_s_per_token" in r:
            removed = r.get("prefetch_wait_removed")
            print(f"{str(r['fraction']):8s} {r['policy']:3s} prefetch={r['prefetch']!s:5s} "
                  f"decode {1e3 / r['decode_tok_s']:7.2f} ms/tok, I/O roofline "
                  f"{1e3 * r['roofline_s_per_token']:7.2f} ms/tok "
                  f"(x{r['decode_vs_roofline']:.2f})"
                  + ("" if removed is None else f", prefetch removed {_pct(removed)} of wait"))
    out = {"command": "python benchmarks/offload.py " + " ".join(sys.argv[1:]),
           "expert_bytes": total, "disk": disk, "rows": rows}
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
    w.add_argument("--policy", default="adaptive")
    w.add_argument("--no-prefetch", action="store_true")
    w.add_argument("--prompt", type=int, default=128)
    w.add_argument("--new", type=int, default=64)
    r = sub.add_parser("run")
    r.add_argument("artifact")
    r.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.125])
    r.add_argument("--policies", nargs="+", default=["adaptive", "lru"])
    r.add_argument("--both-prefetch", action="store_true", help="also run without prefetch")
    r.add_argument("--prompt", type=int, default=128)
    r.add_argument("--new", type=int, default=64)
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--disk-mb", type=int, default=256,
                   help="MiB of the weights file read to measure the disk's bandwidth")
    r.add_argument("--memory-limit", default=None,
                   help="also run --limited-fractions (and llama.cpp) in a memory cgroup of "
                        "this size, e.g. 4GB")
    r.add_argument("--limited-fractions", type=float, nargs="+", default=[0.1])
    r.add_argument("--llama-gguf", default=None, help="the same model as a GGUF (f32)")
    r.add_argument("--llama-python", default=None, help="python with llama-cpp-python")
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
