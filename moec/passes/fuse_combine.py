"""fuse-combine: weighted sum of the expert outputs back in token order -> one moe.combine.

`sum(mul(unpermute(y, slot_row), reshape(w, [-1, k, 1])), axis=1)` becomes
`moe.combine(y, w, slot_row)`: routed weight and scatter-add in one kernel, with no [T, k, H]
temporary.

Run after reorder-dispatch. Requires: that chain with routing weights of shape [T, k] (cast to
the activation dtype or not; moe.combine weighs in f32 either way).
Ensures: no moe.unpermute feeding a weighted sum."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from moec.ir.graph import Graph, Node
from moec.ir.types import same_shape
from moec.passes.base import Pass, PassContext, register_pass
from moec.passes.rewriter import P, RewritePattern, Rewriter, apply_patterns, match

_WEIGHTS = P.op("core.reshape", P.any("w"), name="w3")
# with f16/bf16 activations reorder-dispatch casts the f32 routing weights to the activation dtype
_CAST_WEIGHTS = P.op("core.cast", _WEIGHTS)


class CombineFromWeightedSum(RewritePattern):
    def match_and_rewrite(self, node: Node, rw: Rewriter) -> bool:
        m = None
        for weights in (_WEIGHTS, _CAST_WEIGHTS):
            m = match(P.op("core.sum", P.op("core.mul",
                                            P.op("moe.unpermute", P.any("y"), P.any("slot_row")),
                                            weights)), node)
            if m is not None:
                break
        if m is None or node.attrs["axis"] != 1 or node.attrs["keepdim"]:
            return False
        w = m["w"]
        if w.type.rank != 2 or not same_shape(w.type.shape, m["slot_row"].type.shape):
            return False
        out = rw.create("moe.combine", [m["y"], w, m["slot_row"]], loc=node.loc).result
        rw.replace_op(node, [out])
        return True


@register_pass
@dataclass(frozen=True)
class FuseCombine(Pass):
    """Fuse routed weighting and scatter-add back to token order into one moe.combine."""

    name: ClassVar[str] = "fuse-combine"

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        return apply_patterns(graph, [CombineFromWeightedSum()])
