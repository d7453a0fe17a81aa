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

from moec.errors import IRError, PassError
from moec.ir.builder import make_node
from moec.ir.graph import Graph, Node, Value
from moec.ir.types import TensorType, dtype_of_numpy, same_type


class Rewriter:
    """Mutates a graph while keeping use lists, topological order and a count of changes."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.changes = 0
        self.insertion_point: Node | None = None  # new nodes go before this node (None: end)
        # While a batch is open (apply_patterns' sweeps), erased nodes are detached at once but
        # taken out of graph.nodes together by flush(): one by one it is O(n) per node.
        self._pending: list[Node] | None = None

    def create(self, op: str, operands: Sequence[Value], attrs: Mapping[str, Any] | None = None,
               loc: str | None = None, before: Node | None = None,
               names: Sequence[str | None] = ()) -> Node:
        """Insert a new, type-checked node before `before` (default: the insertion point).

        Inside `apply_patterns` the insertion point is the node being matched, so new nodes go
        right before the root (after all of its operands). A Rewriter made by hand has no
        insertion point: new nodes are appended at the end of the graph, after the nodes that
        will use them, unless `before=` (or `rw.insertion_point`) says where. Attributes are
        checked against the op (unknown keys, wrong value types) and the result types are
        inferred: a mistake is an IRError naming the op."""
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
        if self._pending is None:
            self.graph.remove_node(node)
        else:
            for r in node.results:
                if r.uses or r in self.graph.outputs:
                    raise IRError(f"cannot erase {node.op}: result {r.ref} still has uses")
            node.drop_operands()
            node.graph = None  # sweeps skip it; flush() takes it out of graph.nodes
            self._pending.append(node)
        self.changes += 1

    def begin_batch(self) -> None:
        """Defer taking erased nodes out of `graph.nodes` until `flush()`."""
        if self._pending is None:
            self._pending = []

    def flush(self) -> None:
        """Take the nodes erased since `begin_batch` out of `graph.nodes`, in one pass."""
        if self._pending:
            gone = set(self._pending)
            self.graph.nodes[:] = [n for n in self.graph.nodes if n not in gone]
        self._pending = None

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
    """Erase nodes none of whose results reaches a graph output (every op is pure). Returns
    how many. Linear in the graph: one backward sweep, then one bulk removal."""
    rw = rw or Rewriter(graph)
    outputs = set(graph.outputs)
    live: set[Node] = set()
    dead: list[Node] = []
    for node in reversed(graph.nodes):
        if node.graph is not graph:
            continue
        if any(r in outputs or any(u in live for u, _ in r.uses) for r in node.results):
            live.add(node)
        else:
            dead.append(node)
    graph.remove_nodes(dead)
    rw.changes += len(dead)
    return len(dead)


def apply_patterns(graph: Graph, patterns: Sequence[RewritePattern],
                   max_iterations: int = 20) -> bool:
    """Apply patterns greedily, node by node, until nothing matches (a fixed point), then remove
    dead nodes. Returns whether anything changed."""
    rw = Rewriter(graph)
    for _ in range(max_iterations):
        changed = False
        rw.begin_batch()
        for node in list(graph.nodes):
            if node.graph is not graph:
                continue  # erased by an earlier rewrite in this sweep
            for p in patterns:
                rw.insertion_point = node
                if p.match_and_rewrite(node, rw):
                    changed = True
                    break
        rw.insertion_point = None
        rw.flush()
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
    """Pattern constructors: P.op("core.topk", P.any("x"), attrs={"k": 2}, name="t").

    `P.op(op, *operands, attrs=None, name=None, result=None, single_use=False)`:
      op          an op name, or a tuple of names (any of them matches); checked against the op
                  registry when the pattern is built (a typo is an error with a "did you mean")
      operands    one pattern per operand, in order (none given: operands are not looked at);
                  `P.rest()` last matches any further operands
      attrs       attribute values that must be equal (keys checked against the op's attributes)
      name        capture: `m[name]` is the matched Value, `m[name + ".node"]` its producer node
      result      which result of a multi-result op the operand must be (0, 1, ...)
      single_use  the value has exactly one use: one operand of one node, and it is not a graph
                  output (so that rewriting its user leaves nobody else seeing the old value)
    `P.any(name)` matches any value, `P.param(name)` a parameter (a weight), `P.rest()` the
    remaining operands. `match(pattern, node)` returns the captures, with the root node as
    `"root"`, or None."""

    @staticmethod
    def op(op: str | tuple[str, ...], *operands: Pat, attrs: Mapping[str, Any] | None = None,
           name: str | None = None, result: int | None = None, single_use: bool = False) -> Pat:
        _check_op_pattern(op, operands, attrs or {})
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


def _check_op_pattern(op: Any, operands: Sequence[Any], attrs: Mapping[str, Any]) -> None:
    """Unknown op names and attribute keys would make a pattern that never matches: refuse them
    when the pattern is built."""
    import difflib

    from moec.ir.registry import all_ops

    ops = (op,) if isinstance(op, str) else tuple(op) if isinstance(op, (tuple, list)) else None
    if not ops or not all(isinstance(o, str) for o in ops):
        raise PassError(f"P.op: the op must be a name or a tuple of names, got {op!r}")
    known = all_ops()
    for o in ops:
        if o not in known:
            close = difflib.get_close_matches(o, list(known), n=3)
            hint = f"did you mean {' or '.join(close)}? " if close else ""
            raise PassError(f"P.op: unknown op {o!r}; {hint}(register ops of your own dialect "
                            f"with moec.ir.register_op before building patterns on them; "
                            f"docs/ops.md lists moec's)")
        missing = [k for k in attrs if k not in known[o].attrs]
        if missing:
            names = sorted(known[o].attrs)
            close = [c for k in missing for c in difflib.get_close_matches(k, names, n=1)]
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise PassError(f"P.op({o!r}): attribute(s) {', '.join(map(repr, missing))} not "
                            f"known to {o}; {hint}its attributes: {', '.join(names) or 'none'}")
    for i, q in enumerate(operands):
        if not isinstance(q, Pat):
            raise PassError(f"P.op({ops[0]!r}): operand pattern {i} is {q!r}; use P.op, P.any, "
                            f"P.param or P.rest")
        if q.kind == "rest" and i != len(operands) - 1:
            raise PassError(f"P.op({ops[0]!r}): P.rest() must be the last operand pattern")


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
        if p.single_use and (len(v.uses) != 1 or n.graph is not None
                             and any(o is v for o in n.graph.outputs)):
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
