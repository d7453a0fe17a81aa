"""`moec run --ep N` and `moec bench --ep N` under torchrun: process group from the environment
torchrun sets, token split, output gathering, and the breakdown report."""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from moec.errors import InputError

TORCHRUN_HINT = "torchrun --nproc-per-node {n} -m moec.cli {cmd} ... --ep {n}"


def init_from_env(ep: int, timeout: float, cmd: str) -> tuple[Any, bool]:
    """The default process group, from torchrun's RANK / WORLD_SIZE / MASTER_ADDR variables,
    with `timeout` seconds on every collective (gloo: the CPU backend), and whether this call
    created it (then `shutdown` must destroy it). Also gives each rank its share of the cores
    unless TVM_NUM_THREADS or MOEC_NUM_THREADS says otherwise."""
    import torch.distributed as dist

    world = os.environ.get("WORLD_SIZE")
    if world is None or "RANK" not in os.environ:
        raise InputError(f"--ep {ep} runs one process per rank: launch it with "
                         f"`{TORCHRUN_HINT.format(n=ep, cmd=cmd)}`")
    if int(world) != ep:
        raise InputError(f"--ep {ep}, but torchrun started {world} processes; use "
                         f"--nproc-per-node {ep} (with one node) or --ep {world}")
    if "TVM_NUM_THREADS" not in os.environ:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        os.environ["TVM_NUM_THREADS"] = os.environ.get("MOEC_NUM_THREADS") or str(
            max(1, cores // local))
    if dist.is_initialized():
        return dist.group.WORLD, False
    dist.init_process_group("gloo", init_method="env://", timeout=timedelta(seconds=timeout))
    return dist.group.WORLD, True


def split_inputs(inputs: list[np.ndarray], signature: Any, rank: int, world: int
                 ) -> list[np.ndarray]:
    """This rank's contiguous share of the token dimension (dim 0 of every input whose dim 0
    is symbolic); ranks get counts that differ by at most one."""
    from moec.distributed.bench import token_split

    if not inputs:
        return inputs
    tokens = {x.shape[0] for x, s in zip(inputs, signature.inputs, strict=False)
              if isinstance(s.shape[0], str)}
    if len(tokens) != 1:
        return inputs  # no (single) token dim: every rank runs the same inputs
    sizes = token_split(tokens.pop(), world)
    start = sum(sizes[:rank])
    return [x[start:start + sizes[rank]] if isinstance(s.shape[0], str) else x
            for x, s in zip(inputs, signature.inputs, strict=False)]


def describe_rank(model: Any) -> str:
    m = model.memory
    mib = 1 << 20
    e = model.experts
    return (f"rank {model.rank}/{model.world_size}: experts {e.start}..{e.stop - 1} "
            f"({len(e)}), weights {(m['shared_bytes'] + m['expert_bytes']) / mib:.1f} MiB "
            f"(shared {m['shared_bytes'] / mib:.1f} + experts {m['expert_bytes'] / mib:.1f} of "
            f"{m['all_expert_bytes'] / mib:.1f}; single-process {m['artifact_bytes'] / mib:.1f})")


def shutdown(owned: bool) -> None:
    """Tear down the process group `init_from_env` created, before the interpreter exits:
    gloo's worker threads left to exit-time destructors abort the process ("terminate called
    without an active exception", torch issue #190489)."""
    import torch.distributed as dist

    if owned and dist.is_initialized():
        dist.destroy_process_group()


def run_ep(a: Any, inputs: list[np.ndarray]) -> list[np.ndarray] | None:
    """`moec run --ep N`: every rank runs its share of the tokens; rank 0 returns all outputs
    (in token order), the other ranks None."""
    import torch.distributed as dist

    from moec.distributed.model import load_ep

    group, owned = init_from_env(a.ep, a.timeout, "run")
    try:
        model = load_ep(a.artifact, group, a.device, timeout=a.timeout)
        local = split_inputs(inputs, model.signature, model.rank, model.world_size)
        outs = model(*local)
        outs = list(outs) if isinstance(outs, tuple) else [outs]
        print(describe_rank(model) + f", {local[0].shape[0] if local else 0} tokens",
              file=sys.stderr, flush=True)
        gathered: list[Any] = [None] * model.world_size
        dist.all_gather_object(gathered, outs, group=group)
    finally:
        shutdown(owned)
    if model.rank != 0:
        return None
    full = [np.concatenate([g[i] for g in gathered]) for i in range(len(outs))]
    if a.check:
        from moec.runtime import load

        want = load(a.artifact)(*inputs)
        want = list(want) if isinstance(want, tuple) else [want]
        for i, (g, w) in enumerate(zip(full, want, strict=True)):
            scale = float(np.abs(w).max()) if w.size else 0.0
            err = float(np.abs(g - w).max()) / scale if scale else 0.0
            print(f"output {i}: max relative error vs single-process {err:.2e}"
                  f"{' (bitwise equal)' if np.array_equal(g, w) else ''}", file=sys.stderr)
    return full


def bench(a: Any) -> int:
    """`moec bench ART [--ep N]`: the breakdown table, and JSON with every rank's numbers."""
    from moec.distributed import bench as B
    from moec.runtime import _tvm

    _tvm.tvm()  # imported before the RSS readings, which must show the weights only
    what = None
    if a.ep is None:
        from moec.runtime import load

        rss0 = B.rss_bytes()
        model = load(a.artifact)
        rss1 = B.rss_bytes()
        mine = B.bench_single(model, a.tokens, a.warmup, a.repeat)
        results = [{**mine, "rss_before_load_bytes": rss0, "rss_after_load_bytes": rss1}]
        ep = 1
        if getattr(model, "geometry", None) is not None:
            what = ("a generation artifact: each call is the plain forward of one sequence of "
                    "T token ids (a prefill on a fresh KV cache); `moec generate` reports "
                    "decode tokens/s")
    else:
        import torch.distributed as dist

        from moec.distributed.model import load_ep

        group, owned = init_from_env(a.ep, a.timeout, "bench")
        try:
            rss0 = B.rss_bytes()
            model = load_ep(a.artifact, group, timeout=a.timeout)
            rss1 = B.rss_bytes()
            reference = None
            if a.check:  # loaded after the RSS reading, which must show the shard alone
                from moec.runtime import load

                reference = load(a.artifact)
            mine = B.bench_ep(model, a.tokens, a.warmup, a.repeat, reference)
            mine.update(threads=os.environ.get("TVM_NUM_THREADS"), rss_before_load_bytes=rss0,
                        rss_after_load_bytes=rss1)
            results = [None] * model.world_size
            dist.all_gather_object(results, mine, group=group)
        finally:
            shutdown(owned)
        ep = model.world_size
        if model.rank != 0:
            return 0
    report = {"artifact": str(Path(a.artifact).resolve()), "ep": ep, "tokens": list(a.tokens),
              "warmup": a.warmup, "repeat": a.repeat, "unit": "seconds (median per call)",
              "tokens_meaning": "global tokens, split evenly over the ranks",
              "ranks": results, **({"calls": what} if what else {})}
    print(f"moec bench {a.artifact}: ep={ep}, tokens {list(a.tokens)} (global, split over "
          f"ranks), median of {a.repeat} calls" + (f"\n({what})" if what else ""))
    print(B.format_table(results))
    mib = 1 << 20
    for r in results:
        held = (r["rss_after_load_bytes"] - r["rss_before_load_bytes"]) / mib
        line = f"rank {r['rank']}: RSS grew {held:.1f} MiB at load"
        if "memory" in r:
            m = r["memory"]
            line += (f"; weights held {(m['shared_bytes'] + m['expert_bytes']) / mib:.1f} MiB "
                     f"of the artifact's {m['artifact_bytes'] / mib:.1f} MiB")
        print(line + f"; peak RSS {r['peak_rss_bytes'] / mib:.1f} MiB")
    out = Path(a.json or f"{Path(a.artifact).stem}.ep{ep}.bench.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0
