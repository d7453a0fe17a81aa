"""CPU features: what an artifact's kernels need, and what this host has.

Kernels compiled for `mcpu=znver4` use AVX-512; on a CPU without it they die with SIGILL, which
Python cannot catch. So the manifest records the instruction-set features the kernels may use
(as /proc/cpuinfo spells them) and `load` refuses an artifact whose features the host lacks.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from moec.errors import ArtifactError

# LLVM feature name -> /proc/cpuinfo flag. Only instruction-set extensions that generated
# kernels can emit are listed: tuning flags ("fast-lzcnt", "macrofusion") cannot cause SIGILL,
# and recording them would make artifacts refuse machines that run them fine.
_LLVM_TO_CPUINFO: dict[str, str] = {
    # x86
    "sse3": "pni",
    "ssse3": "ssse3",
    "sse4.1": "sse4_1",
    "sse4.2": "sse4_2",
    "popcnt": "popcnt",
    "avx": "avx",
    "avx2": "avx2",
    "fma": "fma",
    "f16c": "f16c",
    "bmi": "bmi1",
    "bmi2": "bmi2",
    "lzcnt": "abm",
    "movbe": "movbe",
    "avx512f": "avx512f",
    "avx512cd": "avx512cd",
    "avx512bw": "avx512bw",
    "avx512dq": "avx512dq",
    "avx512vl": "avx512vl",
    "avx512ifma": "avx512ifma",
    "avx512vbmi": "avx512vbmi",
    "avx512vbmi2": "avx512_vbmi2",
    "avx512vnni": "avx512_vnni",
    "avx512bitalg": "avx512_bitalg",
    "avx512vpopcntdq": "avx512_vpopcntdq",
    "avx512bf16": "avx512_bf16",
    "avx512fp16": "avx512_fp16",
    "avxvnni": "avx_vnni",
    "gfni": "gfni",
    "amx-tile": "amx_tile",
    "amx-int8": "amx_int8",
    "amx-bf16": "amx_bf16",
    # aarch64
    "neon": "asimd",
    "fullfp16": "asimdhp",
    "dotprod": "asimddp",
    "i8mm": "i8mm",
    "bf16": "bf16",
    "sve": "sve",
    "sve2": "sve2",
}

# ELF e_machine values, to refuse a kernels.so built for another architecture before dlopen.
_ELF_MACHINE = {"x86_64": 62, "amd64": 62, "aarch64": 183, "arm64": 183, "riscv64": 243}
_ELF_NAME = {62: "x86_64", 183: "aarch64", 243: "riscv64"}


@lru_cache(maxsize=1)
def host_cpu_features() -> frozenset[str] | None:
    """The flags of this host's CPU from /proc/cpuinfo, or None where there is no such file."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        # x86 says "flags", aarch64 says "Features"; every core repeats them.
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return frozenset(flags)


def missing_cpu_features(target: Mapping[str, Any]) -> list[str]:
    """The features `target["cpu_features"]` needs that this host lacks (empty when unknown)."""
    have = host_cpu_features()
    if have is None:
        return []
    return sorted(f for f in target.get("cpu_features", []) if f not in have)


def check_host_cpu(target: Mapping[str, Any]) -> None:
    """Raise ArtifactError when the kernels need CPU features that this host does not have."""
    missing = missing_cpu_features(target)
    if missing:
        mcpu = target.get("mcpu", "?")
        raise ArtifactError(
            f"the kernels were compiled for CPU {mcpu!r} and need CPU features this host lacks: "
            f"{', '.join(missing)} (not in /proc/cpuinfo flags); running them would crash with "
            f"an illegal instruction. Recompile the model on this machine (or for its CPU)."
        )


def check_elf_machine(path: Path) -> None:
    """Raise ArtifactError when `path` is an ELF library for another CPU architecture."""
    try:
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError as e:
        raise ArtifactError(f"{path.name} cannot be read ({e})") from None
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return  # not ELF (e.g. a Mach-O dylib): dlopen will judge it
    byteorder = "little" if head[5] == 1 else "big"
    machine = int.from_bytes(head[18:20], byteorder)
    want = _ELF_MACHINE.get(platform.machine().lower())
    if want is not None and machine != want:
        arch = _ELF_NAME.get(machine, f"ELF machine {machine}")
        raise ArtifactError(
            f"{path.name} is compiled for {arch}, but this host is {platform.machine()}; "
            f"recompile the model for this machine"
        )


def required_cpu_features(target: Mapping[str, Any]) -> list[str]:
    """Cpuinfo flags that code generated for `target` (kind llvm, with mcpu/mattr/mtriple)
    may use, for the manifest's `target.cpu_features`.

    Compile-time helper: it imports tvm.target, so the loading path never calls it."""
    import tvm.target  # noqa: PLC0415  (compiler module; keep it off the runtime path)

    keys = {k: target[k] for k in ("kind", "mcpu", "mattr", "mtriple") if k in target}
    llvm_features = tvm.target.codegen.llvm_get_cpu_features(tvm.target.Target(keys))
    # "+avx512f" style mattr entries are honoured by LLVM already; map what LLVM reports.
    return sorted({_LLVM_TO_CPUINFO[f] for f in llvm_features if f in _LLVM_TO_CPUINFO})
