"""The layer benchmark's driver: limits, then per shape the block and its systems, then per
(token count, routing) a fresh input pool timed round-robin over the systems.

Protocol of one case. The pool holds `warmup + repeat` inputs; round i feeds `pool[i]` to every
system, `hf-eager` first (its output is the reference), the others in an order that rotates
each round, so that machine noise hits every system alike. Before each call the last-level
cache is flushed outside the stopwatch (limits.CacheFlush): a system must not find in the cache
the experts that the system before it read for the same input. Every output is
checked against the reference outside the stopwatch: the warm-up rounds are the check before
timing (a system that fails there is never timed), and a system that fails in a timed round
loses its times. The check is max |y - ref| / max |ref| <= tol over the tokens not on a routing
near-tie (layer.tie_tokens). Reported per system: median, min and max wall time of the timed
rounds, and the median process CPU time (less disturbed by other jobs than the wall time).
After each timed round a 128 MiB TVM read (limits.ReadProbe) measures the bandwidth the machine
gives at that moment: the case's `roofline_now` uses its median beside the run-wide `roofline`,
whose bandwidth is the best of the start and end limits and of these reads.
"""

from __future__ import annotations

import datetime
import gc
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moec.bench.layer import (
    DEFAULT_SHAPES,
    DEFAULT_TOKENS,
    DTYPES,
    EXPERTS_IMPLEMENTATIONS,
    ROUTINGS,
    SHAPES,
    Pool,
    build_block,
    make_pool,
    relative_error,
    roofline,
    routing_stats,
    traffic,
)

SYSTEM_KINDS = ("hf", "torch.compile", "ort", "moec")
# Results go to the current directory unless --json names a path: never over the tracked
# benchmarks/results/*.json by accident (`--json benchmarks/results/layer_bench.json` on purpose)
DEFAULT_JSON = Path("layer_bench.json")
BF16_JSON = Path("layer_bench_bf16.json")
BF16_TOL = 3e-2  # a bf16 run's check: hf-eager rounds every op to bf16 and moec computes in
# float32 (widen-activations); on the tiny test layer they differ by up to about 1e-2
SETTLE_S = 20.0  # `moec bench`'s pause after building a shape's systems, before its first case.
# Building them (moec's compile and packing, ONNX Runtime's weight interleave) frees gigabytes,
# and on this VM the calls that follow ran slow for a while (the cause is not known; the
# hypervisor reclaiming the freed pages is a guess). `moec bench --shapes qwen3 --tokens 1
# --routing uniform --repeat 40`, runs alternated: without the pause moec's per-call times
# started at 19-51 ms and fell to 6 ms over the 40 rounds (medians 11.1 and 19.5 ms); with a
# 20 s pause, medians 9.1 and 6.8 ms (one of the two runs still started at 16-21 ms).


@dataclass
class Options:
    """What to run; `moec bench --help` documents each."""

    shapes: tuple[str, ...] = DEFAULT_SHAPES
    tokens: tuple[int, ...] = DEFAULT_TOKENS
    routings: tuple[str, ...] = ROUTINGS
    systems: tuple[str, ...] = SYSTEM_KINDS
    hf_impls: tuple[str, ...] = EXPERTS_IMPLEMENTATIONS
    warmup: int = 2
    repeat: int = 10
    threads: int = 2
    seed: int = 0
    zipf_s: float = 1.0
    tol: float = 1e-4
    json_path: Path = DEFAULT_JSON
    plot: bool = True
    progress: bool | None = None  # None: a bar when stderr is a terminal
    limits_reps: int = 10
    tvm_gemm: bool = True
    settle_s: float = 0.0  # pause after building each shape's systems (see SETTLE_S)
    touch: bool = True  # one untimed call of every system on max(tokens) tokens (touch_weights)
    dtype: str = "float32"  # the blocks' dtype: float32 or bfloat16
    command: str = ""

    @property
    def check_tol(self) -> float:
        """The output check's tolerance: `tol`, or at least BF16_TOL for a bf16 run."""
        return self.tol if self.dtype == "float32" else max(self.tol, BF16_TOL)

    def validate(self) -> None:
        from moec.errors import InputError

        bad = [s for s in self.shapes if s not in SHAPES]
        if bad:
            raise InputError(f"unknown shape(s) {bad}; choose from {sorted(SHAPES)}")
        for name, vals, allowed in (("routing", self.routings, ROUTINGS),
                                    ("system", self.systems, SYSTEM_KINDS),
                                    ("hf impl", self.hf_impls, EXPERTS_IMPLEMENTATIONS)):
            bad = [v for v in vals if v not in allowed]
            if bad:
                raise InputError(f"unknown {name}(s) {bad}; choose from {list(allowed)}")
        if self.dtype not in DTYPES:
            raise InputError(f"unknown dtype {self.dtype!r}; choose from {list(DTYPES)}")
        if not self.tokens or min(self.tokens) < 1:
            raise InputError(f"token counts must be >= 1, got {list(self.tokens)}")
        if self.warmup < 1 or self.repeat < 1:
            raise InputError("--warmup and --repeat must be >= 1 (the warm-up rounds are the "
                             "correctness check before timing)")


def bf16_note(dtype: str, host: dict[str, Any]) -> str:
    """What the run says about bf16 (the results' `bf16` field)."""
    if dtype == "bfloat16":
        return ("this run: bf16 blocks (moec computes in float32 on the bf16 weights; this CPU "
                + ("has" if host["avx512_bf16"] else "lacks") + " avx512_bf16)")
    return ("not run: moec bench --dtype bfloat16" + ("" if host["avx512_bf16"] else
                                                      " (this CPU lacks avx512_bf16)"))


def set_threads(n: int) -> dict[str, Any]:
    """Pin every runtime to n threads and make idle workers sleep; returns what was set. TVM and
    OpenMP read their variables when their thread pools start: call this before either runs."""
    torch_loaded = "torch" in sys.modules
    os.environ["TVM_NUM_THREADS"] = str(n)
    os.environ["MOEC_NUM_THREADS"] = str(n)
    os.environ["OMP_NUM_THREADS"] = str(n)
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    import torch

    torch.set_num_threads(n)
    return {"threads": n, "torch": torch.get_num_threads(), "TVM_NUM_THREADS": n,
            "ort_intra_op_num_threads": n, "OMP_WAIT_POLICY": "PASSIVE",
            "ort_allow_spinning": 0,
            "omp_env_before_torch": not torch_loaded}


def _host() -> dict[str, Any]:
    flags: set[str] = set()
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        from moec.codegen.target import host_target

        mcpu = str(host_target().attrs.get("mcpu", ""))
    except Exception:
        mcpu = ""
    return {"cpu": model, "llvm_mcpu": mcpu, "cores": os.cpu_count(), "machine":
            platform.machine(), "avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
            "avx512_bf16": "avx512_bf16" in flags, "python": platform.python_version()}


def _versions() -> dict[str, str | None]:
    import importlib.metadata as md

    out: dict[str, str | None] = {}
    for pkg in ("moec", "torch", "transformers", "onnxruntime", "onnx", "apache-tvm", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


@dataclass
class Timing:
    """One system in one case."""

    status: str = "ok"  # ok | wrong | skipped | error
    times_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    max_rel_err: float = 0.0
    detail: str = ""

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        if self.status == "ok" and self.times_s:
            d.update(median_s=statistics.median(self.times_s), min_s=min(self.times_s),
                     max_s=max(self.times_s), cpu_median_s=statistics.median(self.cpu_s))
        else:
            d["times_s"], d["cpu_s"] = [], []
        return d


def touch_weights(systems: list, x: Any) -> None:
    """One untimed, unchecked call of every system on `x` (the largest token count, which
    routes to every expert), before a layer's first case, so that each system's weights have
    all been read once since they were built. (Failures are left for time_case to report.)

    On the development VM, memory a process has not read for a while reads slowly the first
    time again (the cause is not known). Without this pass the first cases timed systems on
    their first reads of most experts, and only the systems whose weights are not in torch's
    memory suffered. `moec bench --shapes qwen3 --tokens 1 8 512 --routing uniform --repeat 8`,
    runs alternated, without / with: moec at 1 token 13.4, 28.1 / 5.93, 5.78 ms, at 8 tokens
    52.2, 54.6 / 38.2, 37.7 ms, at 512 tokens 341, 333 / 307, 311 ms; ONNX Runtime at 1 token
    16.7, 15.4 / 9.37, 9.03 ms; the transformers block at 1 token 9.83, 12.1 / 10.9, 11.2 ms.
    It is not a cure: in one full run after it, moec's Qwen3 1-token cell still measured
    67.6 ms (7.81 ms in the next run)."""
    for s in systems:
        if s.skip_reason(x.shape[0]):
            continue
        try:
            s.prepare(x)
            s(x)
        except Exception:  # noqa: S110  (time_case calls it again and records the error)
            pass


def time_case(systems: list, pool: Pool, warmup: int, tol: float, tick: Any,
              probe: Any = None, probed: list[float] | None = None,
              flush: Any = None) -> dict[str, Timing]:
    """Run the case's rounds (see the module docstring); `tick()` after each round. With a
    `probe` (limits.ReadProbe), its bandwidth after each timed round is appended to `probed`;
    `flush()` (limits.CacheFlush) runs before every call."""
    out = {s.name: Timing() for s in systems}
    active = []
    for s in systems:
        why = s.skip_reason(pool.tokens)
        if why:
            out[s.name] = Timing(status="skipped", detail=why)
            continue
        try:
            s.prepare(pool.xs[0])
            active.append(s)
        except Exception as e:
            out[s.name] = Timing(status="error", detail=_one_line(e))
    if not active or active[0].name != "hf-eager":
        raise RuntimeError("hf-eager, the reference, could not run: nothing can be checked")
    ref_sys, others = active[0], active[1:]
    for i, x in enumerate(pool.xs):
        shift = i % max(1, len(others))
        order = [ref_sys, *others[shift:], *others[:shift]]
        ref = None
        for s in order:
            t = out[s.name]
            if t.status != "ok":
                continue
            try:
                if flush is not None:
                    flush()
                c0, t0 = time.process_time(), time.perf_counter()
                y = s(x)
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
            except Exception as e:
                t.status, t.detail = "error", _one_line(e)
                continue
            if s is ref_sys:
                ref = y
            elif ref is None:
                t.status, t.detail = "error", "no reference output (hf-eager failed)"
                continue
            else:
                err = relative_error(y, ref, pool.ties[i])
                t.max_rel_err = max(t.max_rel_err, err)
                if not err <= tol:
                    phase = "warm-up (before timing)" if i < warmup else f"timed round {i}"
                    t.status = "wrong"
                    t.detail = f"output differs from hf-eager in {phase}: max rel err {err:.2e}"
                    continue
            if i >= warmup:
                t.times_s.append(dt)
                t.cpu_s.append(dc)
        if probe is not None and probed is not None and i >= warmup:
            probed.append(probe())
        tick()
    return out


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


def run(opts: Options) -> dict[str, Any]:
    """Run the benchmark; returns the results dict (also written as JSON, and plotted)."""
    from tqdm import tqdm

    from moec.bench import limits as L
    from moec.bench import report
    from moec.bench.baselines import build_systems

    opts.validate()
    try:
        import transformers  # noqa: F401  (the blocks and the reference are transformers')
    except ImportError:
        from moec.errors import InputError

        raise InputError("moec bench needs transformers: pip install 'moec[bench]'") from None
    threads = set_threads(opts.threads)
    import torch

    host = _host()
    results: dict[str, Any] = {
        "benchmark": "moec layer bench", "format": 1, "command": opts.command,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "host": host, "threads": threads, "versions": _versions(),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()},
        "load_average_start": list(os.getloadavg()), "dtype": opts.dtype,
        "bf16": bf16_note(opts.dtype, host),
        "shapes": {}, "cases": [],
    }
    report.preamble(results)
    lim = {"start": L.measure(opts.limits_reps, opts.tvm_gemm, opts.dtype)}
    try:
        probe = L.ReadProbe() if opts.tvm_gemm else None
    except Exception:  # optional, like the TVM limits: the run-wide roofline stays
        probe = None
    report.limits_line(lim["start"])
    flush = L.CacheFlush()
    rounds = opts.warmup + opts.repeat
    total = len(opts.shapes) * len(opts.tokens) * len(opts.routings) * rounds
    bar = tqdm(total=total, unit="round", disable=(None if opts.progress is None
                                                   else not opts.progress), file=sys.stderr)
    t_start = time.perf_counter()

    def log(msg: str) -> None:  # no bar (not a terminal): a line per step, for log files
        if bar.disable and opts.progress is None:
            el = int(time.perf_counter() - t_start)
            print(f"[{el // 60:3d}:{el % 60:02d}] {msg}", file=sys.stderr, flush=True)
        bar.set_description(msg)
    for shape_name in opts.shapes:
        shape = SHAPES[shape_name]
        log(f"{shape_name}: building")
        block = build_block(shape, opts.seed, opts.dtype)
        log(f"{shape_name}: compiling")
        systems, missing = build_systems(block, shape, opts.systems, max(opts.tokens),
                                         opts.threads, opts.hf_impls)
        entry = {**shape.summary(), "missing": missing,
                 "notes": {s.name: s.note for s in systems}, "compile_s": {}}
        results["shapes"][shape_name] = entry
        if opts.settle_s > 0:
            log(f"{shape_name}: settling {opts.settle_s:g} s")
            gc.collect()
            time.sleep(opts.settle_s)
        if opts.touch:
            log(f"{shape_name}: touching the weights")
            touch_weights(systems, make_pool(block, shape, max(opts.tokens), "uniform", 1,
                                             opts.seed, opts.zipf_s).xs[0])
        for tokens in sorted(opts.tokens):
            for routing in opts.routings:
                log(f"{shape_name} T={tokens} {routing}")
                pool = make_pool(block, shape, tokens, routing, rounds, opts.seed, opts.zipf_s)
                load0 = os.getloadavg()[0]
                probed: list[float] = []
                timings = time_case(systems, pool, opts.warmup, opts.check_tol,
                                    lambda: bar.update(1), probe, probed, flush)
                results["cases"].append({
                    "shape": shape_name, "tokens": tokens, "routing": routing,
                    "routing_stats": routing_stats(shape, pool),
                    "tie_tokens": int(sum(t.sum() for t in pool.ties)),
                    "load_average": [load0, os.getloadavg()[0]],
                    "work": traffic(shape, pool, DTYPES[opts.dtype]),
                    "round_bandwidth_gbs": probed,
                    "systems": {k: v.summary() for k, v in timings.items()}})
        entry["compile_s"] = {s.name: s.compile_s for s in systems if s.compile_s}
        del systems, block
        torch._dynamo.reset()
        gc.collect()
    bar.close()
    lim["end"] = L.measure(opts.limits_reps, opts.tvm_gemm, opts.dtype)
    # a read between rounds that beat both is the machine's limit too
    probes = [v for c in results["cases"] for v in c["round_bandwidth_gbs"]]
    lim["rounds_best_gbs"] = max(probes, default=None)
    bw = max(lim["start"]["bandwidth"]["gbs"], lim["end"]["bandwidth"]["gbs"], *probes) * 1e9
    rate = max(lim["start"]["gemm"]["gflops"], lim["end"]["gemm"]["gflops"]) * 1e9
    results["limits"] = {**lim, "bandwidth_gbs": bw / 1e9, "gemm_gflops": rate / 1e9}
    for case in results["cases"]:
        work = case.pop("work")
        case["roofline"] = roofline(work, bw, rate)
        if case["round_bandwidth_gbs"]:  # the same, at the bandwidth of the case's own rounds
            now = statistics.median(case["round_bandwidth_gbs"]) * 1e9
            case["roofline_now"] = roofline(work, now, rate)
    results["load_average_end"] = list(os.getloadavg())
    report.write(results, opts.json_path, plot_png=opts.plot)
    return results
