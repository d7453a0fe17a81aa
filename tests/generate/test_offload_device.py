"""The GPU tier of expert offload (moec/runtime/expert_store.py DeviceStore over
moec/runtime/cuda_driver.py), run here without a GPU: the driver binding is loaded against an
emulation of the CUDA calls over host memory (fake_libcuda.c, beside this file), where device
addresses are host addresses, unmapped granules read as NaN, and every call checks the
preconditions the CUDA documentation states. The CPU kernels of a generation artifact then read
the experts exactly where a GPU's would: in reserved address ranges with memory mapped only
under resident experts.

What a GPU adds (timing, the real driver's behaviour) is checked by benchmarks/gpu_check.py when
a GPU machine is lent."""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from families import compile_family
from test_offload import NEW, _prompts

import moec
from moec.errors import ExecutionError, InputError
from moec.runtime import expert_cache
from moec.runtime.cache_policy import POLICIES
from moec.runtime.cache_replay import policy_hit_rate
from moec.runtime.cuda_driver import _SIGNATURES, CudaDriver, CUmemAccessDesc, CUmemAllocationProp

HERE = Path(__file__).parent
CUDA_H = Path("/usr/local/cuda/include/cuda.h")
GRANULE = 4096  # the emulation's granularity here: experts of the test models share granules


@pytest.fixture(scope="module")
def fake_lib(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the CUDA driver emulation")
    out = tmp_path_factory.mktemp("fakecuda") / "libfakecuda.so"
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(out),
                    str(HERE / "fake_libcuda.c")], check=True, capture_output=True)
    lib = ctypes.CDLL(str(out))
    for f in ("fake_live_bytes", "fake_peak_bytes", "fake_mapped_bytes",
              "fake_peak_mapped_bytes", "fake_host_bytes"):
        getattr(lib, f).restype = ctypes.c_size_t
    lib.fake_syncs.restype = ctypes.c_long
    lib.fake_set_granularity.argtypes = [ctypes.c_size_t]
    assert lib.fake_set_granularity(GRANULE) == 0
    return str(out), lib


def _driver(fake_lib):
    return CudaDriver(0, lib=fake_lib[0])


# ---------------------------------------------------------------------------- the binding


@pytest.mark.skipif(not CUDA_H.is_file(), reason="no CUDA toolkit headers (cuda.h)")
def test_the_binding_matches_cuda_h(tmp_path):
    """The ctypes structures have cuda.h's sizes and field offsets, and every function the
    binding calls is declared there with as many parameters as the binding passes."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    src = tmp_path / "layout.c"
    src.write_text("#include <cuda.h>\n#include <stdio.h>\n#include <stddef.h>\nint main(void){"
                   'printf("%zu %zu %zu %zu %zu\\n", sizeof(CUmemAllocationProp), '
                   "offsetof(CUmemAllocationProp, location), "
                   "offsetof(CUmemAllocationProp, win32HandleMetaData), "
                   "offsetof(CUmemAllocationProp, allocFlags), sizeof(CUmemAccessDesc));}\n")
    exe = tmp_path / "layout"
    subprocess.run([cc, f"-I{CUDA_H.parent}", "-o", str(exe), str(src)], check=True,
                   capture_output=True)
    got = [int(v) for v in subprocess.run([str(exe)], check=True, capture_output=True,
                                          text=True).stdout.split()]
    assert got == [ctypes.sizeof(CUmemAllocationProp), CUmemAllocationProp.location.offset,
                   CUmemAllocationProp.win32HandleMetaData.offset,
                   CUmemAllocationProp.allocFlags.offset, ctypes.sizeof(CUmemAccessDesc)]
    header = CUDA_H.read_text()
    for name, args in _SIGNATURES.items():
        base = name.removesuffix("_v2")  # cuda.h declares cuX and #defines it as cuX_v2
        if base != name:
            assert re.search(rf"#define {base}\s+(__CUDA_API_PT\w+\()?{name}\b", header), name
        m = re.search(rf"CUresult CUDAAPI {base}\(([^)]*)\);", header)
        assert m, f"{base} is not declared in cuda.h"
        params = [p for p in m.group(1).split(",") if p.strip() and p.strip() != "void"]
        assert len(params) == len(args), name


def test_the_binding_reports_driver_errors_by_name(fake_lib):
    d = _driver(fake_lib)
    base = d.reserve(4 * d.granularity)
    host = d.host_alloc(64)
    try:
        with pytest.raises(ExecutionError, match="cuMemcpyHtoDAsync_v2 failed: an illegal "
                                                 "memory access"):
            d.copy_to_device(base, host, 64)  # nothing mapped there
        h = d.create(d.granularity)
        with pytest.raises(ExecutionError, match="cuMemMap failed: invalid argument"):
            d.map(base + 1, d.granularity, h)  # misaligned
        d.release(h)
    finally:
        d.free_host(host)
        d.free_address(base, 4 * d.granularity)
    with pytest.raises(ExecutionError, match="needs the NVIDIA driver"):
        CudaDriver(0, lib="/nonexistent/libcuda.so.1")
    with pytest.raises(ExecutionError, match="cuDeviceGet failed: invalid device ordinal"):
        CudaDriver(3, lib=fake_lib[0])


# ---------------------------------------------------------------------------- the store

E, ROWS, COLS = 8, 12, 20  # 960-byte experts: several share each 4 KiB granule


def _cache_policy_tests():
    """tests/runtime/test_cache_policy.py: its synthetic routing (skewed, sticky) and weights
    files."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_cache_policy_tests", HERE.parent / "runtime" / "test_cache_policy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def weights_file(tmp_path):
    return _cache_policy_tests().write_weights(tmp_path, E, ROWS, COLS)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("budget_granules", [4, 5, 8, 16])
def test_device_store_holds_the_right_bytes_within_the_budget(fake_lib, weights_file, policy,
                                                              budget_granules):
    """Through fetches under skewed sticky routing: every expert a layer needs reads as the
    file's bytes at its device address; memory is mapped only under resident experts (the
    rest reads as poison); the device memory mapped and allocated stays within the budget;
    the hit rate is the replay of the cache's own policy with the store's charges."""
    from moec.runtime.expert_cache import ExpertCache
    from moec.runtime.expert_store import DeviceStore
    from moec.runtime.weights import _header

    path, tensors = weights_file
    lib = fake_lib[1]
    header, start, _ = _header(path)
    offload = {"layers": [{"layer": la, "num_experts": E, "k": 2, "params": [f"l{la}.w"]}
                          for la in range(3)]}
    spans = {f"l{la}.w": tuple(start + int(o) for o in header[f"l{la}.w"]["data_offsets"])
             for la in range(3)}
    store = DeviceStore(_driver(fake_lib), path, spans)
    assert lib.fake_live_bytes() == 0
    lib.fake_reset_peaks()
    cache = ExpertCache(path, header, start, offload, budget_granules * GRANULE, policy=policy,
                        trace=True, store=store)
    try:
        dev = {name: np.frombuffer((ctypes.c_float * (E * ROWS * COLS)).from_address(
            store._weights[name].base), np.float32).reshape(E, ROWS, COLS) for name in spans}
        for layer, ids in _cache_policy_tests().routing_trace(3, E, 2, 60, skew=1.0, stick=0.4, seed=2):
            cache.fetch(layer, np.array(ids), None)
            assert cache.used <= cache.budget
            assert lib.fake_mapped_bytes() <= cache.used
            for e in ids:
                assert np.array_equal(dev[f"l{layer}.w"][e], tensors[f"l{layer}.w"][e])
            resident = {key for key, ex in cache.experts.items() if ex.state == "in"}
            for la, e in cache.experts:  # an expert no granule of which is
                # mapped for another resident expert reads as poison
                if (la, e) not in resident and not any(
                        (la, o) in resident and abs(o - e) * ROWS * COLS * 4 < 2 * GRANULE
                        for o in range(E)):
                    assert np.isnan(dev[f"l{la}.w"][e]).all()
        assert lib.fake_peak_mapped_bytes() <= cache.budget
        assert lib.fake_peak_bytes() <= cache.budget  # physical granules made, reuse included
        s = cache.stats.summary()
        sizes = {key: ex.charge for key, ex in cache.experts.items()}
        assert policy_hit_rate(cache.trace, cache.budget, sizes, policy=policy,
                               num_experts=dict.fromkeys(range(3), E),
                               k=dict.fromkeys(range(3), 2)) == pytest.approx(s["hit_rate"])
        assert s["bytes_read"] == s["loads"] * ROWS * COLS * 4
    finally:
        cache.close()
    assert lib.fake_live_bytes() == 0 and lib.fake_mapped_bytes() == 0  # all given back


def test_device_store_under_concurrent_loads_and_evictions(fake_lib, weights_file):
    """Threads loading and evicting experts that share granules (the cache's readers and its
    prefetcher do this): each thread's expert always reads as the file's bytes after its load,
    no call breaks a driver precondition, and everything is given back at the end."""
    import threading

    from moec.runtime.expert_store import DeviceStore
    from moec.runtime.weights import _header

    path, tensors = weights_file
    lib = fake_lib[1]
    header, start, _ = _header(path)
    lo, hi = (start + int(o) for o in header["l0.w"]["data_offsets"])
    store = DeviceStore(_driver(fake_lib), path, {"l0.w": (lo, hi)})
    n = ROWS * COLS * 4
    dev = np.frombuffer((ctypes.c_float * (E * ROWS * COLS)).from_address(
        store._weights["l0.w"].base), np.float32).reshape(E, ROWS, COLS)
    errors: list = []

    def work(e: int) -> None:
        try:
            for _ in range(200):
                store.load([(lo + e * n, n)])
                if not np.array_equal(dev[e], tensors["l0.w"][e]):
                    errors.append(f"expert {e} wrong after its load")
                store.evict([(lo + e * n, n)])
        except Exception as err:  # a broken precondition: the driver's error
            errors.append(repr(err))

    threads = [threading.Thread(target=work, args=(e,)) for e in range(E)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert lib.fake_mapped_bytes() == 0 and store._mapped == {}
    store.close()
    assert lib.fake_live_bytes() == 0


def test_each_expert_is_charged_the_granules_it_touches(fake_lib, weights_file):
    from moec.runtime.expert_store import DeviceStore
    from moec.runtime.weights import _header

    path, _ = weights_file
    header, start, _ = _header(path)
    lo, hi = (start + int(o) for o in header["l0.w"]["data_offsets"])
    store = DeviceStore(_driver(fake_lib), path, {"l0.w": (lo, hi)})
    try:
        n = ROWS * COLS * 4
        for e in range(E):
            first, last = e * n // GRANULE, ((e + 1) * n - 1) // GRANULE
            assert store.charge([(lo + e * n, n)]) == (last - first + 1) * GRANULE
    finally:
        store.close()


# ---------------------------------------------------------------------------- the model


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return compile_family("qwen3_moe", tmp_path_factory.mktemp("offload_device"))


@pytest.fixture(scope="module")
def resident(qwen):
    lm = moec.load(qwen[1])
    toks = [o.token_ids for o in lm.generate(_prompts(), max_new_tokens=NEW, ignore_eos=True)]
    ids = np.array(_prompts()[3])
    return toks, ids, lm(ids)


@pytest.fixture
def device_tier(fake_lib, monkeypatch):
    """moec.load's offload path with the device tier (on the emulated driver) on this CPU."""
    monkeypatch.setattr(expert_cache, "device_driver", lambda dev: _driver(fake_lib))
    return fake_lib[1]


def _max_charge(path) -> int:
    lm = moec.load(path, expert_budget=1 << 40)
    return max(ex.charge for ex in lm.step_model.expert_cache.experts.values())


@pytest.mark.parametrize("experts,policy,prefetch", [
    (2, "lru", False), (3, "adaptive", True), (5, "lfu", False), (16, "adaptive", False)])
def test_device_tier_is_bitwise_the_resident_model(qwen, resident, device_tier, experts,
                                                   policy, prefetch):
    """Generation through the device tier gives the resident model's tokens and logits, bit
    for bit, from a budget of one layer's top-2 experts up; the emulated device never holds
    more expert memory than the budget."""
    toks, ids, logits = resident
    budget = experts * _max_charge(qwen[1])
    device_tier.fake_reset_peaks()
    lm = moec.load(qwen[1], expert_budget=budget, expert_policy=policy, prefetch=prefetch)
    cache = lm.step_model.expert_cache
    assert type(cache.store).__name__ == "DeviceStore"
    outs = lm.generate(_prompts(), max_new_tokens=NEW, ignore_eos=True)
    assert [o.token_ids for o in outs] == toks
    assert np.array_equal(lm(ids), logits)
    assert device_tier.fake_peak_bytes() <= budget
    assert device_tier.fake_peak_mapped_bytes() <= budget
    if cache.stats.evictions:
        assert device_tier.fake_syncs() > 0  # the device finished before memory was unmapped
    s = cache.stats.summary()
    assert s["loads"] > 0 and s["bytes_read"] > 0


@pytest.mark.parametrize("prefetch", [False, True])
def test_device_tier_reads_misses_from_disk(qwen, resident, device_tier, prefetch):
    """expert_source="disk": no host copy of the experts, each miss read from the weights file
    through a pinned staging buffer per loading thread; bitwise the resident model."""
    from moec.runtime.expert_store import STAGING

    toks, ids, logits = resident
    budget = 3 * _max_charge(qwen[1])
    host0 = device_tier.fake_host_bytes()
    lm = moec.load(qwen[1], expert_budget=budget, expert_source="disk", prefetch=prefetch)
    store = lm.step_model.expert_cache.store
    assert store.from_disk and all(w.host == 0 for w in store._order)
    outs = lm.generate(_prompts(), max_new_tokens=NEW, ignore_eos=True)
    assert [o.token_ids for o in outs] == toks
    assert np.array_equal(lm(ids), logits)
    assert lm.step_model.expert_cache.stats.evictions > 0
    # pinned host memory: staging buffers only (the readers, the prefetcher, the caller)
    assert device_tier.fake_host_bytes() - host0 <= (expert_cache.READERS + 2) * STAGING


def test_expert_source_is_checked(qwen):
    with pytest.raises(InputError, match="expert_source='host' is for GPUs"):
        moec.load(qwen[1], expert_budget="1GB", expert_source="host")
    with pytest.raises(InputError, match="expert_source='ram'"):
        moec.load(qwen[1], expert_budget="1GB", expert_source="ram")


def test_the_gpu_checks_of_the_tier_run_on_the_emulation(fake_lib, device_tier, qwen,
                                                        tmp_path):
    """benchmarks/gpu_offload.py, which gpu_check.py runs on a GPU machine, passes here on the
    emulated driver (smaller experts, the same sharing of granules)."""
    import sys

    sys.path.insert(0, str(HERE.parent.parent / "benchmarks"))
    import gpu_offload

    report: list = []
    gpu_offload.check_store(report, _driver(fake_lib), rows=24, cols=40, tokens=20)
    assert report[-1]["ok"] and report[-1]["wrong_experts"] == 0
    assert report[-1]["evictions"] > 0
    # the artifacts' check, on a bundle holding this CPU artifact and a step schedule
    from gpu_paged import run_steps, save_schedule, step_schedule

    paged = tmp_path / "paged"
    paged.mkdir()
    (paged / "qwen3_moe_float32.moec").symlink_to(qwen[1])
    model = moec.runtime.load(qwen[1])
    steps, nb = step_schedule(model.geometry.vocab_size, model.geometry.block_size,
                              max_tokens=16, prompts=(37, 20, 90), new_tokens=(6, 6, 3))
    save_schedule(paged / "qwen3_moe_float32.npz", steps, nb, run_steps(model, steps, nb))
    gpu_offload.check_artifacts(tmp_path, report, device="cpu")
    assert report[-1]["ok"] and report[-1]["evictions"] > 0
