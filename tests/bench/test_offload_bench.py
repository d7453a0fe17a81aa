"""The pure parts of benchmarks/offload.py: the disk bandwidth probe (O_DIRECT, and its
pread + fadvise fallback) and the decode roofline and prefetch figures computed from rows.
(tests/generate/test_offload.py runs the whole benchmark on a tiny artifact.)"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "offload.py"
_spec = importlib.util.spec_from_file_location("offload_bench", SCRIPT)
ob = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ob)


@pytest.fixture
def weights(tmp_path):
    p = tmp_path / "weights.safetensors"
    p.write_bytes(os.urandom(3 << 20))
    return p


def test_disk_bandwidth(weights):
    d = ob.disk_bandwidth(weights, total=2 << 20, chunk=1 << 20)
    assert d["method"] in ("O_DIRECT", "pread+fadvise")
    assert d["bytes"] == 2 << 20 and d["bytes_per_s"] > 0
    small = ob.disk_bandwidth(weights, chunk=4 << 20)  # a file smaller than one chunk
    assert small["bytes"] == 3 << 20


def test_disk_bandwidth_falls_back_without_o_direct(weights, monkeypatch):
    real = os.open

    def refuse(path, flags, *a):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(22, "O_DIRECT refused")
        return real(path, flags, *a)

    monkeypatch.setattr(os, "open", refuse)
    d = ob.disk_bandwidth(weights, total=2 << 20, chunk=1 << 20)
    assert d["method"] == "pread+fadvise" and d["bytes"] == 2 << 20


def _row(fraction, budget, prefetch, tok_s, bpt=0.0, wait=0.0):
    return {"fraction": fraction, "budget": budget, "policy": "lru" if budget else "-",
            "prefetch": prefetch, "decode_tok_s": tok_s, "decode_bytes_per_token": bpt,
            "wait_s": wait}


def test_bounds():
    rows = [_row("resident", None, False, 100.0),            # 10 ms per token resident
            _row(0.5, 50, True, 20.0, bpt=4e6, wait=1.0),     # 4 MB/token at 1 GB/s: 4 ms
            _row(0.5, 50, False, 10.0, bpt=40e6, wait=4.0),   # 40 ms of I/O per token
            _row(0.25, 25, True, 5.0, bpt=1e6, wait=0.0)]     # no twin without prefetch
    ob.bounds(rows, 1e9)
    assert "roofline_s_per_token" not in rows[0]
    assert rows[1]["roofline_s_per_token"] == pytest.approx(0.010)  # compute bound
    assert rows[1]["decode_vs_roofline"] == pytest.approx(5.0)
    assert rows[2]["roofline_s_per_token"] == pytest.approx(0.040)  # I/O bound
    assert rows[2]["decode_vs_roofline"] == pytest.approx(2.5)
    assert rows[1]["prefetch_wait_removed"] == pytest.approx(0.75)
    assert "prefetch_wait_removed" not in rows[2] and "prefetch_wait_removed" not in rows[3]
