"""What the ranks of the expert-parallel tests run, in processes of their own (spawned).

`run_ranks(world, fn, *args)` starts `world` processes that join one gloo group through a file
store, run `fn(rank, world, *args)` and report its return value or its exception; a rank that
neither reports nor exits in time is killed and reported as hung (a test must never hang).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import tempfile
import time
import traceback
from typing import Any

TIMEOUT_S = 4.0  # collective timeout inside the tests: far above what a tiny exchange needs
_OUT: Any = None  # this rank's result queue


def report_and_exit(rank: int, value: Any, code: int) -> None:
    """Report `value` as this rank's result, then die at once (a crashed rank)."""
    _OUT.put((rank, "ok", value))
    _OUT.close()
    _OUT.join_thread()
    os._exit(code)


def _entry(fn: Any, rank: int, world: int, store: str, args: tuple, out: Any) -> None:
    global _OUT
    _OUT = out
    os.environ["TVM_NUM_THREADS"] = "1"
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        from datetime import timedelta

        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=30))
        out.put((rank, "ok", fn(rank, world, *args)))
    except BaseException as e:  # reported to the test, which asserts on it
        out.put((rank, "error", (type(e).__name__, str(e), traceback.format_exc())))
    finally:  # gloo's threads left to exit-time destructors abort the process (torch #190489)
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(world: int, fn: Any, *args: Any, limit: float = 150.0) -> dict[int, dict]:
    """{rank: {"status": "ok" | "error" | "hung" | "silent", "value": result or (type name,
    message, traceback), "exitcode": int | None}}."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    results: dict[int, dict] = {}
    with tempfile.TemporaryDirectory(prefix="moec-ep-") as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_entry, args=(fn, r, world, store, args, out), daemon=True)
                 for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + limit
        while len(results) < world and time.monotonic() < deadline:
            try:
                rank, status, value = out.get(timeout=0.5)
                results[rank] = {"status": status, "value": value}
            except queue.Empty:
                if all(not p.is_alive() for p in procs) and out.empty():
                    break
        for r, p in enumerate(procs):
            p.join(timeout=max(1.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()  # only processes this helper started
                p.join()
                results.setdefault(r, {"status": "hung", "value": None})
            results.setdefault(r, {"status": "silent", "value": None})
            results[r]["exitcode"] = p.exitcode
    return results


# ------------------------------------------------------------------------ the rank program
def rel_err(got: Any, want: Any) -> float:
    import numpy as np

    scale = float(np.abs(want).max()) if want.size else 0.0
    return float(np.abs(got - want).max()) / scale if scale else 0.0


def scenario(rank: int, world: int, cases: list[tuple[str, str, list[list[int]], int]],
             extra: dict[str, Any]) -> dict[str, Any]:
    """One process group runs, in order: the equality cases, then what `extra` asks for:
    `mismatch` (rank r loads artifact r), `bench` (the `moec bench --ep` code path, JSON to a
    path), and last `fail` = (mode, artifact, folder): the last rank dies or hangs, the others
    must get a DistributedError."""
    import torch.distributed as dist

    import moec

    out: dict[str, Any] = {"equality": equality(rank, cases)}
    if "mismatch" in extra:
        paths = extra["mismatch"]
        try:
            moec.load(paths[rank % len(paths)], ep_group=dist.group.WORLD)
            out["mismatch"] = None
        except Exception as e:
            out["mismatch"] = (type(e).__name__, str(e))
    if "bench" in extra:
        out["bench"] = bench(rank, world, *extra["bench"])
    if "threads" in extra:
        out["threads"] = threaded(rank, *extra["threads"])
    if "fail" in extra:
        out["fail"] = dead_peer(rank, world, out, *extra["fail"])
    return out


def equality(rank: int, cases: list[tuple[str, str, list[list[int]], int]]) -> list[dict]:
    """For each (name, artifact, token counts per call per rank, vocab or 0 for float inputs
    [T, hidden]): run the EP model and the
    single-process model on this rank's tokens; report errors and rows sent / received."""
    import numpy as np
    import torch
    import torch.distributed as dist

    import moec
    from moec.distributed import Timer

    report = []
    for name, path, calls, vocab in cases:
        ep = moec.load(path, ep_group=dist.group.WORLD)
        ref = moec.load(path)
        spec = ep.signature.inputs[0]
        for c, counts in enumerate(calls):
            n = counts[rank % len(counts)]
            rng = np.random.default_rng(1000 * c + rank)
            if vocab:  # token ids of a whole causal LM
                x = rng.integers(0, vocab, n).astype(np.int64)
            else:
                x = rng.standard_normal((n, spec.shape[1])).astype(np.float32)
            ep.timer = Timer()
            as_torch = c % 2 == 1  # torch in -> torch out, on every other call
            got = ep(torch.from_numpy(x)) if as_torch else ep(x)
            if as_torch:
                assert isinstance(got, torch.Tensor)
                got = got.numpy()
            want = ref(x)
            report.append({
                "case": name, "call": c, "tokens": n, "experts": list(ep.experts),
                "shape_ok": got.shape == want.shape, "err": rel_err(got, want) if n else 0.0,
                "bitwise": bool(np.array_equal(got, want)),
                "rows_received": [lt.rows_received for lt in ep.timer.layers.values()],
                "rows_sent": [lt.rows_sent for lt in ep.timer.layers.values()],
            })
    return report


def threaded(rank: int, path: str, n_threads: int) -> dict[str, Any]:
    """`n_threads` threads call one EP model at once, each with its own tokens: every call must
    return what the single-process model returns for them (EPModel serialises its calls)."""
    import threading

    import numpy as np
    import torch.distributed as dist

    import moec

    ep = moec.load(path, ep_group=dist.group.WORLD)
    ref = moec.load(path)
    errs: list[float | None] = [None] * n_threads
    errors: list[str] = []

    def run(i: int) -> None:
        x = np.random.default_rng(100 * rank + i).standard_normal(
            (3 + 5 * i, ep.signature.inputs[0].shape[1])).astype(np.float32)
        try:
            errs[i] = rel_err(ep(x), ref(x))
        except Exception as e:  # reported to the test
            errors.append(f"thread {i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"errs": errs, "errors": errors}


def bench(rank: int, world: int, path: str, json_path: str) -> bool:
    """`moec bench ART --ep N --tokens 16 --check` as torchrun would run it."""
    import argparse

    from moec.distributed.launch import bench as run_bench

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    a = argparse.Namespace(artifact=path, ep=world, tokens=[16, 5], warmup=0, repeat=2,
                           json=json_path, check=True, timeout=30.0)
    return run_bench(a) == 0


def dead_peer(rank: int, world: int, partial: dict, mode: str, path: str, folder: str) -> dict:
    """The last rank dies (`mode="die"`) or stops calling the model (`mode="hang"`, until the
    others are done); the others call the model and must fail with a DistributedError."""
    import numpy as np
    import torch.distributed as dist

    from moec.distributed import load_ep

    model = load_ep(path, dist.group.WORLD, timeout=TIMEOUT_S)
    dist.barrier()
    if rank == world - 1:
        if mode == "die":
            time.sleep(0.3)  # let the others leave the barrier first
            report_and_exit(rank, {**partial, "fail": {"died": True}}, 3)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(
                os.path.exists(os.path.join(folder, f"done{r}")) for r in range(world - 1)):
            time.sleep(0.1)
        return {"hung": True}
    x = np.ones((4, model.signature.inputs[0].shape[1]), dtype=np.float32)
    t0 = time.perf_counter()
    try:
        model(x)
        res: dict[str, Any] = {"error": None}
    except Exception as e:
        res = {"error": type(e).__name__, "message": str(e)}
    res["seconds"] = time.perf_counter() - t0
    open(os.path.join(folder, f"done{rank}"), "w").close()
    return res
