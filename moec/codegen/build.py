"""Build: lower the graph to Relax, compile it with TVM for the target, and describe the result
(signature, weights in call order, target and the CPU features the code needs)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import tvm

from moec import env
from moec.codegen.lower import lower
from moec.codegen.target import host_target
from moec.errors import CodegenError
from moec.ir.graph import Graph
from moec.ir.types import tvm_dtype


@dataclass
class Built:
    executable: Any  # tvm.runtime.Executable
    weights: dict[str, np.ndarray]  # in the order `main` takes them after the inputs
    signature: dict[str, Any]
    target_info: dict[str, Any]
    kernels: list[str]
    experts: dict[int, dict[str, Any]] | None = None  # Lowered.experts


def signature(graph: Graph) -> dict[str, Any]:
    def spec(v):
        return {"name": v.name, "shape": [d if isinstance(d, int) else str(d) for d in v.shape],
                "dtype": tvm_dtype(v.dtype)}

    return {"inputs": [spec(v) for v in graph.inputs],
            "outputs": [spec(v) for v in graph.outputs],
            "dims": {k: {"min": lo, "max": hi} for k, (lo, hi) in graph.dims.items()}}


def build(graph: Graph, target: dict[str, Any],
          tiles: dict[tuple, tuple[int, int]] | None = None,
          functions: tuple[tuple, ...] = (("main", False),)) -> Built:
    """`tiles`: tuned grouped-GEMM micro-kernel tiles (CPU; moec.codegen.tune). `functions`:
    the Relax functions to make from the graph (moec.codegen.lower.lower); a generation step
    has `main` and `decode`."""
    if target.get("kind") == "cuda":
        return _build_cuda(graph, target["arch"], functions)
    if target.get("kind") != "llvm":
        raise CodegenError(f"cannot build for target {target}")
    lowered = lower(graph, tiles=tiles, functions=functions)
    tgt = host_target()
    if env.debug_level() >= 3:
        print(lowered.mod.script())
    os.environ.setdefault("TVM_NUM_THREADS", str(env.num_threads() or os.cpu_count() or 1))
    try:
        ex = tvm.compile(lowered.mod, target=tgt)
    except Exception as e:  # TVM's own errors are long C++ traces; keep the first lines
        raise CodegenError(f"TVM failed to build the kernels: {str(e).splitlines()[0]}") from e
    # the CPU features the code needs are derived from mcpu when the Artifact is made
    info = {"kind": "llvm", "mcpu": str(tgt.attrs.get("mcpu", "generic"))}
    return Built(ex, {n: lowered.params[n] for n in lowered.param_names}, signature(graph),
                 info, lowered.kernels, lowered.experts)


def _build_cuda(graph: Graph, arch: str,
                functions: tuple[tuple, ...] = (("main", False),)) -> Built:
    """CUDA kernels from moec.codegen.cuda, compiled by the local nvcc into a fatbin embedded in
    the library (no GPU and no compiler needed at load)."""
    from moec.codegen import cuda
    from moec.codegen.cuda.build import build_cuda

    lowered = lower(graph, library=cuda, functions=functions)
    try:
        ex = build_cuda(lowered.mod, arch)
    except CodegenError:
        raise
    except Exception as e:
        raise CodegenError(f"TVM/nvcc failed to build the CUDA kernels for {arch}: "
                           f"{str(e).splitlines()[0]}") from e
    return Built(ex, {n: lowered.params[n] for n in lowered.param_names}, signature(graph),
                 {"kind": "cuda", "arch": arch}, lowered.kernels, lowered.experts)
