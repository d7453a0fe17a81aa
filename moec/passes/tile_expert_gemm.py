"""tile-expert-gemm: expert MLPs over the tile layout -> grouped GEMMs with fused epilogues.

`moe.expert_ffn(moe.permute(x, sids), tiles, W...)` becomes two `moe.grouped_matmul`s: the first
gathers token rows itself (the permute is folded in) and computes gate and up projections in one
GEMM with the activation fused (`silu_mul`: silu(x Wg^T) * (x Wu^T)); the second is the down
projection over the sorted rows.

Run after reorder-dispatch. Requires: the expert_ffn input produced by moe.permute. Ensures: no
moe.expert_ffn left; the permuted copy of x is gone when nothing else reads it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from moec.ir.graph import Graph, Node
from moec.passes.base import Pass, PassContext, register_pass
from moec.passes.rewriter import P, Rewriter, RewritePattern, apply_patterns, match


class GroupedGemmFromFfn(RewritePattern):
    def match_and_rewrite(self, node: Node, rw: Rewriter) -> bool:
        m = match(P.op("moe.expert_ffn", P.op("moe.permute", P.any("x"), P.any("sids"),
                                              name="xs"), P.rest()), node)
        if m is None:
            return False
        _, tiles, *weights = node.operands
        a = node.attrs
        k = m["xs.node"].attrs["top_k"]
        common = {"block_m": a["block_m"]}
        if a["gated"]:
            gate, up, down = weights
            first = [m["x"], gate, up, m["sids"], tiles]
            act = a["activation"] + "_mul"
        else:
            up, down = weights
            first = [m["x"], up, m["sids"], tiles]
            act = a["activation"]
        h = rw.create("moe.grouped_matmul", first,
                      {**common, "top_k": k, "gather": True, "activation": act},
                      loc=node.loc).result
        y = rw.create("moe.grouped_matmul", [h, down, m["sids"], tiles],
                      {**common, "top_k": k, "gather": False, "activation": "none"},
                      loc=node.loc).result
        rw.replace_op(node, [y])
        return True


@register_pass
@dataclass(frozen=True)
class TileExpertGemm(Pass):
    """Expert MLPs -> grouped GEMMs over tiles; gate+up in one GEMM with SiLU*mul fused."""

    name: ClassVar[str] = "tile-expert-gemm"

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        return apply_patterns(graph, [GroupedGemmFromFfn()])
