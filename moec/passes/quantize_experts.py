"""quantize-experts: weight-only int8 / int4 expert weights for the grouped GEMMs.

Every `moe.grouped_matmul` whose weights are parameters becomes a `moe.grouped_matmul_q` that
reads the quantised weights (formats in moec/ir/quant_ops.py: int8 symmetric per output channel;
int4 group-wise along K with scales and zero points, two values per byte); the fp32 expert
weights are removed from the graph, so the artifact stores only the quantised ones. Activations,
biases and routing stay fp32; the kernels dequantise inside the GEMM.

A weight the frontend read already quantised (ONNX QMoE in a format moec's kernels read, see
`Graph.quant_forms`) keeps its exact parts; `moec.compile` appends `quantize-experts{only_exact}`
by itself for such graphs, so a QMoE model runs on the quantised kernels with its own values.

Run after tile-expert-gemm (`moec compile --quantize int8|int4` appends it to the pipeline).
Requires: moe.grouped_matmul with parameter weights (int4: even K). Ensures: no fp32 expert
weight is read by a grouped GEMM it could quantise; the removed weights are gone from the graph.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from moec.errors import PassError
from moec.ir.graph import Graph, Node, Value
from moec.ir.moe_ops import gmm_operands
from moec.ir.quant_ops import quantize
from moec.passes.base import Pass, PassContext, register_pass
from moec.passes.rewriter import RewritePattern, Rewriter, apply_patterns

MODES = {"int8": 8, "int4": 4}
DEFAULT_INT4_GROUP = 128


def parse_mode(mode: str) -> tuple[int, int]:
    """`int8` | `int4` | `int8-g32` | `int4-g64` -> (bits, group_size; 0: the format's default,
    per output channel for int8, 128 for int4)."""
    m = re.fullmatch(r"(int8|int4)(?:-g(\d+))?", mode or "")
    if not m or (m.group(2) is not None and (int(m.group(2)) < 2 or int(m.group(2)) % 2)):
        raise PassError(f"quantize mode {mode!r}: want int8, int4, or a group size along K "
                        f"as in int8-g32 / int4-g64 (an even number)")
    return MODES[m.group(1)], int(m.group(2) or 0)


@dataclass
class QuantizeGemm(RewritePattern):
    """grouped_matmul(x, W...) -> grouped_matmul_q(x, q(W), scale(W)[, zero(W)]...)."""

    bits: int
    group_size: int
    only_exact: bool = False
    done: dict[str, list[Value]] = field(default_factory=dict)  # a weight read twice: once

    def group(self, k: int) -> int:
        """The group size along K that the op records (even, as the format wants)."""
        if self.group_size:
            return self.group_size
        return k + k % 2 if self.bits == 8 else DEFAULT_INT4_GROUP

    def quantized(self, w: Value, rw: Rewriter, bits: int, group: int) -> list[Value]:
        if w.name not in self.done:
            form = rw.graph.quant_forms.get(w.name)
            parts = form[2] if form is not None else quantize(rw.graph.param_array(w), bits,
                                                               group)
            names = ("q8", "scale") if bits == 8 else ("q4", "scale", "zero")
            self.done[w.name] = [rw.add_param(f"{w.name}.{n}", np.ascontiguousarray(p))
                                 for n, p in zip(names, parts, strict=True)]
        return self.done[w.name]

    def match_and_rewrite(self, node: Node, rw: Rewriter) -> bool:
        if node.op != "moe.grouped_matmul":
            return False
        x, ws, bs, sid, te = gmm_operands(node.operands, node.attrs)
        if any(w.kind != "param" for w in ws):
            return False
        forms = {rw.graph.quant_forms.get(w.name, (None, None, ()))[:2] for w in ws}
        if len(forms) == 1 and None not in next(iter(forms)):
            bits, group = next(iter(forms))  # the model's own quantised weights, exactly
        elif self.only_exact:
            return False
        else:
            bits, group = self.bits, self.group(ws[0].shape[2])
            if bits == 4 and ws[0].shape[2] % 2:
                return False  # odd K has no packed int4 form: this GEMM stays fp32
        qs = [v for w in ws for v in self.quantized(w, rw, bits, group)]
        attrs = {**node.attrs, "bits": bits, "group_size": group}
        new = rw.create("moe.grouped_matmul_q", [x, *qs, *bs, sid, te], attrs, loc=node.loc)
        rw.replace_op(node, [new.result])
        return True


@register_pass
@dataclass(frozen=True)
class QuantizeExperts(Pass):
    """Quantise expert GEMM weights to int8 (symmetric) or int4 (zero points), one scale per
    group of `group_size` along K; 0 (default): per output channel for int8, 128 for int4.
    Weights whose exact quantised form the frontend recorded (`graph.quant_forms`, from an ONNX
    QMoE) keep that form and its bits whatever `bits` says; `only_exact`: quantise only those
    (what `moec.compile` runs by itself on such a graph).

    Run after tile-expert-gemm. Requires: moe.grouped_matmul with parameter weights.
    Ensures: those GEMMs are moe.grouped_matmul_q; their fp32 weights are removed."""

    name: ClassVar[str] = "quantize-experts"
    bits: int = 8
    group_size: int = 0
    only_exact: bool = False

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        if self.bits not in (8, 4):
            raise PassError(f"quantize-experts: bits must be 8 or 4, got {self.bits}")
        if self.group_size and (self.group_size < 2 or self.group_size % 2):
            raise PassError(f"quantize-experts: group_size must be even (or 0 for the "
                            f"default), got {self.group_size}")
        changed = apply_patterns(graph, [QuantizeGemm(self.bits, self.group_size,
                                                      self.only_exact)])
        rw = Rewriter(graph)
        rw.remove_unused_params()
        ctx.stats["quantize-experts.gemms"] = len(graph.find("moe.grouped_matmul_q"))
        return changed or rw.changes > 0
