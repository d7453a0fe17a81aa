"""moec.runtime.cache_replay: MIN and LRU replays of expert access traces, against optima
worked out by hand, and LRU never above MIN on random traces."""

from __future__ import annotations

import numpy as np
import pytest

from moec.runtime.cache_replay import belady_hit_rate, lru_hit_rate

# the textbook reference string, one expert per fetch in one layer, capacity 3:
# MIN misses 1 2 3 4 . . 5 . . 3 4 . (7 misses, 5 hits); LRU hits only the 1 2 after 5 (2 hits)
TEXTBOOK = [(0, (e,)) for e in (1, 2, 3, 4, 1, 2, 5, 1, 2, 3, 4, 5)]


def test_min_and_lru_on_the_textbook_string():
    assert belady_hit_rate(TEXTBOOK, 3) == pytest.approx(5 / 12)
    assert lru_hit_rate(TEXTBOOK, 3) == pytest.approx(2 / 12)
    assert belady_hit_rate(TEXTBOOK, 5) == pytest.approx(7 / 12)  # all fit: only cold misses
    assert belady_hit_rate([], 3) is None


def test_a_fetchs_experts_are_pinned_together():
    # capacity 2. Fetch 2 needs 0 (hit) and 2: 0 is pinned, so 1 goes although 0 is never used
    # again; fetch 3 misses 1. Hits: 1 of 5 (unpinned, MIN would evict 0 and hit 1: 2 of 5)
    trace = [(0, (0, 1)), (0, (0, 2)), (0, (1,))]
    assert belady_hit_rate(trace, 2) == pytest.approx(1 / 5)
    with pytest.raises(ValueError, match="capacity"):
        belady_hit_rate([(0, (0, 1, 2))], 2)


def test_layers_share_the_capacity_and_sizes_count_bytes():
    # two layers, experts of layer 1 twice the bytes of layer 0's; 4 bytes in all
    sizes = {(0, 0): 1, (0, 1): 1, (1, 0): 2, (1, 1): 2}
    trace = [(0, (0,)), (1, (0,)), (0, (1,)), (1, (0,)), (0, (0,))]
    # after (1,0) the cache holds 3 bytes; (0,1) fits (4); (1,0) hits; (0,0) hits: 2 of 5
    assert belady_hit_rate(trace, 4, sizes) == pytest.approx(2 / 5)
    # 3 bytes: (0,1) must evict: MIN drops (0,0) (next use 4) over (1,0) (next use 3):
    # (1,0) hits, (0,0) misses: 1 of 5
    assert belady_hit_rate(trace, 3, sizes) == pytest.approx(1 / 5)
    # LRU drops (0,0) too here (the oldest)
    assert lru_hit_rate(trace, 3, sizes) == pytest.approx(1 / 5)


@pytest.mark.parametrize("seed", range(20))
def test_lru_never_beats_min(seed):
    rng = np.random.default_rng(seed)
    layers, experts, k = int(rng.integers(1, 4)), int(rng.integers(3, 12)), int(rng.integers(1, 3))
    # skewed routing (Zipf-like popularity) so that caching matters
    p = 1 / np.arange(1, experts + 1) ** rng.uniform(0.5, 1.5)
    p /= p.sum()
    trace = [(layer, tuple(rng.choice(experts, size=k, replace=False, p=p)))
             for _ in range(int(rng.integers(10, 80))) for layer in range(layers)]
    for cap in range(k, layers * experts + 1):
        lru, opt = lru_hit_rate(trace, cap), belady_hit_rate(trace, cap)
        assert lru <= opt + 1e-12, (cap, lru, opt)
    assert belady_hit_rate(trace, layers * experts) == pytest.approx(
        1 - len({(layer, e) for layer, ids in trace for e in ids}) / sum(len(i) for _, i in trace))
