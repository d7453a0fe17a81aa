"""Expert offload: run a generation artifact whose routed experts do not all fit in memory.

    model = moec.load("m.moec", expert_budget="3GB")   # everything else stays resident

How. The expert weights stay in the artifact's weights file; the kernels see them as views of a
private (copy-on-write) mapping of it that nothing reads until an expert is *loaded*: its bytes
are read with pread into its place in the mapping (the pages become the process's own) and the
file's page-cache copy is dropped (posix_fadvise DONTNEED), so the memory the experts take is
what the cache says it is, not hidden in the page cache. *Evicting* an expert discards its pages
(madvise DONTNEED). The kernels are exactly the fully resident ones, reading the same bytes at
the same addresses, so the outputs are bitwise equal whatever the budget. On a GPU the same
holds with device memory mapped under resident experts (moec.runtime.expert_store.DeviceStore:
the stores are where experts live, this module decides which).

When. The generation step's offload entry points (`main_offload`, `decode_offload`) call back
into `ExpertCache.fetch(layer, ids, x)` between each MoE layer's routing and its expert GEMMs
(moe.expert_fetch, inserted by the offload-experts pass): the experts the layer's tokens chose
are loaded if missing (a miss waits for its read), pinned while the layer runs, and the policy
(moec.runtime.cache_policy: `adaptive`, the default, an estimate of the farthest next use that
knows the layers' cycle and learns how recency and popularity predict reuse; or LRU; or LFU
with exponential aging) picks what to evict to stay under the budget.

Prefetch by pre-gating (Pre-gated MoE, MoE-Infinity): at layer L's fetch, layer L+1's router is
applied to layer L's input and the experts it predicts are read on a background thread while
layer L computes; experts the previous tokens used stay cached by the policy. Under `adaptive`
a prediction is read only into free room or in place of experts whose expected next use is
farther than the prediction's (its distance at the prefetch accuracy measured so far), so a
wrong guess cannot evict an expert more likely to be needed; under LRU and LFU it may evict
any unpinned expert. Prefetch gates itself: while fewer than half of the experts it read were
used before their eviction (`prefetch_precision`), it reads the predictions of one layer call
in 8 only, since a wasted read costs CPU that the kernels need; and its thread runs at the
lowest priority (nice 19), reading with CPU time the kernels leave. Stats: hits,
misses, prefetch accuracy (predicted experts that the next layer used), bytes read, the time
the model waited for reads and the time spent reading (their difference is the overlap).

Trace: with `trace=True` (off by default) the cache keeps `trace`, one `(layer, expert ids)` per
layer fetch in the order the model made them; `belady_hit_rate()` replays it under the same
budget with the offline optimum (moec.runtime.cache_replay), the ceiling for a demand cache.

The budget must hold, for every layer, the experts one step can route to (at least top-k: one
token); `max_step_tokens()` tells the engine how many tokens a step may carry so that it does.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moec.errors import ArtifactError, ExecutionError, InputError
from moec.runtime.cache_policy import POLICIES, Adaptive, make
from moec.runtime.expert_store import MappedFileStore

ROUTERS = "routers.safetensors"  # the artifact's raw routers (moec.codegen.offload)
# Prefetch pays only if most of what it reads is used: on a machine with few cores a read costs
# CPU (the copy out of the page cache) whether the model waits for it or not, so a wasted read
# slows the kernels. Below this precision the prefetcher reads the predictions of one layer
# call in PREFETCH_PROBE_EVERY only (to keep measuring), and none of the others.
PREFETCH_MIN_PRECISION = 0.5
PREFETCH_PRIOR = (1.0, 2.0)  # prediction accuracy before any is measured: 1 used of 2
PREFETCH_PROBE_EVERY = 8
PREFETCH_NICE = 19  # the prefetch thread's nice value (Linux: per thread)
READERS = 2  # threads reading one fetch's missing experts (a disk serves a few reads at once)


@dataclass
class _Expert:
    layer: int
    index: int
    ranges: list[tuple[int, int]]  # (file offset, bytes) of each of its weight slices
    nbytes: int
    charge: int = 0  # bytes it counts against the budget (its store's granules)
    state: str = "out"  # out | loading | in
    pinned: bool = False
    prefetched: bool = False  # loaded by the prefetcher, not used yet


@dataclass
class LayerStats:
    hits: int = 0
    misses: int = 0
    prefetch_hits: int = 0  # needed experts that the prefetcher had brought in
    predicted: int = 0
    predicted_used: int = 0
    bytes_read: int = 0
    loads: int = 0
    tokens: int = 0


@dataclass
class CacheStats:
    layers: dict[int, LayerStats] = field(default_factory=dict)
    wait_s: float = 0.0  # the model blocked on reads of experts it needed
    read_s: float = 0.0  # time spent reading experts (foreground and background)
    fetch_s: float = 0.0  # all of the model's time in the cache's hook
    evictions: int = 0
    prefetch_reads: int = 0  # reads the prefetcher made ...
    prefetch_useful: int = 0  # ... of experts a layer then needed (loaded or still loading)
    prefetch_wasted: int = 0  # ... of experts evicted before any layer needed them
    prefetch_skipped: int = 0  # layer calls whose predictions were not read (precision gate)

    def prefetch_precision(self) -> float:
        """The share of the prefetcher's finished reads that were used, with a prior of one
        used and one wasted (0.5 before any is known)."""
        return (self.prefetch_useful + 1) / (self.prefetch_useful + self.prefetch_wasted + 2)

    def summary(self) -> dict[str, Any]:
        tot = LayerStats()
        for s in self.layers.values():
            for f in tot.__dataclass_fields__:
                setattr(tot, f, getattr(tot, f) + getattr(s, f))
        need = tot.hits + tot.misses
        return {
            "hit_rate": tot.hits / need if need else None,
            "prefetch_accuracy": tot.predicted_used / tot.predicted if tot.predicted else None,
            "prefetch_reads": self.prefetch_reads,
            "prefetch_precision": self.prefetch_useful / (self.prefetch_useful +
                                                          self.prefetch_wasted)
            if self.prefetch_useful + self.prefetch_wasted else None,
            "prefetch_skipped": self.prefetch_skipped,
            "bytes_read": tot.bytes_read, "loads": tot.loads, "evictions": self.evictions,
            "wait_s": self.wait_s, "read_s": self.read_s, "fetch_s": self.fetch_s,
            # the share of read time the model did not wait for (reads behind compute)
            "overlap": max(0.0, 1 - self.wait_s / self.read_s) if self.read_s else None,
            "per_layer": {layer: {"hit_rate": s.hits / (s.hits + s.misses)
                                  if s.hits + s.misses else None,
                                  "prefetch_accuracy": s.predicted_used / s.predicted
                                  if s.predicted else None,
                                  "bytes_read": s.bytes_read,
                                  "bytes_per_token": s.bytes_read / s.tokens if s.tokens
                                  else None}
                          for layer, s in sorted(self.layers.items())},
        }


class ExpertCache:
    """The routed experts of one loaded generation artifact under a memory budget (module
    doc). `views[name]` are the expert weights as views of the private mapping: hand them to
    the kernels in place of the weights."""

    def __init__(self, weights_path: Path, header: dict[str, Any], data_start: int,
                 offload: dict[str, Any], budget: int, *, policy: str = "adaptive",
                 prefetch: bool = False, routers: dict[str, np.ndarray] | None = None,
                 trace: bool = False, store: Any = None) -> None:
        self.path = Path(weights_path)
        self.spans: dict[str, tuple[int, int]] = {}  # expert weight -> file bytes [lo, hi)
        self.policy, self.budget = policy, int(budget)
        self.layers: dict[int, dict[str, Any]] = {int(e["layer"]): e for e in offload["layers"]}
        self.experts: dict[tuple[int, int], _Expert] = {}
        self.expert_params: set[str] = set()
        for layer, info in self.layers.items():
            e_n = int(info["num_experts"])
            slices = []
            for name in info["params"]:
                entry = header.get(name)
                if entry is None:
                    raise ArtifactError(f"{self.path.name}: no weight {name!r} for the experts "
                                        f"of layer {layer}")
                lo, hi = (data_start + int(o) for o in entry["data_offsets"])
                if (hi - lo) % e_n:
                    raise ArtifactError(f"{self.path.name}: weight {name!r} ({hi - lo} bytes) "
                                        f"is not {e_n} equal experts")
                slices.append((lo, (hi - lo) // e_n))
                self.expert_params.add(name)
                self.spans[name] = (lo, hi)
            for e in range(e_n):
                ranges = [(lo + e * n, n) for lo, n in slices]
                self.experts[(layer, e)] = _Expert(layer, e, ranges, sum(n for _, n in ranges))
        # the tier the experts live in (moec.runtime.expert_store): the file's mapping on a CPU
        self.store = store if store is not None else MappedFileStore(self.path)
        for ex in self.experts.values():
            ex.charge = self.store.charge(ex.ranges)
        need = {layer: min(int(info["k"]), int(info["num_experts"])) * max(
            self.experts[(layer, e)].charge for e in range(int(info["num_experts"])))
            for layer, info in self.layers.items()}
        self.min_budget = max(need.values(), default=0)
        if self.budget < self.min_budget:
            raise InputError(
                f"expert_budget of {_fmt(self.budget)} cannot hold one layer's top-k experts "
                f"({_fmt(self.min_budget)}); give at least that")
        self.used = 0  # bytes of experts in or loading
        order = sorted(self.layers)
        self._next_layer = dict(zip(order, order[1:], strict=False))  # within one step
        self._cur_layer = order[0] if order else 0
        self._policy = make(policy, {layer: int(i["num_experts"]) for layer, i in
                                     self.layers.items()},
                            {layer: int(i["k"]) for layer, i in self.layers.items()})
        self.stats = CacheStats({layer: LayerStats() for layer in self.layers})
        # one (layer, needed expert ids) per fetch, in order; None when not tracing
        self.trace: list[tuple[int, tuple[int, ...]]] | None = [] if trace else None
        self._cv = threading.Condition()
        self.routers = routers or {}
        self._predicted: dict[int, set[int]] = {}
        self._calls = 0  # layer calls that made a prediction
        self._queue: deque[_Expert] = deque()
        self._pinned: list[_Expert] = []  # the experts of the layer running now
        self._resident: dict[tuple[int, int], _Expert] = {}  # state "in"
        self._loading = 0  # experts in state "loading"
        self._closed = False
        self._pool: ThreadPoolExecutor | None = None
        self._thread = None
        self.prefetching = bool(prefetch)
        if prefetch:
            self._thread = threading.Thread(target=self._prefetcher, daemon=True,
                                            name="moec-expert-prefetch")
            self._thread.start()

    # ------------------------------------------------------------------ setup
    def max_step_tokens(self) -> int | None:
        """The most tokens a step may carry so that every layer's experts fit (None: any)."""
        cap = None
        for layer, info in self.layers.items():
            size = max(self.experts[(layer, e)].charge for e in range(int(info["num_experts"])))
            fit = self.budget // size
            if fit >= int(info["num_experts"]):
                continue
            t = max(1, fit // int(info["k"]))
            cap = t if cap is None else min(cap, t)
        return cap

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self.store.close()

    # ------------------------------------------------------------------ the hook
    def fetch(self, layer: int, ids: np.ndarray, x: np.ndarray | None) -> None:
        """Make the experts `ids` of `layer` resident and pinned (the previous layer's pins
        are released); then queue the prediction for the next layer."""
        e_n = int(self.layers[layer]["num_experts"])  # ids past them: identity experts
        needed = [int(i) for i in np.unique(ids) if 0 <= i < e_n]
        if self.trace is not None:
            self.trace.append((layer, tuple(needed)))
        st = self.stats.layers[layer]
        st.tokens += int(ids.shape[0])
        predicted = self._predicted.pop(layer, None)
        if predicted:
            st.predicted += len(predicted)
            st.predicted_used += len(predicted & set(needed))
        t0 = time.perf_counter()
        with self._cv:
            for ex in self._pinned:
                ex.pinned = False
            self._pinned = [self.experts[(layer, e)] for e in needed]
            self._policy.observe(layer, needed)
            self._cur_layer = layer
            missing = []
            for e in needed:
                ex = self.experts[(layer, e)]
                ex.pinned = True
                if ex.prefetched:  # read ahead for this use (done or still in flight)
                    self.stats.prefetch_useful += 1
                if ex.state == "in":
                    st.hits += 1
                    if ex.prefetched:
                        st.prefetch_hits += 1
                else:
                    st.misses += 1
                    missing.append(ex)
                ex.prefetched = False
            # predictions for this layer not yet read came too late: drop them
            self._queue = deque(ex for ex in self._queue if ex.layer != layer)
            to_read = [ex for ex in missing if ex.state == "out"]
            nbytes = sum(ex.charge for ex in to_read)
            if to_read:
                # room may be held by reads in flight: wait for them to land, then evict (the
                # policy's order does not change within a fetch, so making room for all the
                # misses at once evicts what making room for each in turn would)
                while not self._room(nbytes) and self._loading:
                    self._cv.wait()
                self._make_room(nbytes, layer)
                for ex in to_read:
                    self._set_state(ex, "loading")
                    self.used += ex.charge
        t1 = time.perf_counter()
        if len(to_read) > 1 and READERS > 1:  # the foreground reads, outside the lock
            if self._pool is None:
                self._pool = ThreadPoolExecutor(READERS, thread_name_prefix="moec-expert-read")
            list(self._pool.map(self._read, to_read))
        else:
            for ex in to_read:
                self._read(ex)
        with self._cv:
            while any(ex.state != "in" for ex in missing):  # ... and the prefetcher's
                self._cv.wait()
        if missing:  # blocked on reads (not on the bookkeeping before them)
            self.stats.wait_s += time.perf_counter() - t1
        self.stats.fetch_s += time.perf_counter() - t0
        if x is not None and self._thread is not None:
            self._prefetch_next(layer, x)

    def belady_hit_rate(self) -> float | None:
        """The hit rate of the offline optimum (MIN) on this cache's trace, under its budget
        and with its experts' sizes (None: no fetch traced). Needs `trace=True`."""
        if self.trace is None:
            raise InputError("belady_hit_rate needs the access trace: make the cache with "
                             "trace=True (or set cache.trace = [] before running)")
        from moec.runtime.cache_replay import belady_hit_rate  # noqa: PLC0415

        sizes = {key: ex.charge for key, ex in self.experts.items()}
        return belady_hit_rate(self.trace, self.budget, sizes)

    def release(self) -> None:
        """Unpin everything (the end of a step)."""
        with self._cv:
            for ex in self._pinned:
                ex.pinned = False
            self._pinned = []

    def _set_state(self, ex: _Expert, state: str) -> None:
        """Move `ex` to `state` (out | loading | in), keeping the resident set and the count of
        reads in flight (call with the lock held)."""
        self._loading += (state == "loading") - (ex.state == "loading")
        if state == "in":
            self._resident[(ex.layer, ex.index)] = ex
        elif ex.state == "in":
            del self._resident[(ex.layer, ex.index)]
        ex.state = state

    # ------------------------------------------------------------------ policy
    def _room(self, nbytes: int) -> bool:
        """Whether evicting resident, unpinned experts can make `nbytes` fit."""
        free = self.budget - self.used + sum(ex.charge for ex in self._resident.values()
                                             if not ex.pinned)
        return nbytes <= free

    def _make_room(self, nbytes: int, layer: int, farther_than: float | None = None) -> bool:
        """Evict resident, unpinned experts in the policy's order until `nbytes` fit (the
        fetch is at `layer`). With `farther_than` (adaptive only: a prefetch), only experts
        whose expected next use is farther than that may go, and False says it did not fit
        (nothing is evicted then); otherwise not fitting is an error."""
        if self.used + nbytes <= self.budget:
            return True
        keys = [key for key, ex in self._resident.items() if not ex.pinned]
        if farther_than is not None:
            ranked = self._policy.ranked(keys, layer)
            free = self.budget - self.used
            chosen = []
            for dist, key in ranked:
                if free >= nbytes or dist <= farther_than:
                    break
                chosen.append(key)
                free += self.experts[key].charge
            if free < nbytes:
                return False
            for key in chosen:
                self._evict(self.experts[key])
            return True
        for key in self._policy.eviction_order(keys, layer):
            if self.used + nbytes <= self.budget:
                break
            self._evict(self.experts[key])
        if self.used + nbytes > self.budget:
            raise InputError(
                f"the expert cache ({_fmt(self.budget)}) cannot hold the experts "
                f"this step routes to at once; load with a larger expert_budget or run fewer "
                f"tokens per step")

    def _evict(self, ex: _Expert) -> None:
        self.store.evict(ex.ranges)
        self._set_state(ex, "out")
        if ex.prefetched:  # read ahead for nothing
            self.stats.prefetch_wasted += 1
        ex.prefetched = False
        self.used -= ex.charge
        self.stats.evictions += 1

    # ------------------------------------------------------------------ I/O
    def _read(self, ex: _Expert) -> None:
        t = time.perf_counter()
        try:
            self.store.load(ex.ranges)
        except ArtifactError as e:
            raise ArtifactError(f"expert {ex.index} of layer {ex.layer}: {e}") from None
        dt = time.perf_counter() - t
        with self._cv:
            self._set_state(ex, "in")
            st = self.stats.layers[ex.layer]
            st.bytes_read += ex.nbytes
            st.loads += 1
            self.stats.read_s += dt
            self._cv.notify_all()

    def _prefetch_next(self, layer: int, x: np.ndarray) -> None:
        nxt = self._next_layer.get(layer)
        w = self.routers.get(f"{nxt}.weight")
        if nxt is None or w is None or not x.size:
            return
        logits = x.astype(np.float32, copy=False) @ w.T
        if f"{nxt}.logit_bias" in self.routers:
            logits = logits + self.routers[f"{nxt}.logit_bias"]
        if f"{nxt}.select_bias" in self.routers:
            logits = logits + self.routers[f"{nxt}.select_bias"]
        k = int(self.layers[nxt]["k"])
        top = np.argpartition(-logits, min(k, logits.shape[1]) - 1, axis=1)[:, :k]
        e_n = int(self.layers[nxt]["num_experts"])
        want = {int(e) for e in np.unique(top) if e < e_n}  # not the identity experts
        self._predicted[nxt] = want
        with self._cv:
            self._calls += 1
            if self.stats.prefetch_precision() < PREFETCH_MIN_PRECISION and \
                    self._calls % PREFETCH_PROBE_EVERY:
                self.stats.prefetch_skipped += 1  # not paying: only probe now and then
                return
            for e in want:
                ex = self.experts[(nxt, e)]
                if ex.state == "out" and ex not in self._queue:
                    self._queue.append(ex)
            self._cv.notify_all()

    def _prefetcher(self) -> None:
        try:  # read ahead only with CPU time the kernels leave (a read is a copy: CPU work)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), PREFETCH_NICE)
        except (OSError, AttributeError):
            pass
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                ex = self._queue.popleft()
                if ex.state != "out":
                    continue
                cur = self._cur_layer
                if isinstance(self._policy, Adaptive):
                    used, predicted = (sum(getattr(s, f) for s in self.stats.layers.values())
                                       for f in ("predicted_used", "predicted"))
                    q = (used + PREFETCH_PRIOR[0]) / (predicted + PREFETCH_PRIOR[1])
                    limit = float(self._policy.distance(ex.layer, cur, q))
                    if not self._make_room(ex.charge, cur, farther_than=limit):
                        continue  # everything resident is likelier to be needed first
                else:
                    try:
                        self._make_room(ex.charge, cur)
                    except InputError:
                        continue  # no unpinned room now: a miss will load it if it is needed
                self._set_state(ex, "loading")
                ex.prefetched = True
                self.used += ex.charge
                self.stats.prefetch_reads += 1
            self._read(ex)


current = threading.local()  # the expert cache of the step running in this thread
_registered = False
_reg_lock = threading.Lock()


def register_fetch() -> None:
    """The global function the offload entry points call at each MoE layer (moe.expert_fetch):
    it forwards to the expert cache of the step running in the calling thread (the VM runs
    synchronously in the thread that called it)."""
    global _registered
    with _reg_lock:
        if _registered:
            return
        import tvm_ffi  # noqa: PLC0415  (installed with TVM)

        def fetch(layer: int, ids: Any, x: Any) -> Any:
            cache = getattr(current, "cache", None)
            ids_np = ids.numpy()  # on a GPU: the copy waits for the kernels before it
            try:
                if cache is None:
                    raise ExecutionError("an offload entry point ran without an expert cache "
                                         "(load the artifact with expert_budget=)")
                # the layer's input only feeds the prefetcher's router (a copy off a GPU)
                cache.fetch(int(layer), ids_np, x.numpy() if cache.prefetching else None)
            except Exception as e:  # handed back to StepModel.step through the VM's error
                current.error = e if isinstance(e, (ExecutionError, InputError)) else \
                    ExecutionError(f"the expert cache failed at layer {layer}: "
                                   f"{type(e).__name__}: {e}")
                raise
            from moec.runtime import _tvm  # noqa: PLC0415

            # a new tensor, not `ids`: the VM's memory plan may reuse `ids`' storage after
            # this call, its last use
            return _tvm.tvm().runtime.tensor(ids_np, ids.device)

        tvm_ffi.register_global_func("moec.expert_fetch", fetch, override=True)
        _registered = True


def _fmt(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def load_routers(folder: Path) -> dict[str, np.ndarray]:
    p = Path(folder) / ROUTERS
    if not p.is_file():
        return {}
    from safetensors.numpy import load_file

    return dict(load_file(str(p)))


__all__ = ["POLICIES", "ROUTERS", "CacheStats", "ExpertCache", "current", "load_routers",
           "register_fetch"]


def device_driver(dev: Any) -> Any:
    """The driver of the device tier for `dev` (moec.runtime.cuda_driver), None on a CPU,
    where the experts stay in the weights file's mapping."""
    if int(dev.dlpack_device_type()) == 1:  # kDLCPU
        return None
    from moec.runtime.cuda_driver import CudaDriver  # noqa: PLC0415

    return CudaDriver(int(dev.index))


def load_offloaded(path: Path, manifest: Any, dev: Any, budget: int, policy: str,
                   prefetch: bool, source: str = "auto") -> tuple[list[Any], ExpertCache]:
    """The weights of a generation artifact for offloaded running: every weight but the
    routed experts loaded as usual onto `dev`; the experts in the cache's store (on a CPU views
    of a private mapping of the weights file, read only when loaded; on a GPU reserved device
    address ranges, mapped under resident experts, with every expert in pinned host memory,
    or with `source` "disk" read from the weights file on each miss).
    Returns the weights in `params` order and the cache."""
    from moec.runtime.expert_store import DeviceStore  # noqa: PLC0415
    from moec.runtime.weights import DTYPE_NAMES, _header, _np_dtype, read_copies, to_tvm

    gen = manifest.meta.get("generation") or {}
    offload = gen.get("offload")
    if not offload:
        raise InputError(f"{path.parent} has no expert offload information (an MoE generation "
                         f"artifact compiled by this moec has it): expert_budget needs it")
    header, start, _ = _header(path)
    driver = device_driver(dev)
    store = None
    if driver is not None:
        spans = {}
        for layer in offload["layers"]:
            for name in layer["params"]:
                if name not in header:
                    raise ArtifactError(f"{path.name}: no weight {name!r} for the experts of "
                                        f"layer {layer['layer']}")
                spans[name] = tuple(start + int(o) for o in header[name]["data_offsets"])
        store = DeviceStore(driver, path, spans, from_disk=source == "disk")
    try:
        cache = ExpertCache(path, header, start, offload, budget, policy=policy,
                            prefetch=prefetch, store=store,
                            routers=load_routers(path.parent) if prefetch else None)
    except BaseException:
        if store is not None:
            store.close()
        raise
    try:
        resident = [n for n in manifest.params if n not in cache.expert_params]
        copies = dict(zip(resident, read_copies(path, resident), strict=True))
        out = []
        for name in manifest.params:
            if name in cache.expert_params:
                entry = header[name]
                lo, hi = cache.spans[name]
                out.append(cache.store.tensor(lo, hi, tuple(int(d) for d in entry["shape"]),
                                              _np_dtype(DTYPE_NAMES[entry["dtype"]]), dev))
            else:
                out.append(to_tvm(copies[name], dev))
    except BaseException:
        cache.close()  # a GPU store holds device and pinned memory until closed
        raise
    return out, cache
