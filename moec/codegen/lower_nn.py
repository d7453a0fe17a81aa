"""Lowering of the whole-model ops (moec/ir/nn_ops.py) and of `core.linear` over N-D inputs;
called by moec.codegen.lower for the ops in its `_NN_OPS`. Kernels: moec.codegen.kernels.nn for
the CPU, moec.codegen.cuda.nn (same builders) when the lowerer targets CUDA."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from tvm import relax

from moec.codegen import kernels as K
from moec.errors import CodegenError
from moec.ir.graph import Node, Value
from moec.ir.types import DimLike, tvm_dtype


def _key(shape: tuple[DimLike, ...]) -> tuple[int | str, ...]:
    from moec.codegen.lower import _shape_key

    return _shape_key(shape)


def _library(lw: Any) -> Any:
    """The nn kernel builders of the lowerer's target: CPU or CUDA (same names and signatures)."""
    if lw.cuda:
        from moec.codegen.cuda import nn as cuda_nn
        from moec.codegen.cuda import rope as cuda_rope

        return _Merged(cuda_nn, cuda_rope)
    from moec.codegen.kernels import attention as cpu_attention
    from moec.codegen.kernels import nn as cpu_nn

    return _Merged(cpu_nn, cpu_attention)


class _Merged:
    """Builders looked up in several kernel modules, in order."""

    def __init__(self, *mods: Any) -> None:
        self._mods = mods

    def __getattr__(self, name: str) -> Any:
        for m in self._mods:
            if hasattr(m, name):
                return getattr(m, name)
        raise AttributeError(name)


def _emit(lw: Any, key: tuple, build: Callable[[], K.Kernel], args: list[relax.Expr],
          shape: tuple[DimLike, ...], dtype: str) -> relax.Expr:
    _, gv = lw.kernel(key, build)
    sinfo = relax.TensorType([lw.dim(d) for d in shape], tvm_dtype(dtype))
    return lw.bb.emit(relax.call_tir(gv, args, sinfo))


def _rows(shape: tuple[DimLike, ...]) -> DimLike:
    """The product of `shape` (static dims folded first)."""
    rows: DimLike = math.prod(d for d in shape if isinstance(d, int))
    for d in shape:
        if not isinstance(d, int):
            rows = d if rows == 1 else rows * d
    return rows


def lower_rows_2d(lw: Any, n: Node, key: tuple, build: Callable[[tuple], K.Kernel]) -> None:
    """A last-axis row op (softmax, sum/mean with keepdim, RMSNorm, LayerNorm) on x [..., n] as
    its 2-D kernel on x viewed as [rows, n], the result viewed back (Relax reshapes are free).
    For CUDA: TVM lowers the cross-thread reduction of a block-per-row kernel only when the
    row is one loop; over several fused dims it silently emitted a racy shared-memory update.
    `build((rows, n))` makes the 2-D kernel; its output is [rows, n], or [rows, 1] for sums."""
    x = n.operands[0]
    rows, last = _rows(x.shape[:-1]), x.shape[-1]
    s2 = (_key((rows,))[0], last)
    kern, gv = lw.kernel((*key, s2), lambda: build(s2))
    args = lw.args(n, kern)
    args[0] = lw.bb.emit(relax.op.reshape(lw.value(x), [lw.dim(rows), lw.dim(last)]))
    out = n.result
    width = last if len(out.shape) == len(x.shape) and out.shape[-1] == last else 1
    y = lw.bb.emit(relax.call_tir(gv, args, relax.TensorType([lw.dim(rows), width],
                                                             tvm_dtype(out.dtype))))
    lw.vals[out] = lw.bb.emit(relax.op.reshape(y, [lw.dim(d) for d in out.shape]))


def lower_linear_nd(lw: Any, n: Node, dt: str) -> None:
    """`core.linear` on x [..., K]: reshape to [rows, K], the 2-D kernel, reshape back."""
    x, w = n.operands[0], n.operands[1]
    rows = _rows(x.shape[:-1])
    kk, nn = x.shape[-1], w.shape[0]
    bias = len(n.operands) == (4 if n.op == "core.linear_q" else 3)
    m = _key((rows,))[0]
    wd = lw.weight_dtype(dt, n.operands[1].type)
    kern, gv = lw.kernel(("core.linear", m, kk, nn, dt, bias, *wd.values()),
                         lambda: lw.K.linear(m, kk, nn, dt, bias, **wd))
    args = lw.args(n, kern)
    args[0] = lw.bb.emit(relax.op.reshape(lw.value(x), [lw.dim(rows), lw.dim(kk)]))
    y = lw.bb.emit(relax.call_tir(gv, args, relax.TensorType([lw.dim(rows), nn], dt)))
    lw.vals[n.result] = lw.bb.emit(relax.op.reshape(y, [lw.dim(d) for d in n.result.shape]))


def lower_nn(lw: Any, n: Node, dt: str) -> None:
    a, op = n.attrs, n.op
    NK = _library(lw)
    ins = [v.type for v in n.operands]
    s0 = _key(ins[0].shape)
    out = _key(n.result.shape)
    if op == "core.embedding":
        V, H = _key(ins[0].shape)
        idt = tvm_dtype(ins[1].dtype)
        si = _key(ins[1].shape)
        lw.call(n, (op, V, H, si, dt, idt), lambda: NK.embedding(V, H, si, dt, idt))
    elif op == "core.arange":
        odt = tvm_dtype(a["dtype"])
        lw.call(n, (op, s0, dt, a["axis"], odt), lambda: NK.arange(s0, a["axis"], odt, dt))
    elif op in ("core.cos", "core.sin"):
        name = op.split(".")[1]
        lw.call(n, (op, s0, dt), lambda: NK.unary_trig(name, s0, dt))
    elif op == "core.permute_dims":
        perm = tuple(a["perm"])
        lw.call(n, (op, s0, dt, perm), lambda: NK.permute_dims(s0, perm, dt))
    elif op == "core.slice":
        lw.call(n, (op, s0, out, dt, a["axis"], a["start"], a["step"]),
                lambda: NK.slice_axis(s0, out, a["axis"], a["start"], a["step"], dt))
    elif op == "core.broadcast_to":
        lw.call(n, (op, s0, out, dt), lambda: NK.broadcast_to(s0, out, dt))
    elif op == "core.concat":
        _concat(lw, n, dt)
    elif op == "core.attention":
        q, k, v = ins
        B, Hq, _, D = q.shape
        Hkv, Dv = k.shape[1], v.shape[3]
        if not all(isinstance(d, int) for d in (B, Hq, Hkv, D, Dv)):
            raise CodegenError(f"{n!r}: core.attention needs static batch, heads and head dims")
        sc = float(a["scale"])
        lw.call(n, (op, B, Hq, Hkv, D, Dv, sc, dt),
                lambda: NK.attention(B, Hq, Hkv, D, Dv, sc, dt))
    elif op == "core.rope":
        sc = _key(ins[1].shape)
        lw.call(n, (op, s0, sc, dt), lambda: NK.rope(s0, sc, dt))
    elif op == "core.linear_heads":
        x, w = ins
        lead = _key(x.shape[:-2])
        H, N, K = w.shape
        wd = lw.weight_dtype(dt, w)
        lw.call(n, (op, lead, H, N, K, dt, *wd.values()),
                lambda: NK.linear_heads(lead, H, N, K, dt, **wd))
    elif op == "core.cache_write":
        _cache_write(lw, n, NK)
    elif op == "core.paged_attention":
        _paged_attention(lw, n, NK)
    else:
        raise CodegenError(f"{n!r}: no {'CUDA' if lw.cuda else 'CPU'} kernel for {op}")


def _cache_write(lw: Any, n: Node, NK: Any) -> None:
    """In place: the kernel writes into the cache operand, which the result then is."""
    cache, x = n.operands[0].type, n.operands[1].type
    L, _, H = cache.shape[:3]
    tr = n.attrs["transposed"]
    BS, D = (cache.shape[4], cache.shape[3]) if tr else (cache.shape[3], cache.shape[4])
    dt, xdt = tvm_dtype(cache.dtype), tvm_dtype(x.dtype)
    layer = n.attrs["layer"]
    _, gv = lw.kernel(("core.cache_write", L, H, BS, D, layer, tr, dt, xdt),
                      lambda: NK.cache_write(L, H, BS, D, layer, tr, dt, xdt))
    args = [lw.value(v) for v in n.operands]
    lw.vals[n.result] = lw.bb.emit(relax.call_tir_inplace(gv, args, [0], lw.sinfo(n.result)))


def _paged_attention(lw: Any, n: Node, NK: Any) -> None:
    """The general step kernel, or in a decode function the decode kernel (one query token
    per sequence), whose second output is its scratch for split contexts."""
    q, kc, vc = (v.type for v in n.operands[:3])
    L, _, Hkv, D, BS = kc.shape
    Hq, Dv = q.shape[1], vc.shape[4]
    a = n.attrs
    dt = tvm_dtype(q.dtype)
    dec = bool(lw.decode)
    key = ("core.paged_attention", L, Hq, Hkv, D, Dv, BS, a["layer"], a["scale"], a["window"],
           a["chunk"], a["sinks"], dt, dec)
    _, gv = lw.kernel(key, lambda: NK.paged_attention(
        L, Hq, Hkv, D, Dv, BS, a["layer"], a["scale"], window=a["window"], chunk=a["chunk"],
        sinks=a["sinks"], dtype=dt, decode=dec))
    args = [lw.value(v) for v in n.operands]
    out = lw.sinfo(n.result)
    if not dec:
        lw.vals[n.result] = lw.bb.emit(relax.call_tir(gv, args, out))
        return
    t = lw.dim(q.shape[2])
    part = relax.TensorType([t, Hq, NK.MAX_SPLITS, Dv + 2], "float32")
    res = lw.bb.emit(relax.call_tir(gv, args, [out, part]))
    lw.vals[n.result] = lw.bb.emit(relax.TupleGetItem(res, 0))


def _concat(lw: Any, n: Node, dt: str) -> None:
    """Pairwise concat2 kernels, left to right (operands are few: rotary halves, MLA parts)."""
    axis = n.attrs["axis"]
    NK = _library(lw)
    vals: list[Value] = list(n.operands)
    acc = lw.value(vals[0])
    shape = vals[0].shape
    for v in vals[1:]:
        sa, sb = _key(shape), _key(v.shape)
        new = list(shape)
        new[axis] = shape[axis] + v.shape[axis]
        if len(vals) == 2 or v is vals[-1]:
            new = list(n.result.shape)
        acc = _emit(lw, ("core.concat", sa, sb, axis, dt),
                    lambda sa=sa, sb=sb: NK.concat2(sa, sb, axis, dt),
                    [acc, lw.value(v)], tuple(new), n.result.dtype)
        shape = tuple(new)
    lw.vals[n.result] = acc
