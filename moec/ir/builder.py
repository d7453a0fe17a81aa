"""IRBuilder: the convenient way to build a graph (frontends, tests, user code).

    b = IRBuilder()
    T = b.dim("T", 0, 4096)
    x = b.input("x", (T, 64), "f32")
    w = b.param("router.weight", np.zeros((8, 64), np.float32))
    logits = b.op("core.linear", [x, w], loc="mlp.gate")
    vals, ids = b.op("core.topk", [logits], {"k": 2})
    b.output(vals, ids)
    graph = b.graph
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from moec.errors import IRError
from moec.ir.graph import Graph, Node, Value
from moec.ir.registry import infer_types
from moec.ir.types import DimLike, Sym, TensorType, dtype_of_numpy


def make_node(graph: Graph, op: str, operands: Sequence[Value], attrs: Mapping[str, Any] | None,
              loc: str | None, index: int | None = None, names: Sequence[str | None] = ()
              ) -> Node:
    """Type-check and insert one node (at `index`, default the end). Raises IRError naming the
    op and, where known, the source location."""
    for v in operands:
        if not isinstance(v, Value):
            raise IRError(f"{op}: operand {v!r} is not an IR Value")
    where = f" (at {loc})" if loc else ""
    try:
        full, types = infer_types(op, [v.type for v in operands], attrs or {})
    except IRError as e:
        msg = str(e) if str(e).startswith(op) else f"{op}: {e}"  # name the op in every message
        raise IRError(f"{msg}{where}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        # type inference met an attribute (or operand) of a kind it cannot use, e.g. k="2"
        raise IRError(f"{op}: cannot infer result types from attributes {dict(attrs or {})}: "
                      f"{type(e).__name__}: {e}{where}") from None
    return graph.insert_node(Node(op, list(operands), full, loc), types, list(names), index)


class IRBuilder:
    """Appends typed nodes to a Graph; result types are inferred by the op registry."""

    def __init__(self, graph: Graph | None = None) -> None:
        self.graph = graph if graph is not None else Graph()

    def dim(self, name: str, lo: int = 0, hi: int = 4096) -> Sym:
        self.graph.add_dim(name, lo, hi)
        return Sym(name)

    def input(self, name: str, shape: Sequence[DimLike], dtype: str = "f32") -> Value:
        return self.graph.add_input(name, TensorType(tuple(shape), dtype))

    def param(self, name: str, data: np.ndarray) -> Value:
        data = np.ascontiguousarray(data)
        return self.graph.add_param(name, TensorType(data.shape, dtype_of_numpy(data.dtype)), data)

    def op(self, op: str, operands: Sequence[Value], attrs: Mapping[str, Any] | None = None,
           loc: str | None = None, names: Sequence[str | None] = ()) -> Value | tuple[Value, ...]:
        node = make_node(self.graph, op, operands, attrs, loc, names=names)
        return node.results[0] if len(node.results) == 1 else tuple(node.results)

    def output(self, *values: Value) -> None:
        self.graph.outputs.extend(values)
