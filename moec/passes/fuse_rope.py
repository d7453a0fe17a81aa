"""fuse-rope: the rotary embedding's elementwise chain -> one core.rope.

Two spellings of the same rotation are matched (x1, x2 the halves of x's last axis):

- rotate-half (Llama, Mixtral, Qwen, OLMoE, PhiMoE, Granite, DBRX, Llama 4...):
  `x * cos + concat(-x2, x1) * sin`, cos/sin of last dim D;
- split halves (GPT-OSS): `concat(x1 * cos - x2 * sin, x2 * cos + x1 * sin)`, cos/sin of last
  dim D/2.

Seven or eight kernels per rotated tensor (two slices, a negation, a concat, products and a
sum) become one, which matters at decode, where every layer rotates q and k of one token.

Run any time (the default pipeline runs it before the last canonicalize, which removes what
the match left dead). Requires: the chain as the frontend emits it (slices of the last axis at
D/2, concat on the last axis). Ensures: core.rope(x, cos, sin) in place of each chain."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from moec.ir.graph import Graph, Node, Value
from moec.passes.base import Pass, PassContext, register_pass
from moec.passes.rewriter import P, RewritePattern, Rewriter, apply_patterns, match


def _half_slices(a: Value, b: Value, x: Value) -> bool:
    """a = x[..., :h] and b = x[..., h:] with h = D/2."""
    d = x.shape[-1] if x.type.rank else None
    if not isinstance(d, int) or d % 2:
        return False
    for v, (lo, hi) in ((a, (0, d // 2)), (b, (d // 2, d))):
        n = v.producer
        if n is None or n.op != "core.slice" or n.operands[0] is not x:
            return False
        at = n.attrs
        stop = d if at["stop"] is None else at["stop"]
        if at["axis"] % x.type.rank != x.type.rank - 1 or at["step"] != 1 or \
                (at["start"], stop) != (lo, hi):
            return False
    return True


def _last_axis(n: Node) -> bool:
    return n.attrs["axis"] % n.result.type.rank == n.result.type.rank - 1


_MUL_COS = P.op("core.mul", P.any("x"), P.any("cos"))
_MUL_ROT = P.op("core.mul", P.op("core.concat", P.op("core.neg", P.any("x2")), P.any("x1"),
                                 name="cat"), P.any("sin"))


class RopeRotateHalf(RewritePattern):
    """add(mul(x, cos), mul(concat(neg(x2), x1), sin)), the add's operands in either order."""

    def match_and_rewrite(self, node: Node, rw: Rewriter) -> bool:
        for pat in (P.op("core.add", _MUL_COS, _MUL_ROT), P.op("core.add", _MUL_ROT, _MUL_COS)):
            m = match(pat, node)
            if m is None:
                continue
            x = m["x"]
            if not _last_axis(m["cat.node"]) or not _half_slices(m["x1"], m["x2"], x):
                continue
            return _replace(rw, node, x, m["cos"], m["sin"])
        return False


class RopeSplitHalves(RewritePattern):
    """concat(sub(mul(x1, cos), mul(x2, sin)), add(mul(x2, cos), mul(x1, sin)))."""

    def match_and_rewrite(self, node: Node, rw: Rewriter) -> bool:
        m = match(P.op("core.concat",
                       P.op("core.sub", P.op("core.mul", P.any("x1"), P.any("cos")),
                            P.op("core.mul", P.any("x2"), P.any("sin"))),
                       P.op("core.add", P.op("core.mul", P.any("x2"), P.any("cos")),
                            P.op("core.mul", P.any("x1"), P.any("sin")))), node)
        if m is None or not _last_axis(node):
            return False
        s1 = m["x1"].producer
        if s1 is None or s1.op != "core.slice":
            return False
        x = s1.operands[0]
        if not _half_slices(m["x1"], m["x2"], x):
            return False
        return _replace(rw, node, x, m["cos"], m["sin"])


def _replace(rw: Rewriter, node: Node, x: Value, cos: Value, sin: Value) -> bool:
    d = x.shape[-1]
    for t in (cos, sin):  # tables must broadcast to x without growing it
        if t.type.rank != x.type.rank or t.dtype != x.dtype or str(t.shape[-1]) not in (
                str(d), str(d // 2)) or any(
                str(td) not in ("1", str(xd)) for td, xd in zip(t.shape[:-1], x.shape[:-1],
                                                                 strict=True)):
            return False
    if str(node.result.type) != str(x.type):
        return False
    out = rw.create("core.rope", [x, cos, sin], loc=node.loc).result
    rw.replace_op(node, [out])
    return True


@register_pass
@dataclass(frozen=True)
class FuseRope(Pass):
    """Fuse the rotary embedding's elementwise chain into one core.rope."""

    name: ClassVar[str] = "fuse-rope"

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        return apply_patterns(graph, [RopeRotateHalf(), RopeSplitHalves()])
