"""fuse-gating: router matmul + scoring + top-k (+ renormalisation) -> one moe.router op.

Run after canonicalize. Requires: a router written as core.linear (weight a parameter, optional bias)
followed by either softmax|sigmoid -> topk [-> div by sum] (order=score_topk) or topk -> softmax
(order=topk_score). Ensures: the router's top-k weights and ids come from moe.router; the
softmax/topk nodes are erased when nothing else uses them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from moec.ir.graph import Graph, Node, Value
from moec.passes.base import Pass, PassContext, register_pass
from moec.passes.rewriter import P, Rewriter, RewritePattern, apply_patterns, match

_ROUTER_LOGITS = P.op("core.linear", P.any("x"), P.param("w"), P.rest(), name="logits")


def _router_operands(m: dict) -> tuple[list, dict]:
    """Operands and bias attributes of the router fused from the matched linear."""
    lin = m["logits.node"]
    if len(lin.operands) == 3:
        return [m["x"], m["w"], lin.operands[2]], {"logit_bias": True}
    return [m["x"], m["w"]], {}


def _renorm_of(vals: Value) -> Node | None:
    """The div node of `vals / sum(vals, axis=-1, keepdim=True)`, if vals feed exactly that."""
    users = vals.users()
    if len(users) != 2:
        return None
    div = next((u for u in users if u.op == "core.div"), None)
    s = next((u for u in users if u.op == "core.sum"), None)
    if div is None or s is None or div.operands[0] is not vals or div.operands[1] is not s.result:
        return None
    if s.attrs["axis"] not in (-1, vals.type.rank - 1) or not s.attrs["keepdim"]:
        return None
    return div


class ScoreThenTopK(RewritePattern):
    """topk(softmax|sigmoid(linear(x, @w))) [/ sum] -> moe.router{order=score_topk}."""

    def match_and_rewrite(self, node: Node, rw: Rewriter) -> bool:
        m = match(P.op("core.topk", P.op(("core.softmax", "core.sigmoid"), _ROUTER_LOGITS,
                                         name="scores")), node)
        if m is None or m["x"].type.rank != 2:
            return False
        scores = m["scores.node"]
        if scores.op == "core.softmax" and scores.attrs["axis"] not in (-1, 1):
            return False
        vals, ids = node.results
        div = _renorm_of(vals)
        attrs = {"k": node.attrs["k"], "scoring": scores.op.split(".")[1],
                 "order": "score_topk", "norm_topk": div is not None}
        operands, bias = _router_operands(m)
        router = rw.create("moe.router", operands, {**attrs, **bias}, loc=m["logits.node"].loc)
        w, i = router.results
        if div is not None:
            rw.replace_all_uses(div.result, w)
        else:
            rw.replace_all_uses(vals, w)
        rw.replace_all_uses(ids, i)
        return True


class TopKThenSoftmax(RewritePattern):
    """softmax(topk(linear(x, @w)).values) -> moe.router{order=topk_score}."""

    def match_and_rewrite(self, node: Node, rw: Rewriter) -> bool:
        m = match(P.op("core.softmax", P.op("core.topk", _ROUTER_LOGITS, name="topk", result=0)),
                  node)
        if m is None or m["x"].type.rank != 2 or node.attrs["axis"] not in (-1, 1):
            return False
        topk = m["topk.node"]
        attrs = {"k": topk.attrs["k"], "scoring": "softmax", "order": "topk_score"}
        operands, bias = _router_operands(m)
        router = rw.create("moe.router", operands, {**attrs, **bias}, loc=m["logits.node"].loc)
        rw.replace_all_uses(node.result, router.results[0])
        rw.replace_all_uses(topk.results[1], router.results[1])
        return True


@register_pass
@dataclass(frozen=True)
class FuseGating(Pass):
    """Fuse router linear + softmax/sigmoid + top-k + renormalisation into one moe.router op."""

    name: ClassVar[str] = "fuse-gating"

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        return apply_patterns(graph, [ScoreThenTopK(), TopKThenSoftmax()])
