"""The expert-parallel time breakdown: per MoE layer, time in the dispatch all-to-all, the
expert compute, the combine all-to-all and the rest (the shared parts), on every rank.

`moec bench ART --ep N` (under torchrun) calls `bench_ep`; without `--ep` it times the
single-process model (`bench_single`), the baseline the breakdown is compared with.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

PHASES = ("dispatch_a2a", "expert_compute", "combine_a2a", "rest")


def token_split(total: int, world: int) -> list[int]:
    """Tokens per rank when `total` tokens are spread over `world` ranks (first ranks +1)."""
    base, extra = divmod(total, world)
    return [base + (1 if r < extra else 0) for r in range(world)]


def make_input(total: int, hidden: int, seed: int = 0) -> np.ndarray:
    """The benchmark's global input: the same on every rank, each rank takes its slice."""
    return np.random.default_rng(seed).standard_normal((total, hidden)).astype(np.float32)


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    """This process's resident set size now."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def _local_slice(x: np.ndarray, rank: int, world: int) -> np.ndarray:
    sizes = token_split(x.shape[0], world)
    start = sum(sizes[:rank])
    return np.ascontiguousarray(x[start:start + sizes[rank]])


def bench_ep(model: Any, tokens: Sequence[int], warmup: int, repeat: int,
             reference: Any = None) -> dict[str, Any]:
    """Time `model` (an EPModel) at each global token count; collective over its group.
    Returns this rank's results: per token count, per layer, the median seconds per call of
    each phase, and the whole call; with `reference` (a single-process CompiledModel) also the
    max relative error of this rank's outputs against it."""
    import torch.distributed as dist

    from moec.distributed.exchange import Timer

    hidden = int(model.signature.inputs[0].shape[1])
    rank, world = model.rank, model.world_size
    out: dict[str, Any] = {"rank": rank, "experts": [model.experts.start, model.experts.stop],
                           "memory": dict(model.memory), "runs": []}
    for total in tokens:
        x = _local_slice(make_input(total, hidden), rank, world)
        for _ in range(warmup):
            model(x)
        per_rep: list[Timer] = []
        for _ in range(repeat):
            dist.barrier(group=model._comm.group)  # start together; not timed
            model.timer = Timer()
            y = model(x)
            per_rep.append(model.timer)
            model.timer = None
        run: dict[str, Any] = {"tokens": total, "local_tokens": int(x.shape[0]), "layers": {},
                               "total": statistics.median(t.total for t in per_rep)}
        for layer in model.layers:
            last = per_rep[-1].layers[layer]
            run["layers"][layer] = {
                **{ph: statistics.median(t.layers[layer].as_dict()[ph] for t in per_rep)
                   for ph in PHASES},
                "rows_sent": last.rows_sent, "rows_received": last.rows_received}
        if reference is not None:
            want = reference(x)
            scale = float(np.abs(want).max()) if want.size else 0.0
            err = float(np.abs(y - want).max()) / scale if scale else 0.0
            run["max_rel_err"] = err
            run["bitwise_equal"] = bool(np.array_equal(y, want))
        out["runs"].append(run)
    out["peak_rss_bytes"] = peak_rss_bytes()
    return out


def make_inputs(model: Any, total: int, seed: int = 0) -> list[np.ndarray]:
    """Random inputs of `total` tokens for any single-process model: every symbolic dim is
    `total`; float inputs are standard normal; integer inputs are token ids, below the
    vocabulary (a generation artifact's, or the range the manifest records for the input).
    A generation artifact takes its plain forward's one input, token ids [T]."""
    from moec.errors import InputError
    from moec.runtime.inputs import numpy_dtype

    rng = np.random.default_rng(seed)
    geometry = getattr(model, "geometry", None)
    if geometry is not None:  # a generation artifact: model(ids) runs one sequence's prefill
        return [rng.integers(0, geometry.vocab_size, total).astype(np.int64)]
    ranges = model.manifest.meta.get("input_ranges") or {}
    out = []
    for spec in model.signature.inputs:
        shape = tuple(total if isinstance(d, str) else int(d) for d in spec.shape)
        dt = numpy_dtype(spec.dtype)
        if dt.kind == "f" or dt.kind == "V":  # float32/16, bfloat16 (ml_dtypes)
            out.append(rng.standard_normal(shape).astype(np.float32).astype(dt))
        elif dt.kind in "iu" and spec.name in ranges:
            lo, hi = ranges[spec.name]
            out.append(rng.integers(lo, hi, shape).astype(dt))
        else:
            raise InputError(f"moec bench cannot make up values for input {spec.name!r} "
                             f"({spec.type_str()}): time the model from Python on real inputs")
    return out


def bench_single(model: Any, tokens: Sequence[int], warmup: int, repeat: int) -> dict[str, Any]:
    """The single-process baseline: median seconds per call of the whole model."""
    runs = []
    for total in tokens:
        x = make_inputs(model, total)
        for _ in range(warmup):
            model(*x)
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            model(*x)
            times.append(time.perf_counter() - t0)
        runs.append({"tokens": total, "total": statistics.median(times)})
    return {"rank": 0, "peak_rss_bytes": peak_rss_bytes(), "runs": runs}


def format_table(results: list[dict[str, Any]]) -> str:
    """The breakdown as text: one row per token count and layer, ms per call, the mean over
    ranks of each phase (and the slowest rank's whole call)."""
    names = [name for run in results[0]["runs"] for name in run.get("layers", {})]
    w = min(32, max([14, *map(len, names)]))
    lines = [f"{'tokens':>6} {'layer':<{w}} {'dispatch':>9} {'experts':>9} {'combine':>9} "
             f"{'rest':>9} {'total':>9} {'max rank':>9}   (ms, mean over {len(results)} ranks)"]
    for j, run0 in enumerate(results[0]["runs"]):
        runs = [r["runs"][j] for r in results]
        for layer in run0.get("layers", {}) or {"(model)": None}:
            if layer == "(model)":
                total = statistics.mean(r["total"] for r in runs) * 1e3
                lines.append(f"{run0['tokens']:>6} {'(whole model)':<{w}} {'':>9} {'':>9} "
                             f"{'':>9} {'':>9} {total:>9.3f}")
                continue
            ph = {p: statistics.mean(r["layers"][layer][p] for r in runs) * 1e3 for p in PHASES}
            total = statistics.mean(r["total"] for r in runs) * 1e3
            worst = max(r["total"] for r in runs) * 1e3
            lines.append(f"{run0['tokens']:>6} {layer[-w:]:<{w}} {ph['dispatch_a2a']:>9.3f} "
                         f"{ph['expert_compute']:>9.3f} {ph['combine_a2a']:>9.3f} "
                         f"{ph['rest']:>9.3f} {total:>9.3f} {worst:>9.3f}")
        errs = [r["max_rel_err"] for r in runs if "max_rel_err" in r]
        if errs:
            equal = all(r["bitwise_equal"] for r in runs)
            lines.append(f"{'':>6} equality vs single-process: max rel err {max(errs):.2e} "
                         f"over {len(errs)} ranks{' (bitwise equal)' if equal else ''}")
    return "\n".join(lines)
