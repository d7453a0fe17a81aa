"""canonicalize: remove no-op casts and reshapes, fold double negation, drop dead nodes and
unused parameters.

Run first and last in every pipeline. Requires: verified IR. Ensures: no core.cast to the same
dtype, no core.reshape to the same shape, no node whose results are unused."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from moec.ir.graph import Graph, Node
from moec.ir.types import same_type
from moec.passes.base import Pass, PassContext, register_pass
from moec.passes.rewriter import P, RewritePattern, Rewriter, apply_patterns, match


class DropIdentity(RewritePattern):
    """cast to the same dtype / reshape to the same shape -> the operand itself."""

    def match_and_rewrite(self, node: Node, rw: Rewriter) -> bool:
        if node.op in ("core.cast", "core.reshape") and \
                same_type(node.operands[0].type, node.result.type):
            rw.replace_op(node, [node.operands[0]])
            return True
        return False


class FoldDoubleNeg(RewritePattern):
    """neg(neg(x)) -> x."""

    def match_and_rewrite(self, node: Node, rw: Rewriter) -> bool:
        m = match(P.op("core.neg", P.op("core.neg", P.any("x"))), node)
        if m is None:
            return False
        rw.replace_op(node, [m["x"]])
        return True


@register_pass
@dataclass(frozen=True)
class Canonicalize(Pass):
    """Remove no-op casts/reshapes, fold neg(neg(x)), drop dead nodes and unused parameters."""

    name: ClassVar[str] = "canonicalize"

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        changed = apply_patterns(graph, [DropIdentity(), FoldDoubleNeg()])
        rw = Rewriter(graph)
        rw.remove_unused_params()
        return changed or rw.changes > 0
