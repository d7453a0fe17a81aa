"""quantize-linears: weight-only int8 dense linears (attention projections, shared experts,
dense MLPs, the LM head).

Every `core.linear` whose weight is a parameter and whose activations are float32 becomes a
`core.linear_q` that reads int8 weights with one scale per output channel (the int8 format of
quantize-experts, moec/ir/quant_ops.py; clip ratio of least squared error); the float weight is
removed from the graph. Activations and biases stay float32; the kernel widens the int8 weights
as it reads them and scales each output column once. A decode step reads a quarter of the
bytes of these weights (half of bf16's): with quantize-experts, what llama.cpp's q8_0 stores.

Linears that score experts are left alone: a result that reaches a top-k within a few ops
that keep its width (an unfused router's softmax, bias, scale) keeps its float weight, so
rounding never changes which experts a token picks. (A fused moe.router holds its own weight.)

CPU targets only (`moec.compile(..., quantize="int8", quantize_dense=True)` appends it after
the pipeline on an LLVM target); the CUDA lowering refuses core.linear_q by name.
Requires: float32 activations (run after widen-activations). Ensures: no float32 parameter
weight is read by a core.linear outside the routers; the removed weights are gone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from moec.ir.graph import Graph, Node, Value
from moec.ir.quant_ops import quantize
from moec.passes.base import Pass, PassContext, register_pass
from moec.passes.rewriter import RewritePattern, Rewriter, apply_patterns

ROUTING_OPS = ("core.topk", "moe.topk")
ROUTING_DEPTH = 4  # element-wise ops between a router's linear and its top-k (softmax, bias)


def scores_experts(v: Value, depth: int = ROUTING_DEPTH) -> bool:
    """Whether `v` (a linear's [..., N] result) reaches a top-k within `depth` ops that keep its
    last dim N: the scores of an unfused router (softmax, sigmoid, a bias, a scale). A path
    that changes the last dim (a norm's weight keeps it, but a fused moe.router reads hidden
    states, not scores) is not a router's: the attention output projection feeding the next
    layer's router through the residual and its norm is quantised."""
    n = v.shape[-1] if v.shape else None
    frontier, seen = [v], set()
    for _ in range(depth):
        nxt = []
        for val in frontier:
            for user in val.users():
                if user.op in ROUTING_OPS:
                    return True
                if id(user) in seen or user.op.startswith("moe.") or user.op in (
                        "core.rmsnorm", "core.layernorm"):
                    continue
                seen.add(id(user))
                nxt.extend(r for r in user.results if r.shape and r.shape[-1] == n)
        frontier = nxt
    return False


@dataclass
class QuantizeLinear(RewritePattern):
    """linear(x, w[, b]) -> linear_q(x, q8(w), scale(w)[, b])."""

    done: dict[str, list[Value]] = field(default_factory=dict)  # a weight read twice: once

    def quantized(self, w: Value, rw: Rewriter) -> list[Value]:
        if w.name not in self.done:
            q, s = quantize(rw.graph.param_array(w), 8, w.shape[1] + w.shape[1] % 2)
            self.done[w.name] = [rw.add_param(f"{w.name}.q8", np.ascontiguousarray(q)),
                                 rw.add_param(f"{w.name}.scale", np.ascontiguousarray(s))]
        return self.done[w.name]

    def match_and_rewrite(self, node: Node, rw: Rewriter) -> bool:
        if node.op != "core.linear":
            return False
        x, w, *b = node.operands
        if w.kind != "param" or x.dtype != "f32" or not isinstance(w.shape[1], int):
            return False
        if any(v.kind != "param" or v.dtype != "f32" for v in b):
            return False
        if scores_experts(node.result):
            return False
        new = rw.create("core.linear_q", [x, *self.quantized(w, rw), *b], {}, loc=node.loc)
        rw.replace_op(node, [new.result])
        return True


@register_pass
@dataclass(frozen=True)
class QuantizeLinears(Pass):
    """Quantise dense linear weights to int8, symmetric, one scale per output channel; routers
    stay float.

    Run after widen-activations (float32 activations). Requires: core.linear with parameter
    weights. Ensures: those outside the routers are core.linear_q; their float weights are
    removed."""

    name: ClassVar[str] = "quantize-linears"

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        changed = apply_patterns(graph, [QuantizeLinear()])
        rw = Rewriter(graph)
        rw.remove_unused_params()
        ctx.stats["quantize-linears.linears"] = len(graph.find("core.linear_q"))
        return changed or rw.changes > 0
