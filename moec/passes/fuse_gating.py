"""fuse-gating: router linear + scoring + selection (+ renormalisation, scaling) -> one moe.router.

Run after canonicalize. Requires: a router written as core.linear (weight a parameter, optional
bias; casts on its input, weight or logits are looked through) followed by either
softmax|sigmoid|sqrt(softplus) -> core.topk | moe.select [-> div by sum] [-> scale]
(order=score_topk; moe.select brings a selection bias and group-limited top-k) or
core.topk -> softmax|sigmoid|sqrt(softplus) [-> scale]
(order=topk_score). Ensures: the router's top-k weights and ids come from moe.router; the
scoring/selection nodes are erased when nothing else uses them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from moec.ir.graph import Graph, Node, Value
from moec.passes.base import Pass, PassContext, register_pass
from moec.passes.rewriter import P, RewritePattern, Rewriter, apply_patterns, match

_SELECT_ATTRS = ("n_groups", "topk_groups", "group_score")


def _uncast(v: Value) -> Value:
    """Look through core.cast nodes (a bf16 router cast to f32, an f32 no-op cast)."""
    while v.producer is not None and v.producer.op == "core.cast":
        v = v.producer.operands[0]
    return v


def _router_linear(v: Value) -> tuple[list[Value], dict] | None:
    """(operands, bias attributes) of moe.router if `v` is (a cast of) linear(x, @w [, b])."""
    v = _uncast(v)
    lin = v.producer
    if lin is None or lin.op != "core.linear":
        return None
    x, w = _uncast(lin.operands[0]), _uncast(lin.operands[1])
    if w.kind != "param" or x.type.rank != 2:
        return None
    if len(lin.operands) == 3:
        return [x, w, _uncast(lin.operands[2])], {"logit_bias": True}
    return [x, w], {}


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


def _scale_of(vals: Value) -> Node | None:
    """The core.scale node that is the only user of `vals`, if any."""
    users = vals.users()
    return users[0] if len(users) == 1 and users[0].op == "core.scale" else None


def _finish(rw: Rewriter, loc: str | None, operands: list[Value], attrs: dict, weights: Value,
            ids: Value) -> bool:
    """Create the router, folding a trailing core.scale into `scale`, and rewire the uses.
    False (nothing done) unless the routing weights are f32 and the ids i32, as moe.router's."""
    if weights.dtype != "f32" or ids.dtype != "i32":
        return False
    scale = _scale_of(weights)
    if scale is not None and not any(o is weights for o in rw.graph.outputs):
        attrs["scale"] = float(scale.attrs["value"])
        weights = scale.result
    router = rw.create("moe.router", operands, attrs, loc=loc)
    rw.replace_all_uses(weights, router.results[0])
    rw.replace_all_uses(ids, router.results[1])
    return True


def _scoring(scores: Node) -> tuple[str, Value] | None:
    """(moe.router scoring, logits) of a scoring node: softmax (last axis), sigmoid, or
    sqrt(softplus(logits)) (DeepSeek-V4)."""
    if scores.op == "core.softmax":
        return ("softmax", scores.operands[0]) if scores.attrs["axis"] in (-1, 1) else None
    if scores.op == "core.sigmoid":
        return "sigmoid", scores.operands[0]
    sp = scores.operands[0].producer
    if scores.op == "core.sqrt" and sp is not None and sp.op == "core.softplus":
        return "sqrt_softplus", sp.operands[0]
    return None


_SCORES = ("core.softmax", "core.sigmoid", "core.sqrt")


class ScoreThenTopK(RewritePattern):
    """topk|select(softmax|sigmoid|sqrt(softplus)(linear(x, @w))) [/ sum] [* s] ->
    moe.router{score_topk}."""

    def match_and_rewrite(self, node: Node, rw: Rewriter) -> bool:
        m = match(P.op(("core.topk", "moe.select"), P.op(_SCORES, P.any(), name="scores"),
                       P.rest()), node)
        scoring = _scoring(m["scores.node"]) if m is not None else None
        if scoring is None:
            return False
        m["logits"] = scoring[1]
        router = _router_linear(m["logits"])
        if router is None:
            return False
        operands, attrs = router
        attrs.update(k=node.attrs["k"], scoring=scoring[0], order="score_topk")
        if node.op == "moe.select":
            attrs.update({a: node.attrs[a] for a in _SELECT_ATTRS})
            if node.attrs["select_bias"]:
                attrs["select_bias"] = True
                operands.append(node.operands[1])
        vals, ids = node.results
        div = _renorm_of(vals)
        attrs["norm_topk"] = div is not None
        return _finish(rw, _uncast(m["logits"]).producer.loc, operands, attrs,
                       div.result if div is not None else vals, ids)


class TopKThenScore(RewritePattern):
    """softmax|sigmoid|sqrt(softplus)(topk(linear(x, @w)).values) [* s] ->
    moe.router{order=topk_score}."""

    def match_and_rewrite(self, node: Node, rw: Rewriter) -> bool:
        scoring = _scoring(node) if node.op in _SCORES else None
        if scoring is None:
            return False
        m = match(P.op("core.topk", P.any("logits"), name="topk", result=0), scoring[1])
        if m is None:
            return False
        router = _router_linear(m["logits"])
        if router is None:
            return False
        operands, attrs = router
        topk = m["topk.node"]
        attrs.update(k=topk.attrs["k"], scoring=scoring[0], order="topk_score")
        return _finish(rw, _uncast(m["logits"]).producer.loc, operands, attrs, node.result,
                       topk.results[1])


@register_pass
@dataclass(frozen=True)
class FuseGating(Pass):
    """Fuse router linear + softmax/sigmoid + top-k/selection + renormalisation + scaling into
    one moe.router op."""

    name: ClassVar[str] = "fuse-gating"

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        return apply_patterns(graph, [ScoreThenTopK(), TopKThenScore()])
