"""Token exchange of one MoE layer over torch.distributed: counts, dispatch and return.

Every collective here is torch.distributed's (gloo on CPUs, NCCL on GPUs); moec only computes
who sends how many rows where. Each call waits with the model's timeout (Work.wait), so a peer
that died or stopped calling the model turns into a DistributedError naming the layer and the
step, never a hang.

Layout of one layer on rank r with T tokens and top-k routing (slot s = t*k + j):
1. `order` = the T*k slots sorted by expert id (stable). Experts are sharded in contiguous
   ranges, so this also groups the slots by destination rank, and by expert within a rank.
2. counts: all ranks all-gather their per-expert slot counts ([world, E] on every rank): each
   rank derives its send and receive splits, and where each expert's rows are in what it gets.
3. dispatch all-to-all: rank r sends `x[order // k]` (one row per slot).
4. the receiver runs its experts on the rows (moec.distributed.model, TVM kernels).
5. return all-to-all: every row goes back to its sender, in the order it was sent, so the sender
   finds slot `order[p]`'s result at row p: `slot_row[order[p]] = p` feeds the combine kernel.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from moec.distributed.errors import DistributedError


@dataclass
class Route:
    """What one rank knows about a layer's exchange after the counts were shared."""

    order: torch.Tensor  # int64 [T*k]: slots sorted by expert
    send_splits: list[int]  # rows to each rank
    recv_splits: list[int]  # rows from each rank
    local_counts: torch.Tensor  # int64 [world, local experts]: rows from rank s for expert e


@dataclass
class LayerTimes:
    """Seconds spent in one MoE layer's steps (accumulated over calls)."""

    dispatch: float = 0.0  # count exchange + packing rows + the dispatch all-to-all
    experts: float = 0.0  # expert GEMMs (TVM) on received rows, incl. their row bookkeeping
    combine: float = 0.0  # the return all-to-all + slot_row
    rest: float = 0.0  # the shared parts (ep_seg_*): dense layers, norms, router, combine kernel
    calls: int = 0
    rows_sent: int = 0  # (token, choice) rows this rank dispatched
    rows_received: int = 0  # rows its experts computed for the group

    def as_dict(self) -> dict[str, float]:
        return {"dispatch_a2a": self.dispatch, "expert_compute": self.experts,
                "combine_a2a": self.combine, "rest": self.rest, "calls": self.calls,
                "rows_sent": self.rows_sent, "rows_received": self.rows_received}


@dataclass
class Timer:
    """Per-layer accumulators; `EPModel.timer = Timer()` turns timing on."""

    layers: dict[str, LayerTimes] = field(default_factory=dict)
    total: float = 0.0  # whole calls
    calls: int = 0

    def layer(self, name: str) -> LayerTimes:
        return self.layers.setdefault(name, LayerTimes())


class Comm:
    """The collectives expert parallelism uses, on one process group, with a timeout each."""

    def __init__(self, group: Any, timeout: float | None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))
        self.timeout = timeout

    def describe_timeout(self) -> str:
        if self.timeout is None:
            return "the process group's timeout"
        return f"the {self.timeout:g} s timeout"

    def _wait(self, work: Any, what: str, t0: float) -> None:
        try:
            if self.timeout is None:
                work.wait()
            else:
                work.wait(timeout=timedelta(seconds=self.timeout))
        except Exception as e:  # gloo and NCCL raise RuntimeError or DistBackendError subclasses
            raise self.failure(what, e, t0) from None

    def failure(self, what: str, e: BaseException, t0: float) -> DistributedError:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        loading = what.startswith("load")
        limit = "the process group's timeout" if loading else self.describe_timeout()
        return DistributedError(
            f"rank {self.rank}/{self.world}: {what} failed after {time.perf_counter() - t0:.1f} s "
            f"({first}). Another rank probably died or stopped calling the model: every rank "
            f"must call it the same number of times, even with 0 tokens. Waited at most "
            f"{limit}.")

    def all_gather(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """`[world, *t.shape]`, rank s's tensor at row s."""
        t0 = time.perf_counter()
        out = [torch.empty_like(t) for _ in range(self.world)]
        try:
            work = dist.all_gather(out, t, group=self.group, async_op=True)
        except Exception as e:
            raise self.failure(what, e, t0) from None
        self._wait(work, what, t0)
        return torch.stack(out)

    def all_to_all(self, send: torch.Tensor, send_splits: list[int], recv_splits: list[int],
                   what: str) -> torch.Tensor:
        t0 = time.perf_counter()
        recv = torch.empty((sum(recv_splits), *send.shape[1:]), dtype=send.dtype,
                           device=send.device)
        try:
            work = dist.all_to_all_single(recv, send, recv_splits, send_splits,
                                          group=self.group, async_op=True)
        except Exception as e:
            raise self.failure(what, e, t0) from None
        self._wait(work, what, t0)
        return recv

    def barrier(self, what: str, timeout: float | None = None) -> None:
        """A barrier that names the missing ranks (gloo's monitored_barrier) where possible;
        `timeout` None: the process group's."""
        t0 = time.perf_counter()
        timeout = None if timeout is None else timedelta(seconds=timeout)
        try:
            if self.backend == "gloo":
                dist.monitored_barrier(self.group, timeout=timeout, wait_all_ranks=True)
            else:
                dist.barrier(self.group)
        except DistributedError:
            raise
        except Exception as e:
            raise self.failure(what, e, t0) from None


def route(comm: Comm, ids: torch.Tensor, bounds: list[int], what: str) -> Route:
    """Sort this rank's slots by expert and share the per-expert counts (one all-gather)."""
    num_experts = bounds[-1]
    flat = ids.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= num_experts):
        raise DistributedError(f"rank {comm.rank}: {what}: router produced expert ids outside "
                               f"[0, {num_experts})")
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    everyone = comm.all_gather(counts, f"{what}: count exchange")  # [world, E]
    me = comm.rank
    send = [int(counts[bounds[d]:bounds[d + 1]].sum()) for d in range(comm.world)]
    local = everyone[:, bounds[me]:bounds[me + 1]]
    recv = [int(v) for v in local.sum(dim=1)]
    return Route(order, send, recv, local)


def expert_rows(local_counts: torch.Tensor) -> list[torch.Tensor]:
    """For each local expert, the rows of the receive buffer it must compute (increasing).

    The buffer holds one block per source rank, each sorted by expert; a stable sort of the
    rows' local expert ids lists every expert's rows, source by source."""
    n_local = local_counts.shape[1]
    if n_local == 0:
        return []
    row_expert = torch.repeat_interleave(torch.arange(n_local).repeat(local_counts.shape[0]),
                                         local_counts.reshape(-1))
    rows = torch.argsort(row_expert, stable=True)
    per_expert = local_counts.sum(dim=0).tolist()
    return list(torch.split(rows, per_expert))
