"""The verifier: checks that a graph is well formed and well typed. Passes run it after every
change (on by default in tests); its messages say which node, which operand, what was expected and
what was found."""

from __future__ import annotations

from moec.errors import IRError, VerificationError
from moec.ir.graph import Graph, Node, Value
from moec.ir.registry import infer_types
from moec.ir.types import same_type


class _Where:
    """`node `...`` for messages, formatted only when one is raised (printing every node of a
    large graph cost more than checking it)."""

    __slots__ = ("node",)

    def __init__(self, node: Node) -> None:
        self.node = node

    def __str__(self) -> str:
        return f"node `{self.node!r}`"


def verify(graph: Graph) -> None:
    defined: set[Value] = set(graph.inputs) | set(graph.params.values())
    names: set[str] = {v.name for v in graph.inputs}
    for name, v in graph.params.items():
        if v.name != name or v.kind != "param":
            raise VerificationError(f"parameter table entry {name!r} holds {v!r}")
        data = graph.param_data.get(name)
        if data is not None and tuple(data.shape) != v.type.concrete({}):
            raise VerificationError(f"@{name}: data shape {data.shape} does not match {v.type}")
    # Use lists as sets, built once per value: `(node, i) in v.uses` on a list made the check
    # quadratic in the fan-out (a value read by 100k nodes).
    use_sets: dict[Value, set] = {}
    for node in graph.nodes:
        where = _Where(node)
        if node.graph is not graph:
            raise VerificationError(f"{where} is listed in the graph but not attached to it")
        for i, v in enumerate(node.operands):
            if v not in defined:
                raise VerificationError(f"{where}: operand {i} ({v.ref}) is not defined before use")
            uses = use_sets.get(v)
            if uses is None:
                uses = use_sets[v] = set(v.uses)
            if (node, i) not in uses:
                raise VerificationError(f"{where}: operand {i} ({v.ref}) misses its use entry")
        try:
            full, types = infer_types(node.op, [v.type for v in node.operands], node.attrs)
        except IRError as e:
            raise VerificationError(f"{where}: {e}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, ArithmeticError) as e:
            # An attribute of the wrong type ({k="x"}) makes an op's type inference fail with a
            # plain Python error; it is still a malformed graph.
            raise VerificationError(f"{where}: its operands or attributes are invalid "
                                    f"({type(e).__name__}: {e})") from None
        if dict(full) != dict(node.attrs):
            raise VerificationError(f"{where}: attributes {dict(node.attrs)} lack defaults "
                                    f"{dict(full)} (build nodes through the rewriter/builder)")
        if len(types) != len(node.results):
            raise VerificationError(f"{where}: {len(node.results)} results, the op gives "
                                    f"{len(types)}")
        for r, t in zip(node.results, types, strict=True):
            if not same_type(r.type, t):
                raise VerificationError(f"{where}: result {r.ref} has type {r.type}, but the "
                                        f"operands give {t}")
            if r.name in names:
                raise VerificationError(f"{where}: value name {r.ref} is defined twice")
            if r.producer is not node:
                raise VerificationError(f"{where}: result {r.ref} does not point back to it")
            names.add(r.name)
            defined.add(r)
        for r in node.results:
            for user, i in r.uses:
                if user.graph is not graph or user.operands[i] is not r:
                    raise VerificationError(f"{where}: stale use of {r.ref} by `{user!r}`")
    for v in graph.outputs:
        if v not in defined:
            raise VerificationError(f"graph output {v.ref} is not defined")
    for v in graph.inputs:
        for sym in (d for d in v.type.shape if not isinstance(d, int)):
            for s in sym.free_syms():
                if s not in graph.dims:
                    raise VerificationError(f"input {v.ref}: symbolic dim {s} is not declared")
