"""The host target and the CPU-feature list that the runtime compares with /proc/cpuinfo."""

from __future__ import annotations

from pathlib import Path

import pytest
from tvm.target import codegen

from moec.codegen.target import host_cpu_features, host_target


def test_host_target_uses_this_cpu():
    t = host_target(num_cores=3)
    assert t.kind.name == "llvm"
    assert str(t.attrs["mcpu"]) == codegen.llvm_get_system_cpu()
    assert int(t.attrs["num-cores"]) == 3
    assert int(host_target().attrs["num-cores"]) >= 1


def test_features_are_cpuinfo_flags_of_this_machine():
    feats = host_cpu_features()
    assert feats == sorted(set(feats))
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo")
    flags = set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    assert set(feats) <= flags, f"claimed but absent: {set(feats) - flags}"
