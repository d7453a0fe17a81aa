"""The LLVM CPU target moec compiles for, and the CPU features the generated code relies on."""

from __future__ import annotations

import functools
import os

import tvm
from tvm.target import codegen

# LLVM feature name -> /proc/cpuinfo flag name. Only features that LLVM may use when it targets
# `mcpu=<this cpu>` for float/int kernels are listed; the runtime refuses an artifact whose list is
# not a subset of the flags of the machine that loads it.
_LLVM_TO_CPUINFO: dict[str, str] = {
    "sse4.2": "sse4_2",
    "avx": "avx",
    "avx2": "avx2",
    "fma": "fma",
    "f16c": "f16c",
    "bmi2": "bmi2",
    "avx512f": "avx512f",
    "avx512bw": "avx512bw",
    "avx512dq": "avx512dq",
    "avx512vl": "avx512vl",
    "avx512vnni": "avx512_vnni",
    "avx512bf16": "avx512_bf16",
    "avx512fp16": "avx512_fp16",
}


def _default_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def host_target(num_cores: int | None = None) -> tvm.target.Target:
    """The LLVM target of this machine's CPU.

    `mcpu` comes from `llvm_get_system_cpu()`: "native" is rejected by TVM (it silently falls back
    to generic x86-64, 7x slower), and a hard-coded newer CPU name emits instructions this CPU may
    not have. `num_cores` defaults to the CPUs this process may run on."""
    cores = num_cores if num_cores is not None else _default_cores()
    return tvm.target.Target(
        {"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(), "num-cores": int(cores)}
    )


@functools.cache
def host_cpu_features() -> list[str]:
    """The /proc/cpuinfo flags that code compiled for `host_target()` may use, e.g.
    `["avx", "avx2", "bmi2", "f16c", "fma", "sse4_2"]` on Zen 3."""
    target = host_target(1)
    return sorted(
        flag
        for feature, flag in _LLVM_TO_CPUINFO.items()
        if codegen.llvm_cpu_has_features([feature], target)
    )
