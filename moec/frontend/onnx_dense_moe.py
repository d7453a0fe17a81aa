"""Recognise the dense-combine MoE that torch.onnx exports from a stacked-experts block.

`combine = zeros(T, E).scatter(1, ids, weights)` then `out = sum_e combine[:, e:e+1] * FFN_e(x)`
exports (torch.onnx, dynamo) as ONNX nodes: `ScatterElements(Expand(0, [T, E]), ids, weights,
axis=1)`, per expert a `Slice(combine, e, e+1, axis 1)`, `MatMul`s with per-expert constant
weights (already transposed: x @ W^T is `MatMul(x, W^T)`), SiLU as `x * Sigmoid(x)`, and a
chain of `Add`s from `Expand(0, Shape(x))`. That is `moe.experts` (docs/ops.md) with the
routing weights and ids as operands: every expert runs on every token in the export, only the
selected ones count. The translator emits one `moe.experts` for the whole match, so the
compiled model runs the selected experts only.

Requires: all E experts present once, each gated SiLU (`silu(x Wg) * (x Wu)`, then `Wd`), on the
same x, with constant weights. Anything else is left alone (and then reported as unsupported).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class DenseMoE:
    output: str  # the ONNX value the match computes (the last Add)
    x: str
    weights: str
    ids: str
    w_gate: np.ndarray  # [E, I, H]
    w_up: np.ndarray  # [E, I, H]
    w_down: np.ndarray  # [E, H, I]
    nodes: set[tuple] = field(default_factory=set)  # node_key() of the ONNX nodes it replaces


def node_key(n: Any) -> tuple:
    """A stable identity of an ONNX node (protobuf hands out new wrapper objects, so id() is
    not one): its op type and outputs, unique in an SSA graph."""
    return (n.op_type, tuple(n.output))


def _attr(node: Any, name: str, default: Any) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


class _Graph:
    def __init__(self, g: Any, consts: dict[str, np.ndarray]) -> None:
        self.consts = consts
        self.producer = {o: n for n in g.node for o in n.output if o}
        self.users: dict[str, list[Any]] = {}
        for n in g.node:
            for i in n.input:
                if i:
                    self.users.setdefault(i, []).append(n)
        # Constant nodes count as constants
        for n in g.node:
            if n.op_type == "Constant":
                import onnx

                for a in n.attribute:
                    if a.name == "value":
                        self.consts[n.output[0]] = onnx.numpy_helper.to_array(a.t)

    def op(self, name: str, op_type: str) -> Any | None:
        n = self.producer.get(name)
        return n if n is not None and n.op_type == op_type else None

    def const(self, name: str) -> np.ndarray | None:
        return self.consts.get(name)


def _zeros(gr: _Graph, name: str) -> Any | None:
    """The Expand node if `name` is Expand(constant all-zero, shape)."""
    n = gr.op(name, "Expand")
    if n is None:
        return None
    c = gr.const(n.input[0])
    return n if c is not None and c.size and not np.any(c) else None


def _silu_of(gr: _Graph, name: str) -> tuple[str, list] | None:
    """(v, [mul, sigmoid]) if `name` is Mul(v, Sigmoid(v)) (either order)."""
    n = gr.op(name, "Mul")
    if n is None:
        return None
    a, b = n.input
    for v, s in ((a, b), (b, a)):
        sg = gr.op(s, "Sigmoid")
        if sg is not None and sg.input[0] == v:
            return v, [n, sg]
    return None


def _matmul_const(gr: _Graph, name: str) -> tuple[str, np.ndarray, Any] | None:
    n = gr.op(name, "MatMul")
    if n is None:
        return None
    w = gr.const(n.input[1])
    if w is None or w.ndim != 2:
        return None
    return n.input[0], w, n


def _expert(gr: _Graph, y: str) -> tuple[str, np.ndarray, np.ndarray, np.ndarray, list] | None:
    """(x, Wg^T, Wu^T, Wd^T, nodes) if `y` = MatMul(silu(x Wg^T) * (x Wu^T), Wd^T)."""
    down = _matmul_const(gr, y)
    if down is None:
        return None
    h, wd_t, n_down = down
    mul = gr.op(h, "Mul")
    if mul is None:
        return None
    for g, u in (tuple(mul.input), tuple(reversed(mul.input))):
        silu = _silu_of(gr, g)
        if silu is None:
            continue
        gate, up = _matmul_const(gr, silu[0]), _matmul_const(gr, u)
        if gate is None or up is None or gate[0] != up[0]:
            continue
        return gate[0], gate[1], up[1], wd_t, [n_down, mul, *silu[1], gate[2], up[2]]
    return None


def _slice_index(gr: _Graph, n: Any) -> int | None:
    """e if Slice n takes columns e:e+1 along axis 1 (or -1 of a rank-2 tensor)."""
    if n.op_type != "Slice" or len(n.input) < 3:
        return None
    starts, ends = gr.const(n.input[1]), gr.const(n.input[2])
    axes = gr.const(n.input[3]) if len(n.input) > 3 and n.input[3] else np.array([0])
    steps = gr.const(n.input[4]) if len(n.input) > 4 and n.input[4] else np.array([1])
    if any(v is None or v.size != 1 for v in (starts, ends, axes, steps)):
        return None
    if int(axes.reshape(-1)[0]) not in (1, -1) or int(steps.reshape(-1)[0]) != 1:
        return None
    s, e = int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0])
    return s if e == s + 1 and s >= 0 else None


def find_dense_moe(g: Any, consts: dict[str, np.ndarray]) -> list[DenseMoE]:
    """Every dense-combine MoE of the ONNX graph `g` (see the module docstring)."""
    gr = _Graph(g, dict(consts))
    found = []
    outputs = {o.name for o in g.output}
    for scat in (n for n in g.node if n.op_type == "ScatterElements"):
        if int(_attr(scat, "axis", 0)) not in (1, -1):
            continue
        z = _zeros(gr, scat.input[0])
        if z is None:
            continue
        slices = {}
        terms = {}
        experts = {}
        ok = True
        for sl in gr.users.get(scat.output[0], []):
            e = _slice_index(gr, sl)
            users = gr.users.get(sl.output[0], [])
            if e is None or e in slices or len(users) != 1 or users[0].op_type != "Mul":
                ok = False
                break
            mul = users[0]
            y = mul.input[1] if mul.input[0] == sl.output[0] else mul.input[0]
            ex = _expert(gr, y)
            if ex is None:
                ok = False
                break
            slices[e], terms[e], experts[e] = sl, mul, ex
        n_e = len(slices)
        if not ok or not n_e or sorted(slices) != list(range(n_e)):
            continue
        if len({ex[0] for ex in experts.values()}) != 1:
            continue
        # the Add chain: starts at zeros_like(x), adds every term once
        chain, seen = [], set()
        first_add = gr.users.get(terms[0].output[0], [])
        if len(first_add) != 1 or first_add[0].op_type != "Add":
            continue
        # walk back from any term's Add to the chain's start, then forward to its end
        node = first_add[0]
        while True:
            prev = [i for i in node.input if gr.op(i, "Add") is not None]
            if not prev:
                break
            node = gr.producer[prev[0]]
        base = [i for i in node.input if _zeros(gr, i) is not None]
        if not base:
            continue
        cur = node
        term_outs = {t.output[0] for t in terms.values()}
        while cur is not None:
            chain.append(cur)
            seen.update(i for i in cur.input if i in term_outs)
            nxt = [u for u in gr.users.get(cur.output[0], []) if u.op_type == "Add"]
            if len(gr.users.get(cur.output[0], [])) != 1 or cur.output[0] in outputs or not nxt:
                break
            cur = nxt[0]
        if seen != term_outs or len(chain) != n_e:
            continue
        x = experts[0][0]
        w_gate = np.stack([np.ascontiguousarray(experts[e][1].T) for e in range(n_e)])
        w_up = np.stack([np.ascontiguousarray(experts[e][2].T) for e in range(n_e)])
        w_down = np.stack([np.ascontiguousarray(experts[e][3].T) for e in range(n_e)])
        zeros_like = [gr.producer[i] for i in node.input if _zeros(gr, i)]
        nodes = {node_key(n) for n in (scat, z, *chain, *zeros_like)}
        for e in range(n_e):
            nodes.update(node_key(n) for n in (slices[e], terms[e], *experts[e][4]))
        found.append(DenseMoE(chain[-1].output[0], x, scat.input[2], scat.input[1],
                              w_gate, w_up, w_down, nodes))
    if not found:
        return found
    # producers used only by replaced nodes (Shape, Concat of the zeros' shapes) go too
    replaced = set().union(*(m.nodes for m in found))
    kept = {v for m in found for v in (m.x, m.weights, m.ids)}  # moe.experts reads these
    changed = True
    while changed:
        changed = False
        for n in g.node:
            if node_key(n) in replaced or n.op_type == "Constant":
                continue
            outs = [o for o in n.output if o]
            if outs and all(o not in outputs and o not in kept and all(node_key(u) in replaced
                                                      for u in gr.users.get(o, []))
                            for o in outs) and any(gr.users.get(o) for o in outs):
                replaced.add(node_key(n))
                found[0].nodes.add(node_key(n))
                changed = True
    return found
