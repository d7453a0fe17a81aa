"""offload-experts: a `moe.expert_fetch` hook between each MoE layer's routing and its dispatch.

`moe.align(ids)` becomes `moe.align(moe.expert_fetch(ids, x))`, with x the layer's input (the
router's operand) and the layers numbered in graph order. The op is the identity on ids; what it
marks is the moment a runtime that keeps only some experts in memory must have the layer's
routed experts resident (moec.runtime.expert_cache loads the missing ones there, and predicts
the next layer's experts from x for its prefetch). Lowered for a fully resident model it is
nothing at all; the kernels never change. In a layer with identity (zero-computation) experts,
ids from `num_experts` on name them: they have no weights and the cache leaves them out.

Run after reorder-dispatch (and fuse-gating, so that x is the router's input). Requires:
moe.align fed by router ids. Ensures: every moe.align reads a moe.expert_fetch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from moec.ir.graph import Graph
from moec.passes.base import Pass, PassContext, register_pass
from moec.passes.rewriter import Rewriter


@register_pass
@dataclass(frozen=True)
class OffloadExperts(Pass):
    """Insert moe.expert_fetch before each moe.align (the expert cache's hook)."""

    name: ClassVar[str] = "offload-experts"

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        rw = Rewriter(graph)
        changed = False
        layer = 0
        for node in list(graph.nodes):
            if node.op != "moe.align":
                continue
            ids = node.operands[0]
            prod = ids.producer
            if prod is not None and prod.op == "moe.expert_fetch":
                layer += 1
                continue
            if prod is None or prod.op != "moe.router":
                continue  # not routed by a router op: nothing to predict from
            x = prod.operands[0]
            fetch = rw.create("moe.expert_fetch", [ids, x],
                              {"layer": layer, "num_experts": node.attrs["num_experts"]},
                              loc=node.loc, before=node).result
            align = rw.create("moe.align", [fetch], node.attrs, loc=node.loc, before=node)
            rw.replace_op(node, align.results)
            layer += 1
            changed = True
        return changed
