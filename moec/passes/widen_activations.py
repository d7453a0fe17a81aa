"""widen-activations: float32 activations for a float16 / bfloat16 graph; the GEMM weights stay
in their half dtype.

Most checkpoints people bring are bfloat16. moec's CPU kernels compute in float32: a CPU
without AVX-512 BF16 / FP16 has no half-precision arithmetic, and where it has some, float32
accumulation is what keeps a K=2048 dot product accurate. What half weights buy on a CPU is
memory: decode reads every touched expert's weights once per token, so weights stored as bf16
and widened in registers as the GEMM reads them halve the bytes, and the time, of a decode step.

The pass rebuilds the graph with every activation in float32:
- the weight operands of `core.linear` and `moe.grouped_matmul`, and `core.embedding` tables,
  keep their dtype (the kernels take half weights with float32 activations; an embedding lookup
  is followed by a cast to float32);
- every other half parameter (norm scales, biases, router weights, quantisation scales) is
  replaced by a float32 copy at compile time;
- half graph inputs are cast to float32 on entry, and half outputs cast back on exit, so the
  compiled model's signature is the model's own;
- a `core.cast` to a half dtype becomes a no-op: the value stays float32.

Numerics: the result is the model's arithmetic in float32 on its half weights, which rounds
less than running it in half precision (that rounds every intermediate). Expect it to differ from
a half-precision run by that run's rounding (bfloat16: about 1e-2 relative), and to match a
float32 run of the same half weights to float32 accuracy.

When: last, on CPU targets; `moec.compile` appends it when the traced graph has f16/bf16 values.
Requires: nothing (any ops). Ensures: no f16/bf16 value other than the graph inputs, the casts
that feed the outputs, embedding lookups, and parameters in the weight slots above.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from moec.ir.graph import Graph, Node, Value
from moec.ir.registry import infer_types
from moec.ir.types import TensorType, same_type
from moec.passes.base import Pass, PassContext, register_pass
from moec.passes.rewriter import Rewriter

HALF = ("f16", "bf16")
WIDE = "f32"


def weight_slots(node: Node) -> set[int]:
    """Operand indices of `node` that may stay half: the weights its kernel widens itself."""
    if node.op == "core.linear":
        return {1}
    if node.op == "moe.grouped_matmul":
        return set(range(1, 3 if node.attrs["activation"].endswith("_mul") else 2))
    if node.op == "core.embedding":
        return {0}
    return set()


def _is_widening(node: Node) -> bool:
    return node.op == "core.cast" and node.attrs["dtype"] == WIDE


def has_half_compute(graph: Graph) -> bool:
    """Whether anything in the graph still computes in f16/bf16 (what this pass removes)."""
    for v in graph.inputs:
        if v.dtype in HALF and any(not _is_widening(n) for n, _ in v.uses):
            return True
    for p in graph.params.values():
        if p.dtype in HALF and any(i not in weight_slots(n) for n, i in p.uses):
            return True
    for node in graph.nodes:
        for r in node.results:
            if r.dtype not in HALF:
                continue
            if node.op == "core.embedding":
                if any(not _is_widening(n) for n, _ in r.uses):
                    return True
            elif r.uses or r not in graph.outputs or node.op != "core.cast":
                return True  # only the casts back to the outputs' dtype may be half
    return False


class _Widen:
    def __init__(self, graph: Graph) -> None:
        self.g = graph
        self.rw = Rewriter(graph)
        self.wide_params: dict[str, Value] = {}

    def param(self, v: Value) -> Value:
        """The float32 copy of half parameter `v` (one per parameter)."""
        if v.name not in self.wide_params:
            data = self.g.param_data.get(v.name)
            if data is None:  # a shape-only graph: declare the copy; data comes with the rest
                w = self.g.add_param(self.g.fresh_name(f"{v.name}.f32"), TensorType(v.shape, WIDE))
                self.rw.changes += 1
            else:
                w = self.rw.add_param(f"{v.name}.f32", np.asarray(data, np.float32))
            self.wide_params[v.name] = w
        return self.wide_params[v.name]

    def cast(self, v: Value, dtype: str, before: Node | None) -> Value:
        return self.rw.create("core.cast", [v], {"dtype": dtype}, before=before,
                              names=[f"{v.name}.{dtype}"]).result

    def redirect(self, old: Value, new: Value, keep: Node | None = None) -> None:
        """Every use of `old` but `keep`'s reads `new`, whose type may differ: the users are
        rebuilt after it, in order."""
        for user, i in list(old.uses):
            if user is not keep:
                user.set_operand(i, new)
        self.g.outputs = [new if o is old else o for o in self.g.outputs]

    def widen_after(self, node: Node, before: Node | None) -> list[Value]:
        """node's results, each half one followed by a cast to float32 (inserted before
        `before`, None: at the end)."""
        return [self.cast(r, WIDE, before) if r.dtype in HALF else r for r in node.results]

    def rebuild(self, node: Node) -> None:
        """`node` on float32 operands; its results keep their names."""
        slots = weight_slots(node)
        ops = [(self.param(v) if v.kind == "param" else self.cast(v, WIDE, node))
               if v.dtype in HALF and i not in slots else v
               for i, v in enumerate(node.operands)]
        if node.op == "core.cast" and ops[0].dtype == WIDE and node.attrs["dtype"] in (*HALF, WIDE):
            self.retire(node, [ops[0]])  # the value simply stays float32
            return
        attrs = dict(node.attrs)
        if node.op == "core.cast" and attrs["dtype"] in HALF:
            attrs["dtype"] = WIDE  # from an integer or f64 source
        if all(a is b for a, b in zip(ops, node.operands, strict=True)) and attrs == dict(
                node.attrs) and all(same_type(r.type, t) for r, t in zip(
                node.results, self.types(node), strict=True)):
            # unchanged; an embedding lookup still yields its table's dtype: widen it after
            i = self.g.nodes.index(node) + 1
            after = self.g.nodes[i] if i < len(self.g.nodes) else None
            for r, w in zip(node.results, self.widen_after(node, after), strict=True):
                if w is not r:
                    self.redirect(r, w, keep=w.producer)
            return
        new = self.rw.create(node.op, ops, attrs, loc=node.loc, before=node,
                             names=[None] * len(node.results))
        for r, old in zip(new.results, node.results, strict=True):
            r.name = old.name  # the rebuilt values keep the names the IR dumps showed
        self.retire(node, self.widen_after(new, node))

    @staticmethod
    def types(node: Node) -> list[TensorType]:
        return infer_types(node.op, [v.type for v in node.operands], node.attrs)[1]

    def retire(self, node: Node, new: list[Value]) -> None:
        for old, v in zip(node.results, new, strict=True):
            self.redirect(old, v)
        self.rw.erase(node)

    def run(self, original: list[TensorType]) -> None:
        g = self.g
        names = [v.name for v in g.outputs]
        first = g.nodes[0] if g.nodes else None
        for v in g.inputs:
            if v.dtype in HALF and (any(not _is_widening(n) for n, _ in v.uses)
                                    or v in g.outputs):
                w = self.cast(v, WIDE, first)
                self.redirect(v, w, keep=w.producer)
        done = {n for n in g.nodes if _is_widening(n) and n.operands[0].kind == "input"}
        for node in list(g.nodes):
            if node.graph is g and node not in done:
                self.rebuild(node)
        g.outputs = [self.cast(v, t.dtype, None) if v.dtype != t.dtype else v
                     for v, t in zip(g.outputs, original, strict=True)]
        live = {v.name for v in g.values()}
        for v, name in zip(g.outputs, names, strict=True):
            if v.name != name and name not in live and v.kind == "result":
                v.name = name  # an output keeps its name when its node was rebuilt or dropped
                live.add(name)
        self.rw.remove_unused_params()


@register_pass
@dataclass(frozen=True)
class WidenActivations(Pass):
    """Compute a float16 / bfloat16 graph in float32, keeping its GEMM weights half."""

    name: ClassVar[str] = "widen-activations"

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        if not has_half_compute(graph):
            return False
        w = _Widen(graph)
        w.run([v.type for v in graph.outputs])
        ctx.stats[self.name] = {"widened_params": len(w.wide_params)}
        return w.rw.changes > 0
