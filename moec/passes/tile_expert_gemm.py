"""tile-expert-gemm: expert MLPs over the tile layout -> grouped GEMMs with fused epilogues.

`moe.expert_ffn(moe.permute(x, sids), tiles, W...)` becomes two `moe.grouped_matmul`s: the first
gathers token rows itself (the permute is folded in) and computes gate and up projections in one
GEMM with the activation fused (`silu_mul`: silu(x Wg^T) * (x Wu^T)); the second is the down
projection over the sorted rows.

Expert biases become the GEMMs' bias operands (gate and up biases on the first, the down bias on
the second); the clamped SwiGLU fuses as `clamped_swiglu_mul` with its alpha, limit and offset.
When the permuted rows are scaled before the experts (`weight_on=input`), the first GEMM reads
the scaled sorted rows (`gather=false`).

Run after reorder-dispatch. Requires: the expert_ffn input produced by moe.permute (or by a
core.mul of it). Ensures: no moe.expert_ffn left; the permuted copy of x is gone when nothing else
reads it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from moec.ir.graph import Graph, Node
from moec.ir.moe_ops import ACT_ATTRS, expert_operands
from moec.passes.base import Pass, PassContext, register_pass
from moec.passes.rewriter import P, RewritePattern, Rewriter, apply_patterns, match

_PERMUTED = P.op("moe.permute", P.any("x"), P.any("sids"), name="xs")


class GroupedGemmFromFfn(RewritePattern):
    def match_and_rewrite(self, node: Node, rw: Rewriter) -> bool:
        if node.op != "moe.expert_ffn":
            return False
        m = match(P.op("moe.expert_ffn", _PERMUTED, P.rest()), node)
        gather = m is not None
        if m is None:  # rows scaled after the gather (weight_on=input): GEMM on the sorted rows
            m = match(P.op("moe.expert_ffn", P.op("core.mul", _PERMUTED, P.any()), P.rest()),
                      node)
            if m is None:
                return False
        _, tiles, *operands = node.operands
        a = node.attrs
        weights, biases = expert_operands(operands, a)
        k = m["xs.node"].attrs["top_k"]
        common = {"block_m": a["block_m"], "top_k": k, "bias": a["bias"]}
        act_attrs = {name: a[name] for name in ACT_ATTRS} \
            if a["activation"] == "clamped_swiglu" else {}
        first_in = m["x"] if gather else node.operands[0]
        if a["gated"]:
            (gate, up, down), b_first = weights, biases[:2]
            first = [first_in, gate, up, *b_first, m["sids"], tiles]
            act = a["activation"] + "_mul"
        else:
            (up, down), b_first = weights, biases[:1]
            first = [first_in, up, *b_first, m["sids"], tiles]
            act = a["activation"]
        h = rw.create("moe.grouped_matmul", first,
                      {**common, "gather": gather, "activation": act, **act_attrs},
                      loc=node.loc).result
        y = rw.create("moe.grouped_matmul", [h, down, *biases[-1:], m["sids"], tiles],
                      {**common, "gather": False, "activation": "none"}, loc=node.loc).result
        rw.replace_op(node, [y])
        return True


@register_pass
@dataclass(frozen=True)
class TileExpertGemm(Pass):
    """Expert MLPs -> grouped GEMMs over tiles; gate+up in one GEMM with SiLU*mul fused."""

    name: ClassVar[str] = "tile-expert-gemm"

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        return apply_patterns(graph, [GroupedGemmFromFfn()])
