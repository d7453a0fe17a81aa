"""The SSA graph: `Graph` holds `Node`s in topological order; every `Value` has a `TensorType`.

Values are graph inputs (`%x`), parameters (`@layers.0.router.weight`, data kept outside the
node list) or node results. Each value keeps its use list, so rewrites can replace all uses in one
step. Mutate graphs through `moec.passes.Rewriter` (it keeps these lists right and counts what it
changed); the methods here are the low-level primitives it uses.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Any

import numpy as np

from moec.errors import IRError
from moec.ir.types import TensorType


class Value:
    """An SSA value. `kind` is "input", "param" or "result"."""

    __slots__ = ("name", "type", "kind", "producer", "index", "uses")

    def __init__(self, name: str, type: TensorType, kind: str,
                 producer: Node | None = None, index: int = 0) -> None:
        self.name = name
        self.type = type
        self.kind = kind
        self.producer = producer
        self.index = index
        self.uses: list[tuple[Node, int]] = []

    @property
    def ref(self) -> str:
        """How the value is written in text IR: `%name` or `@name` for parameters."""
        return ("@" if self.kind == "param" else "%") + self.name

    @property
    def shape(self) -> tuple:
        return self.type.shape

    @property
    def dtype(self) -> str:
        return self.type.dtype

    def users(self) -> list[Node]:
        seen: list[Node] = []
        for n, _ in self.uses:
            if n not in seen:
                seen.append(n)
        return seen

    def __repr__(self) -> str:
        return f"{self.ref}: {self.type}"


def freeze_attrs(attrs: Mapping[str, Any] | None) -> Mapping[str, Any]:
    def freeze(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return tuple(freeze(x) for x in v)
        if isinstance(v, np.generic):
            return v.item()
        return v

    return MappingProxyType({k: freeze(v) for k, v in sorted((attrs or {}).items())})


class Node:
    """One op application: `results = op(operands) {attrs}  # loc`."""

    __slots__ = ("op", "operands", "results", "attrs", "loc", "graph")

    def __init__(self, op: str, operands: list[Value], attrs: Mapping[str, Any] | None,
                 loc: str | None = None) -> None:
        self.op = op
        self.operands: list[Value] = []
        self.results: list[Value] = []
        self.attrs = freeze_attrs(attrs)
        self.loc = loc
        self.graph: Graph | None = None
        for i, v in enumerate(operands):
            self.operands.append(v)
            v.uses.append((self, i))

    @property
    def result(self) -> Value:
        if len(self.results) != 1:
            raise IRError(f"{self.op} has {len(self.results)} results, not one")
        return self.results[0]

    def set_operand(self, i: int, v: Value) -> None:
        old = self.operands[i]
        old.uses.remove((self, i))
        self.operands[i] = v
        v.uses.append((self, i))

    def drop_operands(self) -> None:
        for i, v in enumerate(self.operands):
            v.uses.remove((self, i))
        self.operands = []

    def __repr__(self) -> str:
        from moec.ir.printer import format_node

        return format_node(self)


class Graph:
    """A graph: symbolic dims, inputs, parameters, nodes in topological order, outputs."""

    def __init__(self) -> None:
        self.dims: dict[str, tuple[int, int]] = {}
        self.inputs: list[Value] = []
        self.params: dict[str, Value] = {}
        self.param_data: dict[str, np.ndarray | None] = {}
        # float parameters with an exact quantised form in moec's formats (moec/ir/quant_ops.py),
        # as a frontend read them from a quantised model (ONNX QMoE): name -> (bits,
        # group_size, parts); quantize-experts uses these parts instead of quantising
        self.quant_forms: dict[str, tuple[int, int, tuple[np.ndarray, ...]]] = {}
        self.nodes: list[Node] = []
        self.outputs: list[Value] = []
        self._names: set[str] = set()
        self._counter = 0

    # ------------------------------------------------------------------ names
    def fresh_name(self, hint: str | None = None) -> str:
        if hint and hint not in self._names:
            self._names.add(hint)
            return hint
        while True:
            name = f"{hint}.{self._counter}" if hint else str(self._counter)
            self._counter += 1
            if name not in self._names:
                self._names.add(name)
                return name

    def reserve_name(self, name: str) -> None:
        if name in self._names:
            raise IRError(f"value name %{name} is defined twice")
        self._names.add(name)

    # ------------------------------------------------------------------ building
    def add_dim(self, name: str, lo: int, hi: int) -> None:
        if lo < 0 or hi < lo:
            raise IRError(f"dim {name}: bad bounds {lo}..{hi}")
        self.dims[name] = (lo, hi)

    def add_input(self, name: str, type: TensorType) -> Value:
        self.reserve_name(name)
        v = Value(name, type, "input")
        self.inputs.append(v)
        return v

    def add_param(self, name: str, type: TensorType, data: np.ndarray | None = None) -> Value:
        if name in self.params:
            raise IRError(f"parameter @{name} is defined twice")
        if data is not None and tuple(data.shape) != tuple(type.shape):
            raise IRError(f"parameter @{name}: data shape {data.shape} != declared {type}")
        v = Value(name, type, "param")
        self.params[name] = v
        self.param_data[name] = data
        return v

    def insert_node(self, node: Node, result_types: list[TensorType], names: list[str | None],
                    index: int | None = None) -> Node:
        for i, t in enumerate(result_types):
            hint = names[i] if i < len(names) else None
            name = self.fresh_name(hint)
            node.results.append(Value(name, t, "result", node, i))
        node.graph = self
        if index is None:
            self.nodes.append(node)
        else:
            self.nodes.insert(index, node)
        return node

    def remove_node(self, node: Node) -> None:
        for r in node.results:
            if r.uses or r in self.outputs:
                raise IRError(f"cannot erase {node.op}: result {r.ref} still has uses")
        node.drop_operands()
        self.nodes.remove(node)
        node.graph = None

    def remove_nodes(self, nodes: Iterable[Node]) -> None:
        """Remove several nodes at once, in time linear in the graph (removing n nodes one by
        one costs O(n) each: the node list and the operands' use lists are searched). The
        nodes' results may only be used by nodes removed with them."""
        dead = {n for n in nodes if n.graph is self}
        if not dead:
            return
        outputs = set(self.outputs)
        touched: dict[Value, None] = {}
        for n in dead:
            for r in n.results:
                if r in outputs or any(u not in dead for u, _ in r.uses):
                    raise IRError(f"cannot erase {n.op}: result {r.ref} still has uses")
            for v in n.operands:
                touched[v] = None
        for v in touched:
            v.uses = [(u, i) for u, i in v.uses if u not in dead]
        for n in dead:
            n.operands = []
            n.graph = None
            for r in n.results:
                r.uses = []
        self.nodes[:] = [n for n in self.nodes if n not in dead]

    def remove_param(self, name: str) -> None:
        v = self.params.pop(name)
        self.param_data.pop(name, None)
        self.quant_forms.pop(name, None)
        if v.uses:
            raise IRError(f"cannot remove @{name}: it still has uses")

    def replace_all_uses(self, old: Value, new: Value) -> None:
        for node, i in list(old.uses):
            node.set_operand(i, new)
        self.outputs = [new if o is old else o for o in self.outputs]

    # ------------------------------------------------------------------ queries
    def __iter__(self) -> Iterator[Node]:
        return iter(list(self.nodes))

    def values(self) -> Iterator[Value]:
        yield from self.inputs
        yield from self.params.values()
        for n in self.nodes:
            yield from n.results

    def find(self, op: str) -> list[Node]:
        return [n for n in self.nodes if n.op == op]

    def param_array(self, v: Value | str) -> np.ndarray:
        name = v if isinstance(v, str) else v.name
        data = self.param_data.get(name)
        if data is None:
            raise IRError(f"parameter @{name} has no data (graph parsed from text?)")
        return data

    def __str__(self) -> str:
        from moec.ir.printer import print_graph

        return print_graph(self)
