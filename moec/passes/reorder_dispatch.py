"""reorder-dispatch: route tokens through an expert-sorted, tile-aligned layout.

Rewrites `moe.experts(x, w, ids, W...)` into `moe.align` (counting sort of the T*k slots by
expert into tiles of `block_m` rows), `moe.permute` (gather rows into that order),
`moe.expert_ffn` (each tile through its expert) and a weighted sum in token order
(`moe.unpermute`, `core.mul`, `core.sum`; fuse-combine fuses those).

Run after fuse-gating. Requires: moe.experts with ids i32[T, k]. Ensures: no moe.experts left;
every tile of the sorted layout belongs to one expert."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from moec.errors import PassError
from moec.ir.graph import Graph, Node
from moec.passes.base import Pass, PassContext, register_pass
from moec.passes.rewriter import Rewriter, RewritePattern, apply_patterns


@dataclass(frozen=True)
class DispatchExperts(RewritePattern):
    block_m: int

    def match_and_rewrite(self, node: Node, rw: Rewriter) -> bool:
        if node.op != "moe.experts":
            return False
        x, w, ids, *weights = node.operands
        k = ids.type.shape[1]
        n_exp = weights[-1].type.shape[0]
        loc = node.loc
        sids, tiles, slot_row = rw.create("moe.align", [ids],
                                          {"num_experts": n_exp, "block_m": self.block_m},
                                          loc=loc).results
        xs = rw.create("moe.permute", [x, sids], {"top_k": k}, loc=loc).result
        ys = rw.create("moe.expert_ffn", [xs, tiles, *weights],
                       {"block_m": self.block_m, "activation": node.attrs["activation"],
                        "gated": node.attrs["gated"]}, loc=loc).result
        per_slot = rw.create("moe.unpermute", [ys, slot_row], loc=loc).result
        w3 = rw.create("core.reshape", [w], {"shape": [-1, k, 1]}, loc=loc).result
        if w3.dtype != x.dtype:
            w3 = rw.create("core.cast", [w3], {"dtype": x.dtype}, loc=loc).result
        weighted = rw.create("core.mul", [per_slot, w3], loc=loc).result
        out = rw.create("core.sum", [weighted], {"axis": 1, "keepdim": False}, loc=loc).result
        rw.replace_op(node, [out])
        return True


@register_pass
@dataclass(frozen=True)
class ReorderDispatch(Pass):
    """Sort (token, slot) pairs by expert into block_m-row tiles (moe.align + moe.permute)."""

    name: ClassVar[str] = "reorder-dispatch"
    block_m: int = 32

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        if self.block_m < 1:
            raise PassError(f"reorder-dispatch: block_m must be >= 1, got {self.block_m}")
        return apply_patterns(graph, [DispatchExperts(self.block_m)])
