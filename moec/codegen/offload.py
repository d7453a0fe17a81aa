"""What a generation artifact records for expert offload (moec.runtime.expert_cache): which
weights hold each MoE layer's routed experts (expert e is slice e of their leading dim), and the
raw routers, so that the runtime can predict the next layer's experts from a layer's input
(pre-gating) without running the model."""

from __future__ import annotations

from typing import Any

import numpy as np

from moec.ir.graph import Graph


def offload_meta(experts: dict[int, dict[str, Any]], graph: Graph) -> dict[str, Any]:
    """manifest meta.generation.offload: per layer (in graph order) its expert count, top-k,
    the weights holding its experts, and its router's scoring."""
    routers = {n.attrs["layer"]: n.operands[0].producer for n in graph.nodes
               if n.op == "moe.expert_fetch"}
    layers = []
    for layer in sorted(experts):
        e = experts[layer]
        r = routers.get(layer)
        layers.append({"layer": layer, "num_experts": int(e["num_experts"]), "k": int(e["k"]),
                       "params": list(e["params"]),
                       "scoring": r.attrs["scoring"] if r is not None else None})
    return {"layers": layers}


def router_file(graph: Graph) -> bytes:
    """safetensors bytes: `<layer>.weight` [E, H] and, where the router has them,
    `<layer>.logit_bias` and `<layer>.select_bias` [E], all float32 (a router whose weights
    are computed rather than constant is left out: its layer is predicted from use alone)."""
    from safetensors.numpy import save

    tensors: dict[str, np.ndarray] = {}
    for node in graph.nodes:
        if node.op != "moe.expert_fetch":
            continue
        r = node.operands[0].producer
        if r is None or r.op != "moe.router":
            continue
        ops = list(r.operands[1:])
        names = ["weight"] + (["logit_bias"] if r.attrs["logit_bias"] else []) + \
            (["select_bias"] if r.attrs["select_bias"] else [])
        arrays = {}
        for name, v in zip(names, ops, strict=False):
            if v.kind != "param" or graph.param_data.get(v.name) is None:
                arrays = {}
                break
            arrays[name] = np.ascontiguousarray(graph.param_array(v), dtype=np.float32)
        for name, a in arrays.items():
            tensors[f"{node.attrs['layer']}.{name}"] = a
    return save(tensors)
