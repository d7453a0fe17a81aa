"""The reference interpreter: runs any graph node by node with the ops' numpy references.

It is the ground truth every pass and every kernel is tested against. Symbolic dims are bound
from the inputs' shapes and checked against their declared bounds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from moec.errors import InputError, IRError
from moec.ir.graph import Graph, Node, Value
from moec.ir.registry import get_op
from moec.ir.types import BinExpr, Sym, numpy_dtype


def bind_dims(graph: Graph, arrays: Sequence[np.ndarray]) -> dict[str, int]:
    """Bind symbolic dims from input arrays; InputError on a mismatch."""
    if len(arrays) != len(graph.inputs):
        raise InputError(f"the graph takes {len(graph.inputs)} inputs, got {len(arrays)}")
    env: dict[str, int] = {}
    for v, a in zip(graph.inputs, arrays, strict=True):
        if a.ndim != v.type.rank:
            raise InputError(f"input {v.ref}: rank {a.ndim} given, expected {v.type}")
        for axis, (d, n) in enumerate(zip(v.type.shape, a.shape, strict=True)):
            if isinstance(d, int):
                if d != n:
                    raise InputError(f"input {v.ref}: dim {axis} is {n}, expected {d} ({v.type})")
            elif isinstance(d, Sym):
                if env.setdefault(d.name, n) != n:
                    raise InputError(f"input {v.ref}: dim {axis} is {n} but {d.name} is "
                                     f"{env[d.name]} from another input")
            elif isinstance(d, BinExpr):
                pass  # checked after all plain dims are bound
    for name, n in env.items():
        lo, hi = graph.dims.get(name, (0, 2**62))
        if not lo <= n <= hi:
            raise InputError(f"dim {name}={n} is outside its bounds {lo}..{hi}")
    for v, a in zip(graph.inputs, arrays, strict=True):
        if tuple(a.shape) != v.type.concrete(env):
            raise InputError(f"input {v.ref}: shape {a.shape} does not match {v.type}")
    return env


def run_node(node: Node, args: list[np.ndarray], env: dict[str, int] | None = None
             ) -> list[np.ndarray]:
    """Run the reference of one node. `env` (the bound dims) resolves a reshape to named
    symbolic dims, whose values the operands alone do not give."""
    attrs = node.attrs
    if node.op == "core.reshape" and any(isinstance(d, str) for d in attrs["shape"]):
        if env is None:
            raise IRError(f"{node!r}: a reshape to named dims needs the bound dims")
        attrs = {**attrs, "shape": list(node.result.type.concrete(env))}
    try:
        return get_op(node.op).reference(args, attrs)
    except IRError:
        raise
    except Exception as e:  # a reference failing on valid input is a bug worth locating
        raise IRError(f"reference of {node.op} failed at {node!r}: {e}") from e


def interpret(graph: Graph, inputs: Sequence[np.ndarray] | Mapping[str, np.ndarray],
              observer: Callable[[Node, list[np.ndarray]], None] | None = None
              ) -> list[np.ndarray]:
    """Run `graph` on numpy inputs (a list in input order, or a dict by input name)."""
    if isinstance(inputs, Mapping):
        missing = [v.name for v in graph.inputs if v.name not in inputs]
        if missing:
            raise InputError(f"missing inputs: {', '.join(missing)}")
        inputs = [inputs[v.name] for v in graph.inputs]
    arrays = [np.asarray(a) for a in inputs]
    for v, a in zip(graph.inputs, arrays, strict=False):
        if a.dtype != numpy_dtype(v.dtype):
            raise InputError(f"input {v.ref}: dtype {a.dtype} given, expected {v.type}")
    env = bind_dims(graph, arrays)
    vals: dict[Value, np.ndarray] = dict(zip(graph.inputs, arrays, strict=True))
    for v in graph.params.values():
        vals[v] = graph.param_array(v)
    for node in graph.nodes:
        outs = run_node(node, [vals[v] for v in node.operands], env)
        for r, o in zip(node.results, outs, strict=True):
            want = r.type.concrete(env)
            if tuple(o.shape) != want or o.dtype != numpy_dtype(r.dtype):
                raise IRError(f"{node.op} produced {o.dtype}{list(o.shape)} for {r.ref} declared "
                              f"{r.type} = {want}")
            vals[r] = o
        if observer is not None:
            observer(node, outs)
    return [vals[v] for v in graph.outputs]
