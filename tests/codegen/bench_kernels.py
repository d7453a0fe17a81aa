"""GFLOP/s of the linear and grouped-GEMM kernels against torch (not a test; run by hand).

    TVM_NUM_THREADS=2 python tests/codegen/bench_kernels.py [--rounds 5]

linear: M=512, K=1024, N=4096 against torch.nn.functional.linear. grouped_matmul: a Mixtral-like
expert FFN (E=8, H=1024, I=3584, top-2, uniform routing, block_m=16) at T=1, 64, 512; the up
projection is the fused gate+up kernel (silu_mul, gather), the down projection the plain one;
torch runs a per-expert loop of F.linear over the same routing (gather included). TVM and torch
alternate within each round so machine noise hits both alike; the table shows the best and the
median round of wall-clock GFLOP/s, and "cpu": FLOPs per process CPU-second times the thread
count, which other jobs on a shared machine disturb much less (spinning worker threads count as
busy, so it can only under-state). FLOPs count useful work only (no padding rows).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
import tvm

from moec.codegen.kernels import grouped_matmul, linear
from moec.codegen.target import host_target

THREADS = int(os.environ.get("TVM_NUM_THREADS", "2"))


def _time(fn, min_time: float = 0.2) -> tuple[float, float]:
    """(wall seconds, process CPU seconds / THREADS) per call."""
    fn()
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t0
        if dt > min_time:
            return dt / n, (time.process_time() - c0) / THREADS / n


def _align(ids: np.ndarray, e: int, bm: int) -> tuple[np.ndarray, np.ndarray]:
    flat = ids.reshape(-1)
    tl = flat.size // bm + e
    sorted_ids, tile_expert = np.full(tl * bm, flat.size, np.int32), np.full(tl, -1, np.int32)
    row = tile = 0
    for ex in range(e):
        slots = np.nonzero(flat == ex)[0]
        sorted_ids[row:row + len(slots)] = slots
        nt = -(-len(slots) // bm)
        tile_expert[tile:tile + nt] = ex
        row, tile = row + nt * bm, tile + nt
    return sorted_ids, tile_expert


def _tensor(a: np.ndarray) -> tvm.runtime.Tensor:
    return tvm.runtime.tensor(np.ascontiguousarray(a))


def bench_linear(rounds: int) -> None:
    m, k, n = 512, 1024, 4096
    kern = linear("M", k, n)
    ex = tvm.compile(tvm.IRModule({kern.name: kern.func}), target=host_target())
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((m, k), np.float32), rng.standard_normal((n, k), np.float32)
    args = [_tensor(x), _tensor(kern.arg_transforms[1](w)), tvm.runtime.empty((m, n))]
    f = ex[kern.name]
    xt, wt = torch.from_numpy(x), torch.from_numpy(w)
    ours, theirs = [], []
    for _ in range(rounds):
        ours.append(_time(lambda: f(*args)))
        theirs.append(_time(lambda: F.linear(xt, wt)))
    _report(f"linear M={m} K={k} N={n}", 2 * m * k * n, ours, theirs)


def bench_moe(rounds: int) -> None:
    e, h, inter, top_k, bm = 8, 1024, 3584, 2, 16
    rng = np.random.default_rng(0)
    wg, wu = (rng.standard_normal((2, e, inter, h), np.float32) * 0.03)
    wd = rng.standard_normal((e, h, inter), np.float32) * 0.02
    up = grouped_matmul(e, inter, h, bm, top_k, True, "silu_mul")
    down = grouped_matmul(e, h, inter, bm, top_k, False, "none")
    ex = tvm.compile(tvm.IRModule({up.name: up.func, down.name: down.func}),
                     target=host_target())
    wg_p, wu_p = _tensor(up.arg_transforms[1](wg)), _tensor(up.arg_transforms[2](wu))
    wd_p = _tensor(down.arg_transforms[1](wd))
    twg, twu, twd = (torch.from_numpy(a) for a in (wg, wu, wd))
    for t in (1, 64, 512):
        ids = np.argsort(rng.random((t, e)), axis=1)[:, :top_k].astype(np.int32)
        sorted_ids, tile_expert = _align(ids, e, bm)
        s = len(sorted_ids)
        x = rng.standard_normal((t, h), np.float32)
        hid = tvm.runtime.empty((s, inter))
        out = tvm.runtime.empty((s, h))
        si, te = _tensor(sorted_ids), _tensor(tile_expert)
        up_args = [_tensor(x), wg_p, wu_p, si, te, hid]
        down_args = [hid, wd_p, si, te, out]
        xt = torch.from_numpy(x)
        tok = [torch.from_numpy(np.nonzero(ids == ex_)[0]) for ex_ in range(e)]
        hts = [torch.randn(len(tk), inter) for tk in tok]

        def torch_up(xt=xt, tok=tok):
            for ex_, tk in enumerate(tok):
                if len(tk):
                    xe = xt[tk]
                    F.silu(F.linear(xe, twg[ex_])) * F.linear(xe, twu[ex_])

        def torch_down(hts=hts):
            for ex_, he in enumerate(hts):
                if len(he):
                    F.linear(he, twd[ex_])

        fu, fd = ex[up.name], ex[down.name]
        res = {"up": ([], []), "down": ([], [])}
        for _ in range(rounds):
            res["up"][0].append(_time(lambda a=up_args, f=fu: f(*a)))
            res["up"][1].append(_time(torch_up))
            res["down"][0].append(_time(lambda a=down_args, f=fd: f(*a)))
            res["down"][1].append(_time(torch_down))
        useful = 2 * t * top_k * inter * h
        _report(f"moe gate+up (silu_mul) T={t}", 2 * useful, *res["up"])
        _report(f"moe down T={t}", useful, *res["down"])


def _report(label: str, flops: float, ours: list, theirs: list) -> None:
    def gf(ts: list[tuple[float, float]]) -> str:
        wall = [w for w, _ in ts]
        cpu = min(c for _, c in ts)
        return (f"{flops / min(wall) / 1e9:6.1f} best {flops / statistics.median(wall) / 1e9:6.1f}"
                f" med {flops / cpu / 1e9:6.1f} cpu")

    print(f"{label:30s} tvm {gf(ours)} | torch {gf(theirs)}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    print(f"target {host_target()} | TVM_NUM_THREADS={THREADS} torch threads={THREADS} | "
          f"load average {os.getloadavg()[0]:.2f}")
    bench_linear(args.rounds)
    bench_moe(args.rounds)


if __name__ == "__main__":
    main()
