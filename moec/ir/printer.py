"""Text form of the IR, one declaration or node per line; `moec.ir.parse` reads it back.

    dim T: 0..4096
    input %x: f32[T, 64]
    param @router.weight: f32[8, 64]
    %0: f32[T, 8] = core.linear(%x, @router.weight)  # layers.0.mlp.gate
    %w: f32[T, 2], %i: i32[T, 2] = core.topk(%0) {k=2}
    output %w, %i
"""

from __future__ import annotations

import json
import re
from typing import Any

from moec.ir.graph import Graph, Node, Value

_BARE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
_KEYWORDS = {"true", "false", "none", "inf", "nan"}


def format_attr_value(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        r = repr(v)
        return r if any(c in r for c in ".eEn") else r + ".0"  # keep floats floats ('inf', 'nan')
    if isinstance(v, str):
        return v if _BARE.match(v) and v not in _KEYWORDS else json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(format_attr_value(x) for x in v) + "]"
    raise TypeError(f"attribute value {v!r} of type {type(v).__name__} cannot be printed")


def format_attrs(attrs: dict[str, Any]) -> str:
    if not attrs:
        return ""
    return " {" + ", ".join(f"{k}={format_attr_value(v)}" for k, v in attrs.items()) + "}"


def _ref(v: Value, names: dict[Value, str] | None) -> str:
    if names is None or v.kind == "param":
        return v.ref
    return "%" + names.get(v, v.name)


def format_node(node: Node, names: dict[Value, str] | None = None) -> str:
    res = ", ".join(f"{_ref(r, names)}: {r.type}" for r in node.results)
    ops = ", ".join(_ref(v, names) for v in node.operands)
    line = f"{res} = {node.op}({ops}){format_attrs(dict(node.attrs))}"
    if node.loc:
        line += f"  # {node.loc}"
    return line


def print_graph(g: Graph, canonical: bool = False, locs: bool = True) -> str:
    """The graph as text. `canonical` renames values %0, %1, ... in order of definition (inputs
    keep their names), which makes two graphs comparable line by line."""
    names: dict[Value, str] | None = None
    if canonical:
        names = {v: v.name for v in g.inputs}
        counter = 0
        for n in g.nodes:
            for r in n.results:
                names[r] = str(counter)
                counter += 1
    lines = [f"dim {k}: {lo}..{hi}" for k, (lo, hi) in g.dims.items()]
    lines += [f"input {_ref(v, names)}: {v.type}" for v in g.inputs]
    lines += [f"param {v.ref}: {v.type}" for v in g.params.values()]
    for n in g.nodes:
        line = format_node(n, names)
        if not locs and n.loc:
            line = line[: line.rindex("  # ")]
        lines.append(line)
    if g.outputs:
        lines.append("output " + ", ".join(_ref(v, names) for v in g.outputs))
    return "\n".join(lines) + "\n"
