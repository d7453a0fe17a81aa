"""Build: lower the graph to Relax, compile it with TVM for the target, and describe the result
(signature, weights in call order, target and the CPU features the code needs)."""

from __future__ import annotations

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
    ep_plan: dict[str, Any] | None = None  # expert-parallel builds: the manifest's meta["ep"]


def signature(graph: Graph) -> dict[str, Any]:
    def spec(v):
        return {"name": v.name, "shape": [d if isinstance(d, int) else str(d) for d in v.shape],
                "dtype": tvm_dtype(v.dtype)}

    return {"inputs": [spec(v) for v in graph.inputs],
            "outputs": [spec(v) for v in graph.outputs],
            "dims": {k: {"min": lo, "max": hi} for k, (lo, hi) in graph.dims.items()}}


def build(graph: Graph, target: dict[str, Any],
          tiles: dict[tuple, tuple[int, int]] | None = None,
          functions: tuple[tuple, ...] = (("main", False),), *, ep: bool = False) -> Built:
    """Lower and compile `graph` for `target`: the one build path of every artifact.

    `tiles`: tuned grouped-GEMM micro-kernel tiles (CPU; moec.codegen.tune), used by `main`'s
    kernels and, with `ep`, by the one-expert kernels of the expert-parallel functions as well
    (moec.codegen.ep), whose plan then comes back in `Built.ep_plan`. `functions`: the Relax
    functions to make from the graph (moec.codegen.lower.lower); a generation step has `main`
    and `decode` (not with `ep`)."""
    if ep and functions != (("main", False),):
        raise CodegenError("expert parallelism builds the plain forward (`main`) only")
    if target.get("kind") == "cuda":
        if ep:
            raise CodegenError("expert parallelism builds CPU artifacts only (target llvm)")
        return _build_cuda(graph, target["arch"], functions)
    if target.get("kind") != "llvm":
        raise CodegenError(f"cannot build for target {target}")
    plan = None
    if ep:
        from moec.codegen.ep import lower_ep  # noqa: PLC0415  (ep imports this module)

        lowered, ep_plan = lower_ep(graph, tiles=tiles)
        plan = ep_plan.to_json()
    else:
        lowered = lower(graph, tiles=tiles, functions=functions)
    tgt = host_target()
    if env.debug_level() >= 3:
        print(lowered.mod.script())
    try:
        ex = tvm.compile(lowered.mod, target=tgt)
    except Exception as e:  # TVM's own errors are long C++ traces; keep the first lines
        raise CodegenError(f"TVM failed to build the kernels: {str(e).splitlines()[0]}") from e
    # the CPU features the code needs are derived from mcpu when the Artifact is made
    info = {"kind": "llvm", "mcpu": str(tgt.attrs.get("mcpu", "generic"))}
    return Built(ex, {n: lowered.params[n] for n in lowered.param_names}, signature(graph),
                 info, lowered.kernels, lowered.experts, plan)


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
