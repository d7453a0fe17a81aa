"""The rewrite API: `Rewriter` (all graph mutation goes through it), `RewritePattern`, a greedy
driver `apply_patterns`, and a small declarative operand-tree matcher.

    class DoubleNeg(RewritePattern):
        '''neg(neg(x)) -> x'''
        def match_and_rewrite(self, node, rw):
            m = match(P.op("core.neg", P.op("core.neg", P.any("x"))), node)
            if m is None:
                return False
            rw.replace_op(node, [m["x"]])
            return True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moec.errors import IRError
from moec.ir.builder import make_node
from moec.ir.graph import Graph, Node, Value
from moec.ir.types import TensorType, dtype_of_numpy, same_type


class Rewriter:
    """Mutates a graph while keeping use lists, topological order and a count of changes."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.changes = 0
        self.insertion_point: Node | None = None  # new nodes go before this node (None: end)

    def create(self, op: str, operands: Sequence[Value], attrs: Mapping[str, Any] | None = None,
               loc: str | None = None, before: Node | None = None,
               names: Sequence[str | None] = ()) -> Node:
        """Insert a new, type-checked node before `before` (default: the insertion point)."""
        anchor = before if before is not None else self.insertion_point
        index = self.graph.nodes.index(anchor) if anchor is not None else None
        self.changes += 1
        return make_node(self.graph, op, operands, attrs, loc, index, names)

    def replace_all_uses(self, old: Value, new: Value) -> None:
        if not same_type(old.type, new.type):
            raise IRError(f"cannot replace {old!r} with {new!r}: types differ")
        self.graph.replace_all_uses(old, new)
        self.changes += 1

    def replace_op(self, node: Node, new_values: Sequence[Value]) -> None:
        """Replace every use of node's results by `new_values`, then erase the node."""
        if len(new_values) != len(node.results):
            raise IRError(f"replace_op({node.op}): {len(node.results)} results, "
                          f"{len(new_values)} replacements")
        for old, new in zip(node.results, new_values, strict=True):
            if old is not new:
                self.replace_all_uses(old, new)
        self.erase(node)

    def erase(self, node: Node) -> None:
        self.graph.remove_node(node)
        self.changes += 1

    def add_param(self, name: str, data: np.ndarray) -> Value:
        """Add a new parameter (a constant weight) with a name not yet used."""
        base, i = name, 0
        while name in self.graph.params:
            i += 1
            name = f"{base}.{i}"
        data = np.ascontiguousarray(data)
        self.changes += 1
        return self.graph.add_param(name, TensorType(data.shape, dtype_of_numpy(data.dtype)), data)

    def remove_unused_params(self) -> None:
        for name, v in list(self.graph.params.items()):
            if not v.uses:
                self.graph.remove_param(name)
                self.changes += 1


class RewritePattern:
    """A local rewrite. `match_and_rewrite` returns True if it changed the graph (through rw)."""

    def match_and_rewrite(self, node: Node, rw: Rewriter) -> bool:
        raise NotImplementedError


def eliminate_dead_code(graph: Graph, rw: Rewriter | None = None) -> int:
    """Erase nodes none of whose results is used (every op is pure). Returns how many."""
    rw = rw or Rewriter(graph)
    live = set(graph.outputs)
    erased = 0
    for node in reversed(list(graph.nodes)):
        if any(r in live or r.uses for r in node.results):
            live.update(node.operands)
        else:
            rw.erase(node)
            erased += 1
    return erased


def apply_patterns(graph: Graph, patterns: Sequence[RewritePattern],
                   max_iterations: int = 20) -> bool:
    """Apply patterns greedily, node by node, until nothing matches (a fixed point), then remove
    dead nodes. Returns whether anything changed."""
    rw = Rewriter(graph)
    for _ in range(max_iterations):
        changed = False
        for node in list(graph.nodes):
            if node.graph is not graph:
                continue  # erased by an earlier rewrite in this sweep
            for p in patterns:
                rw.insertion_point = node
                if p.match_and_rewrite(node, rw):
                    changed = True
                    break
        rw.insertion_point = None
        eliminate_dead_code(graph, rw)  # so that a rewritten root cannot match again
        if not changed:
            break
    else:
        raise IRError(f"patterns {[type(p).__name__ for p in patterns]} did not reach a fixed "
                      f"point in {max_iterations} sweeps")
    return rw.changes > 0


# --------------------------------------------------------------------------- declarative matcher


@dataclass(frozen=True)
class Pat:
    """An operand-tree pattern. Build with P.op / P.any / P.param; `match` returns captures."""

    kind: str  # "op", "any", "param", "rest"
    op: str | tuple[str, ...] | None = None
    operands: tuple[Pat, ...] | None = None
    attrs: Mapping[str, Any] = field(default_factory=dict)
    capture: str | None = None
    result: int | None = None
    single_use: bool = False


class P:
    """Pattern constructors: P.op("core.topk", P.any("x"), attrs={"k": 2}, name="t")."""

    @staticmethod
    def op(op: str | tuple[str, ...], *operands: Pat, attrs: Mapping[str, Any] | None = None,
           name: str | None = None, result: int | None = None, single_use: bool = False) -> Pat:
        return Pat("op", op, tuple(operands) if operands else None, attrs or {}, name, result,
                   single_use)

    @staticmethod
    def any(name: str | None = None) -> Pat:
        return Pat("any", capture=name)

    @staticmethod
    def param(name: str | None = None) -> Pat:
        return Pat("param", capture=name)

    @staticmethod
    def rest() -> Pat:
        """As the last operand pattern: any number of further operands."""
        return Pat("rest")


def _match_value(p: Pat, v: Value, out: dict[str, Any]) -> bool:
    if p.kind == "param":
        if v.kind != "param":
            return False
    elif p.kind == "op":
        n = v.producer
        ops = (p.op,) if isinstance(p.op, str) else p.op
        if n is None or n.op not in ops:
            return False
        if p.result is not None and v.index != p.result:
            return False
        if p.single_use and len(v.uses) != 1:
            return False
        if not _match_node_body(p, n, out):
            return False
        if p.capture:
            out[p.capture + ".node"] = n
    if p.capture:
        if p.capture in out and out[p.capture] is not v:
            return False
        out[p.capture] = v
    return True


def _match_node_body(p: Pat, n: Node, out: dict[str, Any]) -> bool:
    for k, want in p.attrs.items():
        if n.attrs.get(k) != want:
            return False
    if p.operands is not None:
        pats = p.operands
        if pats and pats[-1].kind == "rest":
            pats = pats[:-1]
            if len(n.operands) < len(pats):
                return False
        elif len(pats) != len(n.operands):
            return False
        return all(_match_value(q, v, out) for q, v in zip(pats, n.operands, strict=False))
    return True


def match(p: Pat, target: Node | Value) -> dict[str, Any] | None:
    """Match a pattern rooted at a node (or value). Returns {capture: Value, capture.node: Node}
    or None. The root node is captured as "root"."""
    out: dict[str, Any] = {}
    if isinstance(target, Node):
        ops = (p.op,) if isinstance(p.op, str) else p.op
        if p.kind != "op" or target.op not in ops or not _match_node_body(p, target, out):
            return None
        out["root"] = target
        return out
    return out if _match_value(p, target, out) else None
