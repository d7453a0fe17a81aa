"""cap-topk: dynamic gating at inference: each token goes to at most `k` experts.

A router that picks its top-k experts (k above the cap) keeps only the first `k` of them, the
best ranked; the expert MLPs then run k/k_model as many rows, which is where an MoE layer spends
its time. With `renormalize=true` (the default) the kept routing weights are scaled so that they
sum to what all k_model weights summed to (the layer's output keeps its magnitude); with false
they are kept as the router computed them.

How much accuracy this costs depends on the router: a trained router is peaked (most of a
token's weight on its first expert) and loses little; a uniform router loses a lot.
benchmarks/cap_topk.py measures both, and the latency (docs/writing-passes.md, "A worked example").

When moe.router with a smaller `k` computes the capped weights exactly, only the router's `k`
changes: score-then-top-k routers with `norm_topk` when renormalising (without it when not),
top-k-then-softmax routers when renormalising, top-k-then-sigmoid ones when not. Otherwise the
router stays as it is and its weights and ids are sliced to their first `k` columns
(`core.slice`; the top-k is ordered best first), renormalised with `core.sum`, `div` and `mul`.

Run after fuse-gating, before reorder-dispatch: `default,cap-topk{k=1}@after:fuse-gating`.
Requires: moe.router nodes whose results are used only by moe.experts. Routers with a token
capacity, or whose results are used elsewhere (a graph output), are left alone and counted in
`cap-topk.skipped`. Ensures: every other moe.experts receives at most `k` experts per token;
`cap-topk.capped` counts the routers capped."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from moec.errors import PassError
from moec.ir.graph import Graph, Node, Value
from moec.passes.base import Pass, PassContext, register_pass
from moec.passes.rewriter import Rewriter


def _exact_by_attrs(a: dict, renormalize: bool) -> bool:
    """Whether moe.router with a smaller `k` computes exactly the capped weights."""
    if a["order"] == "score_topk":
        return a["norm_topk"] == renormalize  # normalised over the kept k, or not at all
    if a["order"] == "topk_score":  # softmax over the top-k logits is normalised; sigmoid isn't
        return renormalize == (a["scoring"] == "softmax")
    return False  # sparsemixer: its weights depend on the selection of both experts


def _cap(rw: Rewriter, router: Node, k: int, renormalize: bool) -> tuple[Value, Value]:
    """The capped (weights, ids) of `router`, created before its first user."""
    a = dict(router.attrs)
    loc = router.loc
    users = [u for r in router.results for u in r.users()]
    first = min(users, key=rw.graph.nodes.index)
    if _exact_by_attrs(a, renormalize):
        new = rw.create("moe.router", router.operands, {**a, "k": k}, loc=loc, before=first)
        return new.results[0], new.results[1]
    w, ids = router.results

    def op(name: str, operands: list[Value], attrs: dict | None = None) -> Value:
        return rw.create(name, operands, attrs, loc=loc, before=first).result

    cut = {"axis": 1, "start": 0, "stop": k}
    w_k, ids_k = op("core.slice", [w], cut), op("core.slice", [ids], cut)
    if renormalize:
        total = op("core.sum", [w], {"axis": 1, "keepdim": True})
        kept = op("core.sum", [w_k], {"axis": 1, "keepdim": True})
        w_k = op("core.mul", [w_k, op("core.div", [total, kept])])
    return w_k, ids_k


@register_pass
@dataclass(frozen=True)
class CapTopK(Pass):
    """Dynamic gating: cap the experts per token at k (keep each router's k best, optionally
    renormalising their weights) to trade accuracy for latency at inference."""

    name: ClassVar[str] = "cap-topk"
    k: int = 1
    renormalize: bool = True

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        if self.k < 1:
            raise PassError(f"cap-topk: k must be >= 1, got {self.k}")
        rw = Rewriter(graph)
        capped = skipped = 0
        for router in graph.find("moe.router"):
            if router.attrs["k"] <= self.k:
                continue
            users = [u for r in router.results for u in r.users()]
            outputs = any(o is r for r in router.results for o in graph.outputs)
            if router.attrs["capacity"] or outputs or not users or \
                    any(u.op != "moe.experts" for u in users):
                skipped += 1
                continue
            w, ids = _cap(rw, router, self.k, self.renormalize)
            for user in dict.fromkeys(users):  # a user of both results, once
                swap = {id(router.results[0]): w, id(router.results[1]): ids}
                operands = [swap.get(id(v), v) for v in user.operands]
                new = rw.create(user.op, operands, dict(user.attrs), loc=user.loc, before=user)
                rw.replace_op(user, new.results)
            if not router.results[0].uses and not router.results[1].uses:
                rw.erase(router)
            capped += 1
        ctx.stats["cap-topk.capped"] = capped
        if skipped:
            ctx.stats["cap-topk.skipped"] = skipped
        return rw.changes > 0
