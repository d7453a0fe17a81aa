"""Helpers over exported fx graphs: op names, where a node came from (module path, source line),
liveness, and the eager RMSNorm idiom."""

from __future__ import annotations

import operator
import re
from collections.abc import Callable

import torch
from torch import fx

CASTS = {"aten.to.dtype", "aten._to_copy.default", "aten.to.dtype_layout", "aten.type_as.default"}
SIDE_EFFECT_ONLY = ("aten._assert", "aten.sym_constrain_range", "aten._functional_assert")


def op_name(node: fx.Node) -> str:
    """`aten.add.Tensor`, `moec.moe_block.default`, `getitem`, ... for a call node."""
    if node.target is operator.getitem:
        return "getitem"
    return str(node.target) if isinstance(node.target, torch._ops.OpOverload) else getattr(
        node.target, "__name__", str(node.target))


def module_path(node: fx.Node) -> tuple[str, str]:
    """(module path, class name) of the innermost module a node came from."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, cls = list(stack.values())[-1]
    cls_name = cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))
    return path, cls_name.rsplit(".", 1)[-1]


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in [^\n]*\n\s*([^\n]*)')


def source_line(node: fx.Node) -> str:
    """`file:line: code` of the innermost user frame (outside torch) that produced a node."""
    frames = _FRAME.findall(node.meta.get("stack_trace") or "")
    user = [f for f in frames if "/torch/" not in f[0].replace("\\", "/")] or frames
    if not user:
        return ""
    file, line, code = user[-1]
    return f"{file}:{line}: {code.strip()}"


def describe(node: fx.Node) -> str:
    """Where a node came from, for error messages."""
    path, cls = module_path(node)
    where = f"in module '{path}' ({cls})" if path else f"in the root module ({cls or '?'})"
    src = source_line(node)
    return f"{where}, {src}" if src else where


def live_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes the graph's output depends on (assertions and dead code are left out)."""
    out = next(n for n in graph.nodes if n.op == "output")
    live, todo = set(), [out]
    while todo:
        n = todo.pop()
        if n not in live:
            live.add(n)
            todo.extend(n.all_input_nodes)
    return live


def users(n: fx.Node) -> set[fx.Node]:
    """Users of a node that read its value (not side-effect-only assertions)."""
    return {u for u in n.users if not op_name(u).startswith(SIDE_EFFECT_ONLY)}


def find_rmsnorms(graph: fx.Graph, is_weight: Callable[[fx.Node], bool]
                  ) -> tuple[dict[fx.Node, tuple[fx.Node, fx.Node, float]], set[fx.Node]]:
    """Find `w * cast?(h * rsqrt(mean(h^2, -1, keepdim=True) + eps))` with h = cast?(x) and
    `is_weight(w)` (a 1-D parameter). Returns {final mul: (x, w, eps)} and the interior nodes,
    which are used by nothing else and need no translation of their own."""
    finals: dict[fx.Node, tuple[fx.Node, fx.Node, float]] = {}
    interior: set[fx.Node] = set()
    for final in graph.nodes:
        if op_name(final) != "aten.mul.Tensor" or len(final.args) != 2:
            continue
        for w, m in (final.args, final.args[::-1]):
            if not (isinstance(w, fx.Node) and is_weight(w) and isinstance(m, fx.Node)):
                continue
            found = _match_normalize(m)
            if found is None:
                continue
            x, eps, inner = found
            if any(not users(i) <= inner | {final} for i in inner):
                continue
            finals[final] = (x, w, eps)
            interior |= inner
            break
    return finals, interior


def _match_normalize(m: fx.Node) -> tuple[fx.Node, float, set[fx.Node]] | None:
    inner: set[fx.Node] = set()
    while op_name(m) in CASTS:
        inner.add(m)
        m = m.args[0]
    if op_name(m) != "aten.mul.Tensor" or not all(isinstance(a, fx.Node) for a in m.args):
        return None
    for h, r in (m.args, m.args[::-1]):
        if op_name(r) != "aten.rsqrt.default":
            continue
        add = r.args[0]
        if not (isinstance(add, fx.Node) and op_name(add) in ("aten.add.Tensor", "aten.add.Scalar")
                and isinstance(add.args[1], (int, float)) and isinstance(add.args[0], fx.Node)):
            continue
        mean = add.args[0]
        rank = len(h.meta["val"].shape)
        if op_name(mean) != "aten.mean.dim" or list(mean.args[1]) not in ([-1], [rank - 1]) \
                or not (len(mean.args) > 2 and mean.args[2] or mean.kwargs.get("keepdim")):
            continue
        sq = mean.args[0]
        ok = (op_name(sq) == "aten.pow.Tensor_Scalar" and sq.args[0] is h and sq.args[1] == 2) \
            or (op_name(sq) == "aten.mul.Tensor" and sq.args[0] is h and sq.args[1] is h)
        if not ok:
            continue
        inner |= {m, r, add, mean, sq}
        x = h
        while op_name(x) in CASTS and users(x) <= inner:
            inner.add(x)
            x = x.args[0]
        return x, float(add.args[1]), inner
    return None
