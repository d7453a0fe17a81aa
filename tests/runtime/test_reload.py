"""Reloading: every load runs the code it verified (a private copy of kernels.so per load), and
a process that loads and unloads models stays flat (code unloaded, weight copies returned)."""

from __future__ import annotations

import functools
import gc
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from moec.errors import ArtifactError
from moec.runtime import load
from moec.runtime.kernels import open_kernels
from moec.runtime.manifest import FileEntry

from .tiny_models import H, build_chain_model, build_scale_model, make_artifact, reference


def _inputs(n: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    return (rng.standard_normal((n, H)).astype("float32"),
            rng.standard_normal(n).astype("float32"))


def _check(model: Any, weights: Any, offset: float) -> None:
    x, s = _inputs()
    y, z = model(x, s)
    ry, rz = reference(x, s, dict(weights), offset)
    np.testing.assert_allclose(y, ry, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(z, rz, rtol=1e-4, atol=1e-4)


def _kernel_mappings() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if "moec-kernels-" in line)


@pytest.mark.parametrize("suffix", [".moec", ".moec.tar"])
def test_save_to_one_path_and_reload_runs_the_new_code(tmp_path: Path, scale_artifact: Any,
                                                       suffix: str) -> None:
    """Compile A, save to P, load; compile B (same signature, other code and weights), save to
    P, load in the same process: the second model computes B, and the first still A."""
    path = tmp_path / f"m{suffix}"
    a = scale_artifact
    b = make_artifact(functools.partial(build_scale_model, offset=1.5, seed=3))
    a.save(path)
    model_a = load(path)
    _check(model_a, a.weights, 0.0)
    b.save(path)
    model_b = load(path)
    _check(model_b, b.weights, 1.5)  # was A's kernel with B's weights: off by 1.5 everywhere
    _check(model_a, a.weights, 0.0)  # a loaded model keeps its own code
    a.save(path)
    _check(load(path), a.weights, 0.0)


def test_unloading_a_model_unmaps_its_code(saved_path: Path) -> None:
    gc.collect()
    before = _kernel_mappings()
    model = load(saved_path)
    _check(model, _weights(saved_path), 0.0)
    assert _kernel_mappings() > before
    del model
    gc.collect()
    assert _kernel_mappings() == before


def _weights(path: Path) -> dict[str, np.ndarray]:
    from moec.runtime.weights import mapped_arrays

    return {k: np.array(v) for k, v in mapped_arrays(path / "weights.safetensors").items()}


def test_code_that_changed_after_verify_is_refused(saved_path: Path) -> None:
    entry = FileEntry("0" * 64, (saved_path / "kernels.so").stat().st_size)
    with pytest.raises(ArtifactError, match="changed after it was verified"):
        open_kernels(saved_path / "kernels.so", entry)
    longer = FileEntry(entry.sha256, entry.size - 1)
    with pytest.raises(ArtifactError, match="changed after it was verified"):
        open_kernels(saved_path / "kernels.so", longer, check_hash=False)


def _rss() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("weights", ["copy", "mmap"])
def test_load_unload_cycles_keep_memory_flat(tmp_path: Path, weights: str) -> None:
    """200 load/call/unload cycles of a model with 1 MiB of weights: resident memory may not
    grow by more than 16 MiB (copied weights used to stay in malloc's heap, about +1 MiB per
    cycle here, and every load kept its code mapped)."""
    ex, w, sig = build_chain_model()
    path = make_artifact(lambda: (ex, w, sig)).save(tmp_path / "chain.moec")
    x = np.ones((3, 256), np.float32)
    expected = x
    for i in range(len(w)):
        expected = expected @ w[f"w{i}"]

    def cycle() -> None:
        model = load(path, weights=weights)
        np.testing.assert_allclose(model(x), expected, rtol=1e-4, atol=1e-4)
        del model  # freed here: a model holds no reference cycle

    for _ in range(10):
        cycle()
    maps, before = _kernel_mappings(), _rss()
    for _ in range(200):
        cycle()
    gc.collect()
    grown = (_rss() - before) / 2**20
    assert grown < 16, f"RSS grew by {grown:.1f} MiB over 200 load/unload cycles"
    assert _kernel_mappings() == maps
