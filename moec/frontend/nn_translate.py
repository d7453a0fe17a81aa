"""ATen translations for whole transformer models (moec/ir/nn_ops.py): embedding, positions,
rotary math, slicing, concatenation, splits, and the `moec::attention` call that
`moec.frontend.hf_model` routes every attention module's core through.

`NN_HANDLERS` is merged into the translator's table (moec.frontend.aten_translate); each handler
takes the translator and the fx node. `fold_slice_writes` rewrites the "allocate, then copy into
slices" idiom (DeepSeek-V3's key assembly) into one `aten.cat` before translation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from moec.frontend.fx_util import op_name
from moec.ir import Value
from moec.ir.types import same_dim

BIG = 2 ** 62  # slice ends at or past this mean "to the end" (torch writes sys.maxsize)


def _embedding(tr: Any, n: fx.Node) -> Value:
    w = tr.val(n.args[0])
    ids = tr.val(n.args[1])
    if ids.dtype not in ("i32", "i64"):
        raise tr.unsupported(f"embedding with {ids.dtype} ids")
    return tr.emit("core.embedding", [w, ids])


def _arange(tr: Any, n: fx.Node) -> Value:
    name = op_name(n)
    start, end = (0, n.args[0]) if name == "aten.arange.default" else n.args[:2]
    step = n.args[2] if name == "aten.arange.start_step" else 1
    end = tr.env.get(end, end) if isinstance(end, fx.Node) else end
    if start != 0 or step != 1:
        from moec.frontend.aten_translate import _Const
        from moec.frontend.complex_translate import fold_constant

        folded = fold_constant(tr, n, _Const)  # static bounds: a constant
        if folded is None:
            raise tr.unsupported(f"arange({start}, {end}, {step}): only arange(n) and "
                                 f"constant ranges are translated")
        return folded
    _, dtype = tr.meta(n)
    for v in tr.b.graph.inputs:  # a graph input that has the length as one of its dims
        for ax, d in enumerate(v.shape):
            if same_dim(d, end):
                return tr.emit("core.arange", [v], {"axis": ax, "dtype": dtype})
    raise tr.unsupported(f"arange of length {end}, which is no dim of a graph input")


def _unary(op: str) -> Callable[[Any, fx.Node], Value]:
    return lambda tr, n: tr.emit(op, [tr.val(n.args[0])])


def _slice_of(tr: Any, x: Value, axis: int, start: int, stop: int | None, step: int = 1
              ) -> Value:
    axis %= x.type.rank
    size = x.shape[axis]
    if stop is not None and stop >= BIG:
        stop = None
    if isinstance(size, int):
        start = max(0, start + size if start < 0 else start)
        if stop is not None:
            stop = min(size, stop + size if stop < 0 else stop)
        if stop == size:
            stop = None
    elif start < 0 or (stop is not None and stop < 0):
        raise tr.unsupported(f"slice {start}:{stop} of the symbolic dim {size}")
    if start == 0 and stop is None and step == 1:
        return x
    return tr.emit("core.slice", [x], {"axis": axis, "start": start, "stop": stop,
                                       "step": step})


def _static(tr: Any, v: Any, what: str) -> int | None:
    if v is None or isinstance(v, int):
        return v
    raise tr.unsupported(f"{what} {v} is not a static integer")


def _slice(tr: Any, n: fx.Node) -> Value:
    x = tr.val(n.args[0])
    axis = tr.arg(1, "dim", 0)
    start = _static(tr, tr.arg(2, "start", None), "slice start") or 0
    end = tr.arg(3, "end", None)
    if isinstance(end, fx.Node):  # x[:, :T] with T the whole dim: nothing to cut
        d = tr.env.get(end)
        if same_dim(d, x.shape[axis % x.type.rank]):
            end = None
        else:
            raise tr.unsupported(f"slice ending at the symbolic size {d}")
    return _slice_of(tr, x, axis, start, end, int(tr.arg(4, "step", 1)))


def _select(tr: Any, n: fx.Node) -> Value:
    x = tr.val(n.args[0])
    axis, index = int(n.args[1]) % x.type.rank, _static(tr, n.args[2], "select index")
    size = x.shape[axis]
    if isinstance(size, int) and index < 0:
        index += size
    if index < 0:
        raise tr.unsupported("select with a negative index on a symbolic dim")
    y = _slice_of(tr, x, axis, index, index + 1)
    shape, _ = tr.meta(n)
    target = [-1 if not isinstance(d, int) else d for d in shape]
    return tr.emit("core.reshape", [y], {"shape": target})


def _cat(tr: Any, n: fx.Node) -> Value:
    _, dtype = tr.meta(n)
    parts = [tr.val(t, dtype) for t in n.args[0]]
    parts = [p for p in parts if not (isinstance(p.shape[0], int) and 0 in p.shape)] or parts
    axis = int(tr.arg(1, "dim", 0)) % parts[0].type.rank
    if len(parts) == 1:
        return parts[0]
    return tr.emit("core.concat", parts, {"axis": axis})


def _split(tr: Any, n: fx.Node) -> tuple[Value, ...]:
    x = tr.val(n.args[0])
    axis = int(tr.arg(2, "dim", 0)) % x.type.rank
    sizes = n.args[1]
    size = x.shape[axis]
    if op_name(n) == "aten.chunk.default":  # chunk(n): chunks of ceil(size / n)
        if not isinstance(size, int):
            raise tr.unsupported("chunk of a symbolic dim")
        sizes = -(-size // int(sizes))
    if isinstance(sizes, int):  # aten.split.Tensor: chunks of `sizes`
        if not isinstance(size, int):
            raise tr.unsupported("split of a symbolic dim")
        sizes = [min(sizes, size - s) for s in range(0, size, sizes)]
    outs, start = [], 0
    for s in sizes:
        outs.append(_slice_of(tr, x, axis, start, start + int(s)))
        start += int(s)
    return tuple(outs)


def _to_device(tr: Any, n: fx.Node) -> Value:
    return tr.val(n.args[0], tr.meta(n)[1])


def _attention(tr: Any, n: fx.Node) -> Value:
    q, k, v = (tr.val(a) for a in n.args[:3])
    return tr.emit("core.attention", [q, k, v], {"scale": float(n.args[3])})


def _cache_write(tr: Any, n: fx.Node) -> Value:
    a = tr._custom_args(n)
    return tr.emit("core.cache_write", [tr.val(a["cache"]), tr.val(a["x"]), tr.val(a["slots"])],
                   {"layer": int(a["layer"]), "transposed": bool(a["transposed"])})


def _paged_attention(tr: Any, n: fx.Node) -> Value:
    a = tr._custom_args(n)
    ops = [tr.val(a[k]) for k in ("q", "k_cache", "v_cache", "q_start", "q_len", "kv_len",
                                  "block_table")]
    if a["sinks"] is not None:
        ops.append(tr.val(a["sinks"]))
    return tr.emit("core.paged_attention", ops, {
        "layer": int(a["layer"]), "scale": float(a["scale"]), "window": int(a["window"]),
        "chunk": int(a["chunk"]), "sinks": a["sinks"] is not None})


def _linear_heads(tr: Any, n: fx.Node) -> Value:
    return tr.emit("core.linear_heads", [tr.val(n.args[0]), tr.val(n.args[1])])


def _index(tr: Any, n: fx.Node) -> Value:
    """x[..., idx, ...] with one integer index tensor (the LM head's `logits_to_keep` rows):
    the rows of x viewed as [outer, n, inner] picked by `core.take`."""
    x = tr.val(n.args[0])
    idx = list(n.args[1])
    pos = [i for i, t in enumerate(idx) if t is not None]
    if len(pos) != 1:
        raise tr.unsupported("indexing with more than one index tensor")
    axis = pos[0]
    ids = tr.val(idx[axis])
    if ids.dtype not in ("i32", "i64") or ids.type.rank != 1:
        raise tr.unsupported(f"indexing with a {ids.type} index (1-D integers only)")
    if any(not isinstance(d, int) or d != 1 for d in x.shape[:axis]):
        raise tr.unsupported(f"indexing axis {axis} of {x.type} (leading dims must be 1)")
    rows = x
    if axis:
        rows = tr.emit("core.reshape", [x], {"shape": [-1, *x.shape[axis + 1:]]})
    if rows.type.rank > 2:
        raise tr.unsupported(f"indexing rows of {rows.type} (2-D tables only)")
    out = tr.emit("core.embedding", [rows, ids])
    shape, _ = tr.meta(n)
    if out.type.rank != len(shape):
        out = tr.emit("core.reshape", [out], {"shape": [-1 if not isinstance(d, int) else d
                                                         for d in shape]})
    return out


def _softplus(tr: Any, n: fx.Node) -> Value:
    beta, threshold = tr.arg(1, "beta", 1), tr.arg(2, "threshold", 20)
    # torch returns x itself where beta*x > threshold; log(1 + e^x) differs from x there by
    # less than e^-threshold, below float32 precision for the default threshold 20
    if beta != 1 or threshold < 16:
        raise tr.unsupported(f"softplus with beta={beta}, threshold={threshold} (moec has "
                             "core.softplus = log(1 + e^x), beta 1)")
    return tr.emit("core.softplus", [tr.val(n.args[0])])


NN_HANDLERS: dict[str, Callable[[Any, fx.Node], Any]] = {
    "aten.embedding": _embedding,
    "aten.softplus": _softplus,
    "aten.arange": _arange,
    "aten.cos": _unary("core.cos"),
    "aten.sin": _unary("core.sin"),
    "aten.slice": _slice,
    "aten.select": _select,
    "aten.cat": _cat,
    "aten.concat": _cat,
    "aten.split_with_sizes": _split,
    "aten.split": _split,
    "aten.chunk": _split,
    "aten.to.device": _to_device,
    "moec.attention": _attention,
    "moec.cache_write": _cache_write,
    "moec.paged_attention": _paged_attention,
    "moec.linear_heads": _linear_heads,
    "aten.index.Tensor": _index,
}


def fold_slice_writes(graph: fx.Graph) -> int:
    """Rewrite `buf = new_empty(...); buf[..., a:b].copy_(x); buf[..., b:c].copy_(y)` (the
    slices tiling `buf` along one axis) into `buf = cat([x, y], axis)`. Returns the count."""
    count = 0
    for node in list(graph.nodes):
        if op_name(node) not in ("aten.new_empty.default", "aten.empty.memory_format"):
            continue
        val = node.meta.get("val")
        writes, readers = [], []
        for u in node.users:
            cps = list(u.users)
            if op_name(u) == "aten.slice.Tensor" and len(cps) == 1 and \
                    op_name(cps[0]) == "aten.copy_.default" and cps[0].args[0] is u:
                writes.append((u, cps[0]))
            else:
                readers.append(u)
        if not writes or not isinstance(val, torch.Tensor):
            continue
        axes = {int(s.args[1]) % val.dim() for s, _ in writes}
        if len(axes) != 1 or any(len(s.args) > 4 for s, _ in writes):
            continue
        axis = axes.pop()
        size = val.shape[axis]
        spans = sorted(((int(s.args[2]), min(int(s.args[3]), int(size)), s, c)
                        for s, c in writes), key=lambda t: t[0])
        pos = 0
        for lo, hi, _, _ in spans:
            if lo != pos:
                break
            pos = hi
        if pos != size:
            continue
        last = max((c for _, _, _, c in spans), key=lambda c: list(graph.nodes).index(c))
        with graph.inserting_after(last):
            cat = graph.call_function(torch.ops.aten.cat.default,
                                      ([c.args[1] for _, _, _, c in spans], axis))
        cat.meta.update(node.meta)
        for r in readers:
            r.replace_input_with(node, cat)
        for _, _, s, c in spans:
            graph.erase_node(c)
            graph.erase_node(s)
        graph.erase_node(node)
        count += 1
    return count
