"""Expert offload (moec/runtime/expert_cache.py): a generation artifact run with its routed
experts under a memory budget gives bitwise the tokens and logits of the fully resident model
at every budget from one layer's top-k experts up, with either policy, with and without
prefetch; the budget is checked at load and held in memory (the mapping's resident pages);
the statistics add up."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
from families import V, compile_family

import moec
from moec.errors import InputError

NEW = 12


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return compile_family("qwen3_moe", tmp_path_factory.mktemp("offload"))


def _expert_bytes(path) -> int:
    lm = moec.load(path, expert_budget=1 << 40)
    cache = lm.step_model.expert_cache
    return max(ex.nbytes for ex in cache.experts.values())


def _prompts():
    return [[int(t) for t in np.random.default_rng(i).integers(3, V, n)]
            for i, n in enumerate((1, 9, 40, 100))]


@pytest.fixture(scope="module")
def resident(qwen):
    lm = moec.load(qwen[1])
    toks = [o.token_ids for o in lm.generate(_prompts(), max_new_tokens=NEW, ignore_eos=True)]
    ids = np.array(_prompts()[3])
    return toks, ids, lm(ids)


@pytest.mark.parametrize("experts,policy,prefetch", [
    (2, "lru", True),     # one layer's top-2: one token per step, every layer a miss
    (3, "lfu", True), (3, "adaptive", True), (5, "lru", False), (7, "lfu", False),
    (6, "adaptive", False), (16, "adaptive", True)])
def test_bitwise_equal_to_resident(qwen, resident, experts, policy, prefetch):
    toks, ids, logits = resident
    lm = moec.load(qwen[1], expert_budget=experts * _expert_bytes(qwen[1]),
                   expert_policy=policy, prefetch=prefetch)
    outs = lm.generate(_prompts(), max_new_tokens=NEW, ignore_eos=True)
    assert [o.token_ids for o in outs] == toks
    got = lm(ids)
    assert np.array_equal(got, logits)  # bitwise: the same kernels on the same bytes
    s = lm.step_model.expert_cache.stats.summary()
    assert s["bytes_read"] > 0 and 0 <= s["hit_rate"] <= 1
    if experts >= 16:  # every expert fits: each is read once
        assert s["loads"] == 16 and lm.step_model.expert_cache.stats.evictions == 0


def test_budget_below_one_layers_top_k_is_refused(qwen):
    size = _expert_bytes(qwen[1])
    with pytest.raises(InputError, match="cannot hold one layer's top-k"):
        moec.load(qwen[1], expert_budget=2 * size - 1)
    with pytest.raises(InputError, match="policy"):
        moec.load(qwen[1], expert_budget=4 * size, expert_policy="fifo")


def test_step_size_follows_the_budget(qwen):
    size = _expert_bytes(qwen[1])
    assert moec.load(qwen[1], expert_budget=2 * size).engine.step_tokens == 1
    assert moec.load(qwen[1], expert_budget=7 * size).engine.step_tokens == 3
    assert moec.load(qwen[1], expert_budget=8 * size).engine.step_tokens == 64  # all fit


def _range_rss(start: int, end: int) -> int:
    """Resident bytes of this process's memory in [start, end) (/proc/self/smaps: the expert
    store's mapping, its file-backed and its anonymous parts)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if m:
            lo, hi = int(m.group(1), 16), int(m.group(2), 16)
            inside = start <= lo and hi <= end
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


def test_the_budget_is_what_memory_holds(qwen):
    size = _expert_bytes(qwen[1])
    budget = 3 * size
    lm = moec.load(qwen[1], expert_budget=budget)
    lm.generate(_prompts(), max_new_tokens=NEW, ignore_eos=True)
    cache = lm.step_model.expert_cache
    assert cache.used <= budget
    # resident pages of the expert mapping: the experts held, plus at most the two partial
    # pages at the ends of each weight slice of each expert (never evicted, see _evict)
    slack = sum(2 * len(ex.ranges) * 4096 for ex in cache.experts.values())
    rss = _range_rss(*cache.store.address_range())
    assert budget // 2 <= rss <= budget + slack  # (and it sees the experts held)


@pytest.mark.parametrize("experts,policy", [(2, "lru"), (3, "lru"), (5, "lru"), (3, "adaptive"),
                                            (5, "adaptive"), (5, "lfu")])
def test_trace_replays_to_the_caches_hit_rate(qwen, experts, policy):
    """The access trace replayed by the cache's policy gives the cache's own hit rate (no
    prefetch: the cache loads on demand only), LRU's replay agrees with the independent one,
    and MIN's on the same trace is at least that."""
    from moec.runtime.cache_replay import lru_hit_rate, policy_hit_rate

    budget = experts * _expert_bytes(qwen[1])
    lm = moec.load(qwen[1], expert_budget=budget, expert_policy=policy, prefetch=False)
    cache = lm.step_model.expert_cache
    assert cache.trace is None
    with pytest.raises(InputError, match="trace"):
        cache.belady_hit_rate()
    cache.trace = []
    lm.generate(_prompts(), max_new_tokens=NEW, ignore_eos=True)
    s = cache.stats.summary()
    sizes = {key: ex.nbytes for key, ex in cache.experts.items()}
    assert sum(len(ids) for _, ids in cache.trace) == sum(
        st.hits + st.misses for st in cache.stats.layers.values())
    layers = cache.layers
    replay = policy_hit_rate(cache.trace, budget, sizes, policy,
                             {la: int(i["num_experts"]) for la, i in layers.items()},
                             {la: int(i["k"]) for la, i in layers.items()})
    assert replay == pytest.approx(s["hit_rate"])
    if policy == "lru":
        assert lru_hit_rate(cache.trace, budget, sizes) == pytest.approx(s["hit_rate"])
    assert s["hit_rate"] <= cache.belady_hit_rate() <= 1


def test_offload_benchmark_reports_the_bounds(qwen, tmp_path):
    """benchmarks/offload.py end to end on the tiny artifact: MIN's hit rate, the decode
    roofline and the wait prefetch removed are in its JSON."""
    import json
    import os
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "offload.py"
    out = tmp_path / "offload.json"
    subprocess.run([sys.executable, str(script), "run", str(qwen[1]), "--fractions", "0.25",
                    "--policies", "lru", "--both-prefetch", "--prompt", "8", "--new", "4",
                    "--threads", "1", "--disk-mb", "8", "--json", str(out)],
                   check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    res = json.loads(out.read_text())
    assert res["disk"]["method"] in ("O_DIRECT", "pread+fadvise") and res["disk"]["bytes"] > 0
    rows = res["rows"]
    assert [(r["fraction"], r["prefetch"]) for r in rows] == [
        ("resident", False), (0.25, True), (0.25, False)]
    assert all(r["same_tokens"] for r in rows)
    for r in rows[1:]:
        assert 0 < r["belady_hit_rate"] <= 1 and r["hit_to_belady"] is not None
        assert r["decode_vs_roofline"] > 0 and r["roofline_s_per_token"] > 0
    assert rows[2]["hit_rate"] <= rows[2]["belady_hit_rate"]  # no prefetch: demand only
    assert "prefetch_wait_removed" in rows[1]


def _cgroup_writable() -> bool:
    root = Path("/sys/fs/cgroup/memory")
    return root.is_dir() and os.access(root, os.W_OK)


@pytest.mark.skipif(not _cgroup_writable(),
                    reason="no writable cgroup v1 memory controller (needs root)")
def test_offload_benchmark_runs_cells_under_a_memory_limit(qwen, tmp_path):
    """--memory-limit runs the limited cells in a memory cgroup and reports its peak (RSS and
    page cache together), which stays under the limit; the routing's skew is reported."""
    import json
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "offload.py"
    out = tmp_path / "offload.json"
    subprocess.run([sys.executable, str(script), "run", str(qwen[1]), "--fractions", "0.5",
                    "--policies", "adaptive", "--prompt", "8", "--new", "4", "--threads", "1",
                    "--disk-mb", "8", "--memory-limit", "1.5GB", "--limited-fractions", "0.25",
                    "--json", str(out)],
                   check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    rows = json.loads(out.read_text())["rows"]
    assert [(r["fraction"], r["memory_limit"]) for r in rows] == [
        ("resident", None), (0.5, None), (0.25, int(1.5e9))]
    assert all(r["same_tokens"] for r in rows)
    assert 0 < rows[2]["cgroup_peak_gb"] <= 1.5
    assert 0.25 <= rows[1]["top_quarter_share"] <= 1 and 0 <= rows[1]["repeat"] <= 1


def test_moec_run_takes_an_expert_budget(qwen, resident, tmp_path, capsys):
    """`moec run ARTIFACT --tokens ... --expert-budget`: the logits are bitwise the resident
    model's; with --ep the budget is refused by name."""
    from moec.cli import main

    _, ids, logits = resident
    out = tmp_path / "logits.npy"
    tokens = " ".join(str(int(t)) for t in ids)
    budget = str(3 * _expert_bytes(qwen[1]))
    assert main(["run", str(qwen[1]), "--tokens", tokens, "--expert-budget", budget,
                 "--expert-policy", "lru", "--output", str(out)]) == 0
    assert np.array_equal(np.load(out), logits)
    assert main(["run", str(qwen[1]), "--tokens", tokens, "--expert-budget", budget,
                 "--ep", "2"]) != 0
    assert "--expert-budget does not run with --ep" in capsys.readouterr().err
    # moec generate / serve take --device and --expert-source; a CPU artifact on cuda is
    # refused in the command line's words
    assert main(["generate", str(qwen[1]), "--prompt-ids", "1 2 3", "--max-new-tokens", "2",
                 "--device", "cuda", "--expert-budget", budget]) != 0
    assert "run it with --device cpu" in capsys.readouterr().err
    assert main(["generate", str(qwen[1]), "--prompt-ids", "1 2 3", "--max-new-tokens", "2",
                 "--expert-budget", budget, "--expert-source", "disk"]) == 0
    assert "[experts] hit rate" in capsys.readouterr().err


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_experts_offload_bitwise(tmp_path, quantize):
    """Weight-only int8/int4 experts (their packed weights and per-expert scales) offload
    like float ones: bitwise the resident quantized model, at one layer's top-k experts."""
    _, path = compile_family("qwen3_moe", tmp_path, quantize=quantize)
    resident = moec.load(path)
    probe = moec.load(path, expert_budget=1 << 40).step_model.expert_cache
    assert any(".scale@" in n for n in probe.expert_params)  # offloaded with their weights
    small = moec.load(path, expert_budget=probe.min_budget)
    prompts = _prompts()[:3]
    want = [o.token_ids for o in resident.generate(prompts, max_new_tokens=6, ignore_eos=True)]
    got = small.generate(prompts, max_new_tokens=6, ignore_eos=True)
    assert [o.token_ids for o in got] == want
    ids = np.array(_prompts()[3])
    assert np.array_equal(small(ids), resident(ids))
    assert small.step_model.expert_cache.stats.evictions > 0
