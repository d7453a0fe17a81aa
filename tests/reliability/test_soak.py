"""The short CI version of benchmarks/soak.py: 300 calls with varying token counts (numpy and
torch inputs, and refused bad inputs) leave resident memory within the bound."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from .conftest import Demo

SOAK = Path(__file__).resolve().parents[2] / "benchmarks" / "soak.py"


def _soak_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("moec_soak", SOAK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_short_soak_keeps_memory_flat(demo: Demo) -> None:
    r = _soak_module().soak(demo.model, calls=300, bound_mb=8.0, seed=1)
    assert r["refused_bad_inputs"] == 6
    assert r["ok"], f"RSS grew by {r['rss_growth_mb']:.2f} MiB over {r['calls']} calls: {r}"
