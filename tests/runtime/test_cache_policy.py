"""moec.runtime.cache_policy and the expert cache on a weights file written here (no compiled
model): the policies replayed against MIN and LRU on synthetic routing (uniform, Zipf-skewed,
sticky), a cyclic case worked out by hand, and ExpertCache's own hit rate, budget and bytes
against the replay of its trace."""

from __future__ import annotations

import numpy as np
import pytest

from moec.errors import InputError
from moec.runtime.cache_policy import POLICIES, make
from moec.runtime.cache_replay import belady_hit_rate, lru_hit_rate, policy_hit_rate


def routing_trace(layers: int, experts: int, k: int, tokens: int, *, skew: float,
                  stick: float, seed: int) -> list[tuple[int, tuple[int, ...]]]:
    """One fetch per layer per token. Each layer's experts have Zipf(`skew`) popularity (0:
    uniform) in a random order; each of the previous token's experts is chosen again with
    probability `stick` (consecutive tokens share experts, as real models' do)."""
    rng = np.random.default_rng(seed)
    pops = []
    for _ in range(layers):
        w = 1.0 / np.arange(1, experts + 1) ** skew
        pops.append(w[rng.permutation(experts)] / w.sum())
    prev: list[list[int]] = [[] for _ in range(layers)]
    trace = []
    for _ in range(tokens):
        for layer in range(layers):
            keep = [e for e in prev[layer] if rng.random() < stick]
            p = pops[layer].copy()
            p[keep] = 0
            rest = rng.choice(experts, size=k - len(keep), replace=False, p=p / p.sum())
            prev[layer] = keep + [int(e) for e in rest]
            trace.append((layer, tuple(sorted(prev[layer]))))
    return trace


def test_the_lru_policy_replays_as_the_independent_lru():
    for seed in range(6):
        trace = routing_trace(3, 16, 2, 60, skew=1.0, stick=0.3, seed=seed)
        for cap in (2, 5, 12, 30):
            assert policy_hit_rate(trace, cap, policy="lru") == pytest.approx(
                lru_hit_rate(trace, cap))


@pytest.mark.parametrize("policy", POLICIES)
def test_no_demand_policy_beats_min(policy):
    for seed in range(4):
        trace = routing_trace(4, 16, 2, 50, skew=0.8, stick=0.4, seed=seed)
        for cap in (2, 6, 16, 40, 64):
            got = policy_hit_rate(trace, cap, policy=policy)
            assert 0 <= got <= belady_hit_rate(trace, cap) + 1e-12, (seed, cap)
    with pytest.raises(ValueError, match="capacity"):
        policy_hit_rate([(0, (0, 1, 2))], 2, policy=policy)


def test_adaptive_keeps_the_layer_that_runs_next():
    """Three layers of one expert each, always used, two slots: the cycle 0 1 2 0 1 2 ... LRU
    evicts the expert the next fetch needs and never hits; MIN hits every other fetch; so does
    adaptive once it has seen that an expert used at its layer's last fetch is used again:
    it evicts the layer that runs last (the one just before the fetching layer)."""
    trace = [(layer, (0,)) for _ in range(200) for layer in range(3)]
    assert lru_hit_rate(trace, 2) == 0
    assert belady_hit_rate(trace, 2) == pytest.approx(0.5, abs=0.01)
    assert policy_hit_rate(trace, 2, policy="adaptive") == pytest.approx(0.5, abs=0.01)


# (skew, stick): uniform, Zipf-skewed, sticky, and both as real models show
ROUTINGS = [(0.0, 0.0), (1.0, 0.0), (0.0, 0.5), (0.8, 0.3), (1.0, 0.6)]


@pytest.mark.parametrize("skew,stick", ROUTINGS)
@pytest.mark.parametrize("frac", [0.5, 0.25, 0.125])
def test_adaptive_is_as_good_as_the_better_of_lru_and_lfu(skew, stick, frac):
    """Measured on 6 layers x 64 experts, top-8, 120 tokens: adaptive within 0.03 of
    max(LRU, LFU) for every routing and budget (it learns which of recency or popularity
    predicts this routing's reuse)."""
    trace = routing_trace(6, 64, 8, 120, skew=skew, stick=stick, seed=7)
    cap = int(frac * 6 * 64)
    got = {p: policy_hit_rate(trace, cap, policy=p) for p in POLICIES}
    assert got["adaptive"] >= max(got["lru"], got["lfu"]) - 0.03, got


def test_adaptive_reaches_85_percent_of_min_on_skewed_sticky_routing():
    trace = routing_trace(6, 64, 8, 150, skew=1.0, stick=0.6, seed=3)
    for frac in (0.5, 0.25, 0.125):
        cap = int(frac * 6 * 64)
        assert policy_hit_rate(trace, cap) >= 0.85 * belady_hit_rate(trace, cap), frac


def test_unknown_policy_is_refused():
    with pytest.raises(InputError, match="fifo"):
        make("fifo", {0: 4}, {0: 1})


# ---------------------------------------------------------------------- ExpertCache, no model
E, ROWS, COLS = 8, 64, 48  # 8 experts a layer, a [64, 48] fp32 weight per expert


def write_weights(folder, experts: int, rows: int, cols: int):
    """A weights file of 3 layers' expert weights `l{layer}.w` [experts, rows, cols] (fp32,
    random) and one other weight; returns (path, tensors)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    tensors = {f"l{layer}.w": rng.standard_normal((experts, rows, cols)).astype(np.float32)
               for layer in range(3)}
    tensors["other"] = rng.standard_normal((5, 7)).astype(np.float32)
    path = folder / "weights.safetensors"
    save_file(tensors, str(path))
    return path, tensors


@pytest.fixture
def weights_file(tmp_path):
    return write_weights(tmp_path, E, ROWS, COLS)


def _cache(path, budget_experts, policy="adaptive", **kw):
    from moec.runtime.expert_cache import ExpertCache
    from moec.runtime.weights import _header

    header, start, _ = _header(path)
    offload = {"layers": [{"layer": layer, "num_experts": E, "k": 2, "params": [f"l{layer}.w"]}
                          for layer in range(3)]}
    size = ROWS * COLS * 4
    return ExpertCache(path, header, start, offload, budget_experts * size, policy=policy,
                       trace=True, **kw), header, start, size


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("budget_experts", [2, 5, 11, 24])
def test_expert_cache_reads_the_right_bytes_and_keeps_its_budget(weights_file, policy,
                                                                 budget_experts):
    path, tensors = weights_file
    cache, header, start, size = _cache(path, budget_experts, policy)
    views = {f"l{la}.w": cache.store.view(*cache.spans[f"l{la}.w"]).view(np.float32).reshape(
        E, ROWS, COLS) for la in range(3)}
    trace = routing_trace(3, E, 2, 40, skew=1.0, stick=0.4, seed=1)
    try:
        for layer, ids in trace:
            cache.fetch(layer, np.array(ids), None)
            assert cache.used <= cache.budget
            for e in ids:  # what the kernels will read is the file's expert, bit for bit
                assert np.array_equal(views[f"l{layer}.w"][e], tensors[f"l{layer}.w"][e])
        s = cache.stats.summary()
        assert s["bytes_read"] == s["loads"] * size
        sizes = {key: ex.nbytes for key, ex in cache.experts.items()}
        assert policy_hit_rate(cache.trace, cache.budget, sizes, policy=policy,
                               num_experts=dict.fromkeys(range(3), E),
                               k=dict.fromkeys(range(3), 2)) == pytest.approx(s["hit_rate"])
        assert s["hit_rate"] <= cache.belady_hit_rate() + 1e-12
    finally:
        cache.close()


def test_expert_cache_refuses_a_budget_below_one_layers_top_k(weights_file):
    with pytest.raises(InputError, match="top-k"):
        _cache(weights_file[0], 1)


def test_prefetch_under_adaptive_never_evicts_likelier_experts(weights_file):
    """A prefetch goes only into free room or in place of experts expected to be needed later
    than the prediction. Here the budget holds exactly each layer's two (always used) experts.
    Once the policy has learned that (a few passes), every resident expert is likelier to be
    needed than a prediction that has never been right: no wrong prediction is read any more,
    and every fetch hits. (Under LRU the same run keeps evicting hits for the predictions.)"""
    import time

    path, _ = weights_file
    cache, *_ = _cache(path, 6, "adaptive", prefetch=True,
                       routers={f"{la}.weight": np.eye(E, 4, dtype=np.float32)[::-1].copy()
                                for la in range(3)})

    def passes(n):
        for _ in range(n):
            for layer in range(3):
                # x selects experts 6 and 7 of the next layer; the layer uses 0 and 1
                cache.fetch(layer, np.array([0, 1]), np.array([[5.0, 4.0, 0.0, 0.0]],
                                                              np.float32))
                time.sleep(0.002)  # give the prefetcher its chance between layer calls
        time.sleep(0.1)
        return cache.stats.summary()

    try:
        before = passes(10)
        after = passes(20)
        assert after["prefetch_accuracy"] == 0
        assert after["loads"] == before["loads"]  # nothing read in the last 20 passes ...
        hits = sum(s.hits for s in cache.stats.layers.values())
        assert after["hit_rate"] * (30 * 3 * 2) == pytest.approx(hits)
        assert hits - before["hit_rate"] * (10 * 3 * 2) == pytest.approx(20 * 3 * 2)  # ... all hit
    finally:
        cache.close()


def test_prefetch_that_does_not_pay_is_gated(weights_file):
    """Predictions that are always wrong, with room to read them: the first reads are wasted
    (evicted unused), the measured precision falls below PREFETCH_MIN_PRECISION, and from then
    on the prefetcher reads the predictions of one layer call in PREFETCH_PROBE_EVERY only."""
    import time

    from moec.runtime import expert_cache as ec

    path, _ = weights_file
    rng = np.random.default_rng(0)
    cache, *_ = _cache(path, 9, "adaptive", prefetch=True,
                       routers={f"{la}.weight": np.eye(E, 4, dtype=np.float32)[::-1].copy()
                                for la in range(3)})
    calls = 0
    try:
        for _ in range(60):
            for layer in range(3):
                # used: 2 of experts 0-3 at random; predicted: 6 and 7, never used
                used = rng.choice(4, 2, replace=False)
                cache.fetch(layer, used, np.array([[5.0, 4.0, 0.0, 0.0]], np.float32))
                calls += 1
                time.sleep(0.002)  # let the prefetcher run between layer calls
        time.sleep(0.2)
        s = cache.stats.summary()
        assert s["prefetch_precision"] == 0 and s["prefetch_skipped"] > 0
        predicting = 2 * calls // 3  # the last layer predicts nothing
        assert s["prefetch_skipped"] >= predicting * 0.7
        assert s["prefetch_reads"] <= 2 * (predicting // ec.PREFETCH_PROBE_EVERY + 8)
    finally:
        cache.close()


def _cached_pages(path) -> np.ndarray:
    """Which pages of `path` are in the page cache (mincore over a mapping of the file that is
    never touched, so it reports the page cache itself)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
    view = np.frombuffer(m, np.uint8)
    rc = libc.mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(size), vec)
    err = ctypes.get_errno()
    del view
    m.close()
    if rc != 0:
        pytest.skip(f"mincore refused the mapping (errno {err}): the page cache is not "
                    f"measurable here")
    return (np.frombuffer(vec, np.uint8) & 1).astype(bool)


def test_the_experts_do_not_stay_in_the_page_cache(tmp_path):
    """The budget is real, not hidden in the page cache: after many loads and evictions, the
    pages lying entirely inside the experts' bytes are out of the page cache (a read drops what
    it read; no readahead brings in more), but for the last reads' few."""
    import mmap
    import os

    from safetensors.numpy import save_file

    rows, cols = 256, 64  # 64 KiB experts: 16 pages each
    rng = np.random.default_rng(0)
    tensors = {f"l{la}.w": rng.standard_normal((E, rows, cols)).astype(np.float32)
               for la in range(3)}
    path = tmp_path / "weights.safetensors"
    save_file(tensors, str(path))
    fd = os.open(path, os.O_RDONLY)
    try:  # what writing the file left cached
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    if _cached_pages(path).any():
        pytest.skip("this file system keeps the file's pages cached after DONTNEED (e.g. "
                    "tmpfs): the page cache is the file's storage here")

    from moec.runtime.expert_cache import ExpertCache
    from moec.runtime.weights import _header

    header, start, _ = _header(path)
    offload = {"layers": [{"layer": la, "num_experts": E, "k": 2, "params": [f"l{la}.w"]}
                          for la in range(3)]}
    cache = ExpertCache(path, header, start, offload, 5 * rows * cols * 4)
    try:
        for layer, ids in routing_trace(3, E, 2, 40, skew=0.5, stick=0.3, seed=2):
            cache.fetch(layer, np.array(ids), None)
        assert cache.stats.summary()["loads"] > 3 * E  # experts were read more than once
        inside = np.zeros(-(-path.stat().st_size // mmap.PAGESIZE), bool)
        for ex in cache.experts.values():
            for off, n in ex.ranges:
                inside[-(-off // mmap.PAGESIZE):(off + n) // mmap.PAGESIZE] = True
        assert inside.sum() >= 3 * E * 15
        # the kernel may keep the pages of the last reads a moment (they sit in per-CPU
        # batches that a DONTNEED skips): at most READERS experts' worth, out of the
        # hundreds of pages the loads read
        from moec.runtime.expert_cache import READERS

        assert (_cached_pages(path) & inside).sum() <= READERS * 16
    finally:
        cache.close()


def test_identity_expert_ids_are_not_fetched(weights_file):
    """ids from num_experts on name a layer's identity (zero-computation) experts: they have no
    weights, so a fetch leaves them out (and a fetch of identity experts only reads nothing)."""
    path, tensors = weights_file
    cache, *_ = _cache(path, 4)
    try:
        cache.fetch(0, np.array([[1, E], [E + 1, 3]]), None)
        assert cache.trace == [(0, (1, 3))]
        assert {key for key, ex in cache.experts.items() if ex.state == "in"} == {(0, 1), (0, 3)}
        cache.fetch(1, np.array([[E, E + 1]]), None)
        assert cache.trace[-1] == (1, ()) and cache.stats.summary()["loads"] == 2
    finally:
        cache.close()
