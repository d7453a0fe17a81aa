"""Replays of an expert access trace (`ExpertCache(trace=True).trace`) under a capacity: the
offline optimum (Belady's MIN), LRU, and any of the cache's own policies
(moec.runtime.cache_policy), to judge a cache's hit rate against what any demand cache of the
same size could get.

A trace is a list of fetches, one per MoE layer call, in the order the model made them:
`(layer, expert ids)`. The experts of one fetch are needed at once (the cache pins them while
the layer runs), so a replay never evicts one of them to make room for another. The capacity is
shared by every layer, as the cache's budget is: in experts, or in bytes when `sizes` gives each
`(layer, expert)` its bytes. A hit is a needed expert that was resident when its fetch began,
counted as ExpertCache counts it.

MIN evicts the resident expert whose next use is farthest (never used again first). With equal
sizes and demand loading this is the optimum (Belady 1966; the pinned fetch does not change the
exchange argument). With unequal sizes it is the usual heuristic, not a proven optimum. A cache
that prefetches reads experts before they are needed, so its hit rate can exceed MIN's.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence

Key = tuple[int, int]  # (layer, expert)
Trace = Sequence[tuple[int, Sequence[int]]]
NEVER = float("inf")


def belady_hit_rate(trace: Trace, capacity: int,
                    sizes: Mapping[Key, int] | None = None) -> float | None:
    """The hit rate of MIN (farthest next use evicted first) on `trace` with `capacity` (experts,
    or bytes with `sizes`); None for an empty trace."""
    fetches = _fetches(trace)
    # next_use[t][key]: the index of the next fetch after t that needs key
    next_use: list[dict[Key, float]] = [{} for _ in fetches]
    later: dict[Key, float] = {}
    for t in range(len(fetches) - 1, -1, -1):
        for key in fetches[t]:
            next_use[t][key] = later.get(key, NEVER)
        for key in fetches[t]:
            later[key] = t
    resident: dict[Key, float] = {}  # key -> its next use
    heap: list[tuple[float, Key]] = []  # (-next use, key); stale entries skipped
    return _replay(fetches, capacity, sizes, resident, heap,
                   on_use=lambda t, key: next_use[t][key], priority=lambda v: -v)


def lru_hit_rate(trace: Trace, capacity: int,
                 sizes: Mapping[Key, int] | None = None) -> float | None:
    """The hit rate of LRU on `trace` with `capacity`; ties (the experts of one fetch) go in
    (layer, expert) order, as ExpertCache's do."""
    fetches = _fetches(trace)
    return _replay(fetches, capacity, sizes, {}, [], on_use=lambda t, key: t,
                   priority=lambda v: v)


def policy_hit_rate(trace: Trace, capacity: int, sizes: Mapping[Key, int] | None = None,
                    policy: str = "adaptive", num_experts: Mapping[int, int] | None = None,
                    k: Mapping[int, int] | None = None) -> float | None:
    """The hit rate of the expert cache's policy `policy` (moec.runtime.cache_policy) on `trace`
    with `capacity`, evicting as ExpertCache does. `num_experts` and `k` per layer default to
    what the trace shows (the largest expert id + 1; the fewest experts a fetch needed)."""
    from moec.runtime.cache_policy import make  # noqa: PLC0415

    fetches = _fetches(trace)
    if num_experts is None:
        num_experts = {}
        for keys in fetches:
            for layer, e in keys:
                num_experts[layer] = max(num_experts.get(layer, 0), e + 1)
    if k is None:
        k = {}
        for keys in fetches:
            if keys:
                k[keys[0][0]] = min(k.get(keys[0][0], len(keys)), len(keys))
    pol = make(policy, num_experts, {layer: k.get(layer, 1) for layer in num_experts})
    size = (lambda key: 1) if sizes is None else (lambda key: int(sizes[key]))
    resident: set[Key] = set()
    used = hits = need = 0
    for t, ((layer, _), keys) in enumerate(zip(trace, fetches, strict=True)):
        layer = int(layer)
        pol.observe(layer, [e for _, e in keys])  # as the cache does, an empty fetch too
        pinned = set(keys)
        for key in keys:
            need += 1
            if key in resident:
                hits += 1
                continue
            if used + size(key) > capacity:
                for victim in pol.eviction_order([x for x in resident if x not in pinned], layer):
                    resident.discard(victim)
                    used -= size(victim)
                    if used + size(key) <= capacity:
                        break
            if used + size(key) > capacity:
                raise ValueError(f"fetch {t} needs {sorted(pinned)}: more than the capacity "
                                 f"{capacity} holds")
            resident.add(key)
            used += size(key)
    return hits / need if need else None


def _fetches(trace: Trace) -> list[list[Key]]:
    return [[(int(layer), int(e)) for e in sorted({int(i) for i in ids})] for layer, ids in trace]


def _replay(fetches, capacity, sizes, resident, heap, *, on_use, priority) -> float | None:
    """Run the fetches; `resident` maps a key to its eviction value, `heap` orders victims by
    `priority(value)` (smallest first)."""
    size = (lambda key: 1) if sizes is None else (lambda key: int(sizes[key]))
    used = hits = need = 0
    for t, keys in enumerate(fetches):
        pinned = set(keys)
        missing = []
        for key in keys:
            need += 1
            if key in resident:
                hits += 1
            else:
                missing.append(key)
            resident[key] = on_use(t, key)
            heapq.heappush(heap, (priority(resident[key]), key))
        for key in missing:
            used += size(key)
            held = []
            while used > capacity:
                if not heap:
                    raise ValueError(f"fetch {t} needs {sorted(pinned)}: more than the "
                                     f"capacity {capacity} holds")
                p, victim = heapq.heappop(heap)
                if victim not in resident or priority(resident[victim]) != p:
                    continue  # stale: evicted, or used since
                if victim in pinned:
                    held.append((p, victim))
                    continue
                del resident[victim]
                used -= size(victim)
            for item in held:
                heapq.heappush(heap, item)
    return hits / need if need else None


__all__ = ["belady_hit_rate", "lru_hit_rate", "policy_hit_rate"]
