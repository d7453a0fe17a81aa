"""reorder-dispatch: route tokens through an expert-sorted, tile-aligned layout.

Rewrites `moe.experts(x, w, ids, W...)` into `moe.align` (counting sort of the T*k slots by
expert into tiles of `block_m` rows), `moe.permute` (gather rows into that order),
`moe.expert_ffn` (each tile through its expert) and a weighted sum in token order
(`moe.unpermute`, `core.mul`, `core.sum`; fuse-combine fuses those). Expert biases and the
activation's attributes carry over to moe.expert_ffn. With `weight_on=input` (Llama 4: the routing
weight scales the expert's input) each permuted row is multiplied by its slot's weight (a second
`moe.permute` of the weights with top_k=1) and the per-slot outputs are summed unweighted.
With identity (zero-computation) experts (`identity_experts=Z`, LongCat-Flash) moe.align leaves
their slots out of the layout (slot_row -1) and the sum is a `moe.combine(y, w, slot_row, x)`
at once, which adds `w * x` for those slots (the unfused chain has no form for that choice).

Run after fuse-gating. Requires: moe.experts with ids i32[T, k]. Ensures: no moe.experts left;
every tile of the sorted layout belongs to one expert."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from moec.errors import PassError
from moec.ir.graph import Graph, Node, Value
from moec.ir.moe_ops import ACT_ATTRS
from moec.passes.base import Pass, PassContext, register_pass
from moec.passes.rewriter import RewritePattern, Rewriter, apply_patterns


@dataclass(frozen=True)
class DispatchExperts(RewritePattern):
    block_m: int

    def match_and_rewrite(self, node: Node, rw: Rewriter) -> bool:
        if node.op != "moe.experts":
            return False
        x, w, ids, *weights = node.operands
        a = node.attrs
        k = ids.type.shape[1]
        n_exp = weights[-1].type.shape[0]
        loc = node.loc
        ident = a["identity_experts"]
        align = {"num_experts": n_exp, "block_m": self.block_m}
        if ident:
            align["identity_experts"] = ident
        sids, tiles, slot_row = rw.create("moe.align", [ids], align, loc=loc).results
        xs = rw.create("moe.permute", [x, sids], {"top_k": k}, loc=loc).result
        if a["weight_on"] == "input":  # each slot's row is scaled before its expert (Llama 4)
            ws = rw.create("moe.permute", [_as(rw, _reshape(rw, w, [-1, 1], loc), x.dtype, loc),
                                           sids], {"top_k": 1}, loc=loc).result
            xs = rw.create("core.mul", [xs, ws], loc=loc).result
        ffn_attrs = {name: a[name] for name in ("activation", "gated", "bias", *ACT_ATTRS)}
        ys = rw.create("moe.expert_ffn", [xs, tiles, *weights],
                       {"block_m": self.block_m, **ffn_attrs}, loc=loc).result
        if ident:  # weight_on=output (the verifier's rule)
            out = rw.create("moe.combine", [ys, w, slot_row, x], loc=loc).result
            rw.replace_op(node, [out])
            return True
        per_slot = rw.create("moe.unpermute", [ys, slot_row], loc=loc).result
        if a["weight_on"] == "output":
            w3 = _as(rw, _reshape(rw, w, [-1, k, 1], loc), x.dtype, loc)
            per_slot = rw.create("core.mul", [per_slot, w3], loc=loc).result
        out = rw.create("core.sum", [per_slot], {"axis": 1, "keepdim": False}, loc=loc).result
        rw.replace_op(node, [out])
        return True


def _reshape(rw: Rewriter, v: Value, shape: list[int], loc: str | None) -> Value:
    return rw.create("core.reshape", [v], {"shape": shape}, loc=loc).result


def _as(rw: Rewriter, v: Value, dtype: str, loc: str | None) -> Value:
    return v if v.dtype == dtype else rw.create("core.cast", [v], {"dtype": dtype}, loc=loc).result


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
