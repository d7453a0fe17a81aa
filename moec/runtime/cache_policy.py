"""Eviction policies of the expert cache (moec.runtime.expert_cache), shared with the trace
replays (moec.runtime.cache_replay) so that a replay runs exactly the policy the cache ran.

A policy sees every layer fetch (`observe(layer, ids)`: the experts the layer's tokens chose,
before anything is evicted for them) and, when room is needed, orders the resident unpinned
experts (`eviction_order(keys, layer)`: the first is evicted first). Keys are (layer, expert).

- `lru`: least recently used first; ties (the experts of one fetch) in key order.
- `lfu`: smallest use count first, counts halving every `LFU_HALF_LIFE` fetches.
- `adaptive` (the default): the expert expected to be needed last goes first, an estimate of
  Belady's farthest next use. Two facts make it estimable. (1) Layers run in a fixed cycle, so
  an expert of layer l can next be needed only at layer l's next fetch, `d` fetches away
  (1 for the next layer, L for the one just run); LRU and LFU ignore this and, under a small
  budget, evict the experts of the layer about to run. (2) The chance `p` that an expert is
  used at its layer's next fetch is learned online from how experts with the same history
  fared: a table over (fetches since its last use, its share of recent fetches), counting for
  each cell how often an expert in it was used at the next fetch. Recency (consecutive tokens
  choosing the same experts) and popularity (skewed routing) are thus weighed by what this
  model's routing shows, not fixed in advance. The expected distance to the next use is
  `d + L * (1/p - 1)` fetches (geometric), and the largest is evicted first (ties: least
  recently used).

Replayed on synthetic traces (tests/runtime/test_cache_policy.py), `adaptive` is within a few
points of the better of LRU and LFU on every kind of routing (uniform, Zipf-skewed, sticky,
both) and above both where they differ. No online policy comes near Belady's MIN on i.i.d.
uniform routing: each expert is then equally likely next, so any policy's expected hit rate
is the resident share of the experts, whatever it keeps.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

Key = tuple[int, int]  # (layer, expert)
POLICIES = ("adaptive", "lru", "lfu")
LFU_HALF_LIFE = 256.0  # fetches after which an expert's use count has halved

# adaptive: the buckets of "fetches of its layer since the expert's last use" (0: used at the
# last one) and of "share of its layer's recent fetches that used it"
AGE_EDGES = np.array([1, 2, 4, 8, 16, 32])
SHARE_EDGES = np.array([0.02, 0.05, 0.1, 0.2, 0.4, 0.7])
SHARE_HALF_LIFE = 256.0  # layer fetches after which a use counts half in the share
TABLE_DECAY = 0.999  # per fetch: the table follows routing that drifts
PRIOR_WEIGHT = 4.0  # the table's prior: this many observations at k / E


class Policy:
    """Base: the bookkeeping every policy keeps (a clock of fetches and each expert's last use)."""

    name = ""

    def __init__(self, num_experts: Mapping[int, int], k: Mapping[int, int]) -> None:
        self.num_experts = {int(layer): int(n) for layer, n in num_experts.items()}
        self.k = {int(layer): int(v) for layer, v in k.items()}
        self.clock = 0
        self.last: dict[Key, int] = {}

    def observe(self, layer: int, ids: Iterable[int]) -> None:
        self.clock += 1
        for e in ids:
            self.last[(layer, int(e))] = self.clock

    def eviction_order(self, keys: Sequence[Key], layer: int) -> list[Key]:
        raise NotImplementedError


class LRU(Policy):
    name = "lru"

    def eviction_order(self, keys: Sequence[Key], layer: int) -> list[Key]:
        return sorted(keys, key=lambda key: (self.last.get(key, 0), key))


class LFU(Policy):
    name = "lfu"

    def __init__(self, num_experts: Mapping[int, int], k: Mapping[int, int]) -> None:
        super().__init__(num_experts, k)
        self.freq: dict[Key, tuple[float, int]] = {}  # count at a clock

    def observe(self, layer: int, ids: Iterable[int]) -> None:
        super().observe(layer, ids)
        for e in ids:
            key = (layer, int(e))
            self.freq[key] = (self._decayed(key) + 1.0, self.clock)

    def _decayed(self, key: Key) -> float:
        f, t = self.freq.get(key, (0.0, self.clock))
        return f * 0.5 ** ((self.clock - t) / LFU_HALF_LIFE)

    def eviction_order(self, keys: Sequence[Key], layer: int) -> list[Key]:
        return sorted(keys, key=lambda key: (self._decayed(key), key))


class Adaptive(Policy):
    name = "adaptive"

    def __init__(self, num_experts: Mapping[int, int], k: Mapping[int, int]) -> None:
        super().__init__(num_experts, k)
        self.layers = sorted(self.num_experts)
        self.pos = {layer: i for i, layer in enumerate(self.layers)}
        big = np.iinfo(np.int64).max // 4
        self.age = {layer: np.full(n, big, np.int64) for layer, n in self.num_experts.items()}
        self.share = {layer: np.zeros(n) for layer, n in self.num_experts.items()}
        self.fetches = dict.fromkeys(self.num_experts, 0.0)  # decayed, as the shares are
        self.decay = 0.5 ** (1.0 / SHARE_HALF_LIFE)
        shape = (len(AGE_EDGES) + 1, len(SHARE_EDGES) + 1)
        self.seen = np.zeros(shape)  # experts observed in each cell at a fetch ...
        self.used = np.zeros(shape)  # ... and how many of them the fetch used

    def _cells(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        a = np.searchsorted(AGE_EDGES, self.age[layer], side="right")
        share = self.share[layer] / max(self.fetches[layer], 1e-9)
        return a, np.searchsorted(SHARE_EDGES, share, side="right")

    def observe(self, layer: int, ids: Iterable[int]) -> None:
        ids = [int(e) for e in ids]
        super().observe(layer, ids)
        used = np.zeros(self.num_experts[layer], bool)
        used[ids] = True
        a, s = self._cells(layer)
        self.seen *= TABLE_DECAY
        self.used *= TABLE_DECAY
        np.add.at(self.seen, (a, s), 1.0)
        np.add.at(self.used, (a, s), used.astype(np.float64))
        self.age[layer] += 1
        self.age[layer][used] = 0
        self.share[layer] = self.share[layer] * self.decay + used
        self.fetches[layer] = self.fetches[layer] * self.decay + 1.0

    def use_probability(self, layer: int) -> np.ndarray:
        """The estimated chance that each expert of `layer` is used at its next fetch."""
        a, s = self._cells(layer)
        p0 = self.k[layer] / self.num_experts[layer]
        p = (self.used[a, s] + PRIOR_WEIGHT * p0) / (self.seen[a, s] + PRIOR_WEIGHT)
        return np.clip(p, 1e-6, 1.0)

    def distance(self, layer: int, cur: int, p: np.ndarray | float) -> np.ndarray | float:
        """Expected fetches until an expert of `layer` with use chance `p` is next needed, seen
        from a fetch of layer `cur`."""
        n = len(self.layers)
        d = (self.pos[layer] - self.pos[cur]) % n or n
        return d + n * (1.0 / np.asarray(p) - 1.0)

    def eviction_order(self, keys: Sequence[Key], layer: int) -> list[Key]:
        return [key for _, key in self.ranked(keys, layer)]

    def ranked(self, keys: Sequence[Key], layer: int) -> list[tuple[float, Key]]:
        """`keys` in eviction order with their expected distances to the next use, seen from
        a fetch of `layer`."""
        by_layer: dict[int, list[int]] = {}
        for lay, e in keys:
            by_layer.setdefault(lay, []).append(e)
        scored = []
        for lay, es in by_layer.items():
            dist = self.distance(lay, layer, self.use_probability(lay)[es])
            scored += [(-float(v), self.last.get((lay, e), 0), (lay, e))
                       for v, e in zip(np.atleast_1d(dist), es, strict=True)]
        scored.sort()
        return [(-neg, key) for neg, _, key in scored]


def make(policy: str, num_experts: Mapping[int, int], k: Mapping[int, int]) -> Policy:
    """The policy named `policy` for layers with these expert counts and top-k."""
    cls = {"adaptive": Adaptive, "lru": LRU, "lfu": LFU}.get(policy)
    if cls is None:
        from moec.errors import InputError  # noqa: PLC0415

        raise InputError(f"expert cache policy {policy!r}: want one of {POLICIES}")
    return cls(num_experts, k)


__all__ = ["POLICIES", "Adaptive", "LFU", "LRU", "Policy", "make"]
