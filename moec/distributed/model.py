"""`load_ep` and `EPModel`: one artifact run expert-parallel over a torch.distributed group.

Every rank holds the shared weights and its contiguous range of experts (moec.distributed.plan
`shard_bounds`), runs the shared parts of the model on its own tokens (`ep_seg_*` functions)
and, per MoE layer, sends each (token, choice) row to the rank owning the expert, computes the
rows it received with its experts (`ep_experts_*`, TVM kernels, one call per local expert) and
sends the results back for the weighted combine. See docs/expert-parallel.md.
"""

from __future__ import annotations

import hashlib
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moec.distributed.errors import DistributedError
from moec.distributed.exchange import Comm, Timer, expert_rows, route
from moec.distributed.plan import Plan, Region, parse_plan, shard_bounds
from moec.errors import ArtifactError, InputError, MoecError
from moec.runtime import _tvm
from moec.runtime.cpu import check_elf_machine
from moec.runtime.inputs import (
    ALIGNMENT,
    bind_inputs,
    check_inputs,
    check_ranges,
    is_torch_tensor,
    to_tvm,
)
from moec.runtime.kernels import open_kernels
from moec.runtime.manifest import Manifest, Signature
from moec.runtime.model import _NUMPY_DLPACK_DTYPES, _parse_device
from moec.runtime.verify import KERNELS, MANIFEST, WEIGHTS, check_target, verify


class EPModel:
    """A rank's part of an expert-parallel model; call it like a `CompiledModel`.

    `model(x)` takes THIS rank's tokens (any count, 0 included; ranks may differ) and returns
    this rank's outputs, equal to what the single-process model returns for the same inputs.
    Every rank of the group must make the same sequence of calls: a call is collective, even
    with no tokens. Outputs are torch tensors when the first input is one, numpy arrays
    otherwise. Set `model.timer = moec.distributed.Timer()` to collect per-layer timings.

    Construct it with `moec.load(path, ep_group=group)`."""

    def __init__(self, path: Path, manifest: Manifest, plan: Plan, vm: Any, device: Any,
                 comm: Comm, bounds: list[int], seg_weights: list[list[Any]],
                 expert_weights: list[list[list[Any]]], memory: dict[str, int]) -> None:
        self._path = path
        self._manifest = manifest
        self._plan = plan
        self._vm = vm
        self._device = device
        self._comm = comm
        self._bounds = bounds
        self._seg_weights = seg_weights
        self._expert_weights = expert_weights
        self._fns: dict[str, Callable[..., Any]] = {}
        self._tvm = _tvm.tvm()
        self.memory = memory
        self.timer: Timer | None = None
        self._layer_of_segment = self._attribute_segments()
        # One call at a time, as CompiledModel: a call is a sequence of collectives, and two
        # threads interleaving theirs would pair one call's exchange with another's.
        self._lock = threading.Lock()

    # ----------------------------------------------------------------- properties
    @property
    def signature(self) -> Signature:
        return self._manifest.signature

    @property
    def manifest(self) -> Manifest:
        return self._manifest

    @property
    def rank(self) -> int:
        return self._comm.rank

    @property
    def world_size(self) -> int:
        return self._comm.world

    @property
    def experts(self) -> range:
        """The experts this rank holds (the same range in every MoE layer)."""
        return range(self._bounds[self.rank], self._bounds[self.rank + 1])

    @property
    def layers(self) -> list[str]:
        """The MoE layers, by the source location of their block."""
        return [r.loc for r in self._plan.regions]

    def __repr__(self) -> str:
        e = self.experts
        return (f"EPModel({str(self._path)!r}, rank {self.rank}/{self.world_size}, experts "
                f"{e.start}..{e.stop - 1}, {self.signature})")

    # ----------------------------------------------------------------- running
    def __call__(self, *inputs: Any, **named: Any) -> Any:
        """Run this rank's tokens; threads calling one model are served one call at a time."""
        with self._lock:
            return self._call(*inputs, **named)

    def _call(self, *inputs: Any, **named: Any) -> Any:
        sig = self._manifest.signature
        inputs = bind_inputs(sig, inputs, named)
        check_inputs(sig, inputs)
        check_ranges(sig, inputs, self._manifest.meta.get("input_ranges"))
        args = [to_tvm(spec, x, self._tvm, self._device)
                for spec, x in zip(sig.inputs, inputs, strict=True)]
        env: dict[str, Any] = dict(zip(self._plan.inputs, args, strict=True))
        timer = self.timer
        t_start = time.perf_counter()
        for kind, i in self._plan.steps:
            if kind == "segment":
                t0 = time.perf_counter()
                seg = self._plan.segments[i]
                res = self._fn(seg.fn)(*[env[n] for n in seg.inputs], *self._seg_weights[i])
                env.update(zip(seg.outputs, res, strict=True))
                if timer is not None:
                    timer.layer(self._layer_of_segment[i]).rest += time.perf_counter() - t0
            else:
                self._run_region(i, env)
        if timer is not None:
            timer.total += time.perf_counter() - t_start
            timer.calls += 1
        as_torch = bool(inputs) and is_torch_tensor(inputs[0])
        shared = {a.data_ptr() for a in args}
        outs = tuple(self._wrap(env[n], shared, as_torch) for n in self._plan.outputs)
        return outs[0] if len(outs) == 1 else outs

    def _run_region(self, i: int, env: dict[str, Any]) -> None:
        reg = self._plan.regions[i]
        what = f"MoE layer {reg.loc!r}"
        t0 = time.perf_counter()
        x = torch.from_dlpack(env[reg.x])
        ids = torch.from_dlpack(env[reg.ids])
        tokens, k = ids.shape
        r = route(self._comm, ids, self._bounds, what)
        send = x.index_select(0, r.order // k)
        recv = self._comm.all_to_all(send, r.send_splits, r.recv_splits,
                                     f"{what}: dispatch all-to-all")
        t1 = time.perf_counter()
        out = self._run_experts(i, reg, recv, r.local_counts)
        t2 = time.perf_counter()
        back = self._comm.all_to_all(out, r.recv_splits, r.send_splits,
                                     f"{what}: combine all-to-all")
        slot_row = torch.empty(tokens * k, dtype=torch.int32)
        slot_row[r.order] = torch.arange(tokens * k, dtype=torch.int32)
        env[reg.y] = self._tvm_tensor(back)
        env[reg.slot_row] = self._tvm_tensor(slot_row.reshape(tokens, k))
        if self.timer is not None:
            lt = self.timer.layer(reg.loc)
            lt.dispatch += t1 - t0
            lt.experts += t2 - t1
            lt.combine += time.perf_counter() - t2
            lt.calls += 1
            lt.rows_sent += tokens * k
            lt.rows_received += int(recv.shape[0])

    def _run_experts(self, i: int, reg: Region, recv: torch.Tensor,
                     local_counts: torch.Tensor) -> torch.Tensor:
        """The received rows through this rank's experts (TVM kernels), in received order."""
        rows_total = recv.shape[0]
        out = torch.empty((rows_total, reg.out_features), dtype=recv.dtype)
        if rows_total == 0:
            return out
        x = self._tvm_tensor(recv)
        bm = reg.block_m
        fn = self._fn(reg.fn)
        for le, rows in enumerate(expert_rows(local_counts)):
            n = rows.numel()
            if n == 0:
                continue
            # The one-expert layout of moec.codegen.ep: n rows padded to whole tiles, plus one
            # tile more when n fills its tiles exactly, so the last row is always padding.
            tiles = n // bm + 1
            sorted_ids = torch.full((tiles * bm,), rows_total, dtype=torch.int32)
            sorted_ids[:n] = rows.to(torch.int32)
            tile_expert = torch.full((tiles,), -1, dtype=torch.int32)
            tile_expert[: -(-n // bm)] = 0
            y = fn(self._tvm_tensor(tile_expert), self._tvm_tensor(sorted_ids), x,
                   *self._expert_weights[i][le])
            out.index_copy_(0, rows, torch.from_dlpack(y)[:n])
        return out

    # ----------------------------------------------------------------- helpers
    def _fn(self, name: str) -> Callable[..., Any]:
        if name not in self._fns:
            self._fns[name] = self._vm[name]
        return self._fns[name]

    def _tvm_tensor(self, t: torch.Tensor) -> Any:
        if t.numel() == 0:
            return self._tvm.runtime.empty(tuple(t.shape), str(t.dtype).removeprefix("torch."),
                                           self._device)
        if not t.is_contiguous() or t.data_ptr() % ALIGNMENT:
            t = t.clone(memory_format=torch.contiguous_format)  # fresh: 64-byte aligned
        return self._tvm.runtime.from_dlpack(t)

    def _wrap(self, t: Any, shared: set[int], as_torch: bool) -> Any:
        # As CompiledModel: never hand out a view of an input (a graph may return one).
        copy = t.data_ptr() in shared and t.numel() > 0
        if as_torch:
            out = torch.from_dlpack(t)
            return out.clone() if copy else out
        if str(t.dtype) not in _NUMPY_DLPACK_DTYPES:
            return t.numpy()  # bfloat16 and the like: through ml_dtypes, a copy
        out = np.from_dlpack(t)
        return out.copy() if copy else out

    def _attribute_segments(self) -> dict[int, str]:
        """Each shared segment is timed as 'rest' of the MoE layer it precedes (the last one:
        of the last layer)."""
        out: dict[int, str] = {}
        pending: list[int] = []
        last = self._plan.regions[-1].loc
        for kind, i in self._plan.steps:
            if kind == "segment":
                pending.append(i)
            else:
                for s in pending:
                    out[s] = self._plan.regions[i].loc
                pending = []
        for s in pending:
            out[s] = last
        return out


# --------------------------------------------------------------------- loading
def _agree(comm: Comm, step: str, fn: Callable[[], Any],
           share: Callable[[Any], Any] | None = None
           ) -> tuple[Any, list[Any]]:
    """Run `fn` on every rank; if it failed on any, raise the same DistributedError on all of
    them (so no rank goes on to a collective its peers never reach). Returns this rank's result
    and, by rank, every rank's `share(result)` (small, picklable)."""
    import torch.distributed as dist

    result = None
    try:
        result = fn()
        mine: tuple[str | None, Any] = (None, share(result) if share else None)
    except (MoecError, OSError) as e:
        mine = (f"{type(e).__name__}: {e}", None)
    everyone: list[Any] = [None] * comm.world
    t0 = time.perf_counter()
    try:
        dist.all_gather_object(everyone, mine, group=comm.group)
    except Exception as e:
        raise comm.failure(f"load: {step}", e, t0) from None
    bad = [(r, err) for r, (err, _) in enumerate(everyone) if err is not None]
    if bad:
        lines = "; ".join(f"rank {r}: {err}" for r, err in bad)
        raise DistributedError(f"loading the expert-parallel model failed at {step} on "
                               f"{len(bad)} of {comm.world} ranks: {lines}")
    return result, [shared for _, shared in everyone]


def _manifest_digest(root: Path) -> str:
    path = root / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"no artifact at {root}: {MANIFEST} is missing")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_backend(comm: Comm, kind: str) -> None:
    # A group may combine backends per device ("cpu:gloo,cuda:nccl").
    if kind == "cpu" and "gloo" not in comm.backend and "mpi" not in comm.backend:
        raise InputError(f"the artifact runs on the CPU, but the process group's backend is "
                         f"{comm.backend!r}, which moves GPU tensors; use a gloo group")
    if kind == "cuda" and "nccl" not in comm.backend:
        raise InputError(f"a CUDA artifact needs an NCCL process group, not {comm.backend!r}")


def load_ep(path: str | Path, group: Any, device: Any = "cpu", *, check_hashes: bool = True,
            timeout: float | None = None) -> EPModel:
    """Load this rank's shard of an artifact compiled with `ep=True`; collective over `group`.

    Steps, each agreed on by all ranks (a failure on one rank raises DistributedError on all):
    every rank present (gloo: monitored barrier naming the missing ranks); the same artifact
    everywhere (sha256 of manifest.json, which holds every file's hash); the artifact verified
    (hashes, target, CPU features) and its EP plan read; the weights read: the shared ones in
    full, the experts `shard_bounds(E, world)[rank:rank+2]` as safetensors slices, so the
    others are never read. The load's own collectives use the process group's timeout (ranks
    may start at different times); `timeout` (seconds) bounds every collective wait of the
    model's calls, None: the group's timeout too."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise DistributedError("torch.distributed is not initialised: call "
                               "torch.distributed.init_process_group() first, or launch with "
                               "`torchrun --nproc-per-node N moec run ART --ep N`")
    root = Path(path)
    kind, index = _parse_device(device)
    comm = Comm(group, timeout)
    _check_backend(comm, kind)
    comm.barrier("load: waiting for every rank to reach load")

    _, digests = _agree(comm, "reading the manifest",
                        lambda: (_manifest_digest(root), str(root)), share=lambda d: d)
    if len({d for d, _ in digests}) > 1:
        lines = "; ".join(f"rank {r}: {d[:12]} ({p})" for r, (d, p) in enumerate(digests))
        raise DistributedError(f"the ranks loaded different artifacts (sha256 of {MANIFEST}: "
                               f"{lines}); every rank must load the same compiled artifact")

    def open_artifact() -> tuple[Manifest, Plan]:
        manifest = verify(root, check_host=False, check_hashes=check_hashes)
        check_target(manifest, kind)
        check_elf_machine(root / KERNELS)
        return manifest, parse_plan(manifest.meta, str(root))

    (manifest, plan), _ = _agree(comm, "verifying the artifact", open_artifact)
    tvm = _tvm.tvm()
    if manifest.tvm_version != tvm.__version__:
        warnings.warn(f"{root} was built with TVM {manifest.tvm_version} but TVM "
                      f"{tvm.__version__} is running; if loading fails, recompile the model",
                      RuntimeWarning, stacklevel=2)
    dev = tvm.cpu(index) if kind == "cpu" else tvm.cuda(index)
    experts = {r.num_experts for r in plan.regions}
    if len(experts) != 1:
        raise ArtifactError(f"{root}: MoE layers with different expert counts ({sorted(experts)}) "
                            f"are not supported by expert parallelism yet")
    bounds = shard_bounds(experts.pop(), comm.world)
    lo, hi = bounds[comm.rank], bounds[comm.rank + 1]

    def open_vm_and_weights() -> tuple[Any, list[list[Any]], list[list[list[Any]]], dict]:
        lib = open_kernels(root / KERNELS, manifest.files[KERNELS], check_hash=check_hashes)
        try:
            vm = tvm.runtime.vm.VirtualMachine(lib, dev)
            for name in {s.fn for s in plan.segments} | {r.fn for r in plan.regions}:
                vm[name]
        except Exception as e:
            raise ArtifactError(f"{KERNELS} in {root} could not be loaded: {e}") from None
        seg_w, exp_w, memory = _load_weights(root / WEIGHTS, plan, lo, hi, dev)
        return vm, seg_w, exp_w, memory

    (vm, seg_w, exp_w, memory), _ = _agree(comm, "loading kernels and weights",
                                           open_vm_and_weights)
    return EPModel(root, manifest, plan, vm, dev, comm, bounds, seg_w, exp_w, memory)


def _load_weights(path: Path, plan: Plan, lo: int, hi: int, dev: Any
                  ) -> tuple[list[list[Any]], list[list[list[Any]]], dict[str, int]]:
    """Shared weights in full, experts [lo, hi) one tensor per expert and weight: views of the
    memory-mapped file where aligned (moec/runtime/weights.py), so ranks on one host share the
    page cache's copy and a rank touches only its experts' pages."""
    from moec.runtime.weights import mapped_arrays, to_tvm

    arrays = mapped_arrays(path)
    needed = {w for seg in plan.segments for w in seg.weights} | {
        w for r in plan.regions for w in r.flat_weights}
    missing = sorted(needed - set(arrays))
    if missing:
        raise ArtifactError(f"{path.name} has no weight {missing[0]!r} (and {len(missing) - 1} "
                            f"more) that the EP plan needs: the artifact is damaged")
    shared: dict[str, Any] = {}
    memory = {"shared_bytes": 0, "expert_bytes": 0, "all_expert_bytes": 0, "artifact_bytes": 0}
    expert_names = {w for r in plan.regions for w in r.flat_weights}
    for name, arr in arrays.items():
        memory["artifact_bytes"] += arr.nbytes
        if name in expert_names:
            memory["all_expert_bytes"] += arr.nbytes
    for seg in plan.segments:
        for name in seg.weights:
            if name not in shared:
                memory["shared_bytes"] += arrays[name].nbytes
                shared[name] = to_tvm(arrays[name], dev)
    experts: list[list[list[Any]]] = []
    for reg in plan.regions:
        per_expert = []
        for e in range(lo, hi):
            ws = []
            for name in reg.flat_weights:
                arr = arrays[name][e:e + 1]
                memory["expert_bytes"] += arr.nbytes
                ws.append(to_tvm(arr, dev))
            per_expert.append(ws)
        experts.append(per_expert)
    seg_w = [[shared[n] for n in seg.weights] for seg in plan.segments]
    return seg_w, experts, memory
