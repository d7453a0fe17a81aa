"""`core` ops for whole transformer models: embedding lookup, positions, rotary math, data
movement (permute, slice, concat, broadcast) and fused causal attention with grouped-query heads.

Semantics are documented in docs/ops.md; the numpy functions here are the reference.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from moec.errors import IRError
from moec.ir.registry import REQUIRED, OpDef, register_op
from moec.ir.types import FLOAT_DTYPES, DimLike, TensorType, same_dim

A = Mapping[str, Any]
INT_DTYPES = ("i32", "i64")


def _f(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float64) if x.dtype == np.float64 else x.astype(np.float32)


def _axis(axis: int, rank: int, op: str) -> int:
    if not -rank <= axis < rank:
        raise IRError(f"{op}: axis {axis} out of range for rank {rank}")
    return axis % rank


# --------------------------------------------------------------------------- embedding, positions


def _infer_embedding(ts: list[TensorType], a: A) -> list[TensorType]:
    w, ids = ts
    if w.rank != 2 or ids.dtype not in INT_DTYPES:
        raise IRError(f"core.embedding: want table [V, H] and integer ids, got {w} and {ids}")
    return [TensorType(ids.shape + (w.shape[1],), w.dtype)]


def _ref_embedding(xs: list[np.ndarray], a: A) -> list[np.ndarray]:
    w, ids = xs
    if ids.size and (ids.min() < 0 or ids.max() >= w.shape[0]):
        raise IRError(f"core.embedding: id out of range [0, {w.shape[0]})")
    return [w[ids.astype(np.int64)]]


register_op(OpDef("core.embedding", (2, 2), _infer_embedding, _ref_embedding,
                  doc="rows of table w [V, H] picked by integer ids: [..., H]"))


def _infer_arange(ts: list[TensorType], a: A) -> list[TensorType]:
    like = ts[0]
    if like.rank < 1:
        raise IRError(f"core.arange: want a tensor whose dim `axis` is the length, got {like}")
    ax = _axis(a["axis"], like.rank, "core.arange")
    return [TensorType((like.shape[ax],), a["dtype"])]


def _ref_arange(xs: list[np.ndarray], a: A) -> list[np.ndarray]:
    n = xs[0].shape[a["axis"]]
    return [np.arange(n, dtype=np.int64 if a["dtype"] == "i64" else np.int32)]


register_op(OpDef("core.arange", (1, 1), _infer_arange, _ref_arange,
                  attrs={"axis": 0, "dtype": "i64"},
                  doc="0, 1, ..., n-1 where n = dim `axis` of the operand (positions)"))


def _infer_float_unary(name: str):
    def infer(ts: list[TensorType], a: A) -> list[TensorType]:
        if ts[0].dtype not in FLOAT_DTYPES:
            raise IRError(f"{name}: expected a float tensor, got {ts[0]}")
        return [ts[0]]
    return infer


for _n, _fn in {"cos": np.cos, "sin": np.sin}.items():
    register_op(OpDef(f"core.{_n}", (1, 1), _infer_float_unary(f"core.{_n}"),
                      (lambda fn: lambda xs, a: [fn(_f(xs[0])).astype(xs[0].dtype)])(_fn),
                      doc=f"elementwise {_n}"))

# --------------------------------------------------------------------------- data movement


def _infer_permute(ts: list[TensorType], a: A) -> list[TensorType]:
    x, perm = ts[0], [int(p) for p in a["perm"]]
    if sorted(perm) != list(range(x.rank)):
        raise IRError(f"core.permute_dims: perm {perm} is not a permutation of {x.rank} axes")
    return [TensorType(tuple(x.shape[p] for p in perm), x.dtype)]


register_op(OpDef("core.permute_dims", (1, 1), _infer_permute,
                  lambda xs, a: [np.ascontiguousarray(np.transpose(xs[0], a["perm"]))],
                  attrs={"perm": REQUIRED}, doc="y = x.transpose(perm), materialised"))


def _slice_len(n: DimLike, start: int, stop: int | None, step: int, op: str) -> DimLike:
    if step < 1 or start < 0 or (stop is not None and stop < start):
        raise IRError(f"{op}: want 0 <= start <= stop and step >= 1, got {start}:{stop}:{step}")
    if stop is None:
        if not isinstance(n, int):
            if step != 1:
                raise IRError(f"{op}: a strided slice of a symbolic dim needs a static stop")
            return n - start if start else n
        stop = n
    if isinstance(n, int) and stop > n:
        raise IRError(f"{op}: stop {stop} is past the end of dim {n}")
    return -(-(stop - start) // step)


def _infer_slice(ts: list[TensorType], a: A) -> list[TensorType]:
    x = ts[0]
    ax = _axis(a["axis"], x.rank, "core.slice")
    shape = list(x.shape)
    shape[ax] = _slice_len(x.shape[ax], a["start"], a["stop"], a["step"], "core.slice")
    return [TensorType(tuple(shape), x.dtype)]


def _ref_slice(xs: list[np.ndarray], a: A) -> list[np.ndarray]:
    x = xs[0]
    idx = [slice(None)] * x.ndim
    idx[a["axis"] % x.ndim] = slice(a["start"], a["stop"], a["step"])
    return [np.ascontiguousarray(x[tuple(idx)])]


register_op(OpDef("core.slice", (1, 1), _infer_slice, _ref_slice,
                  attrs={"axis": REQUIRED, "start": 0, "stop": None, "step": 1},
                  doc="x[start:stop:step] along axis (stop none = to the end)"))


def _infer_concat(ts: list[TensorType], a: A) -> list[TensorType]:
    x = ts[0]
    ax = _axis(a["axis"], x.rank, "core.concat")
    total: DimLike = 0
    for t in ts:
        ok = t.rank == x.rank and t.dtype == x.dtype and all(
            same_dim(t.shape[i], x.shape[i]) for i in range(x.rank) if i != ax)
        if not ok:
            raise IRError(f"core.concat: {t} does not match {x} outside axis {ax}")
        total = total + t.shape[ax] if total != 0 else t.shape[ax]
    shape = list(x.shape)
    shape[ax] = total
    return [TensorType(tuple(shape), x.dtype)]


register_op(OpDef("core.concat", (1, 64), _infer_concat,
                  lambda xs, a: [np.concatenate(xs, axis=a["axis"])], attrs={"axis": REQUIRED},
                  doc="operands joined along axis"))


def _infer_broadcast(ts: list[TensorType], a: A) -> list[TensorType]:
    x, shape = ts[0], list(a["shape"])
    if len(shape) != x.rank:
        raise IRError(f"core.broadcast_to: shape {shape} must have the rank of {x}")
    out = []
    for d, s in zip(x.shape, shape, strict=True):
        if s == -1:
            out.append(d)
        elif d == 1 and isinstance(s, int) and s >= 1:
            out.append(s)
        elif isinstance(d, int) and d == s:
            out.append(d)
        else:
            raise IRError(f"core.broadcast_to: cannot broadcast {x} to {shape}")
    return [TensorType(tuple(out), x.dtype)]


def _ref_broadcast(xs: list[np.ndarray], a: A) -> list[np.ndarray]:
    x = xs[0]
    shape = [d if s == -1 else s for d, s in zip(x.shape, a["shape"], strict=True)]
    return [np.ascontiguousarray(np.broadcast_to(x, shape))]


register_op(OpDef("core.broadcast_to", (1, 1), _infer_broadcast, _ref_broadcast,
                  attrs={"shape": REQUIRED},
                  doc="size-1 dims repeated to `shape` (-1 keeps a dim), materialised"))

# --------------------------------------------------------------------------- attention


def _infer_attention(ts: list[TensorType], a: A) -> list[TensorType]:
    q, k, v = ts
    bad = q.rank != 4 or k.rank != 4 or v.rank != 4 or q.dtype not in FLOAT_DTYPES or \
        len({q.dtype, k.dtype, v.dtype}) != 1
    if bad or not (same_dim(q.shape[0], k.shape[0]) and same_dim(k.shape[0], v.shape[0])
                   and same_dim(k.shape[1], v.shape[1]) and same_dim(k.shape[2], v.shape[2])
                   and same_dim(q.shape[3], k.shape[3]) and same_dim(q.shape[2], k.shape[2])):
        raise IRError(f"core.attention: want q [B, Hq, T, D], k [B, Hkv, T, D], "
                      f"v [B, Hkv, T, Dv], got {q}, {k}, {v}")
    hq, hkv = q.shape[1], k.shape[1]
    if not isinstance(hq, int) or not isinstance(hkv, int) or hq % hkv:
        raise IRError(f"core.attention: {hq} query heads are not a multiple of {hkv} kv heads")
    return [TensorType((q.shape[0], q.shape[2], hq, v.shape[3]), q.dtype)]


def attention_ref(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
    """Causal attention, float64 math; q [B, Hq, T, D], k/v [B, Hkv, T, .] -> [B, T, Hq, Dv]."""
    rep = q.shape[1] // k.shape[1]
    kk = np.repeat(k.astype(np.float64), rep, axis=1)
    vv = np.repeat(v.astype(np.float64), rep, axis=1)
    s = q.astype(np.float64) @ kk.transpose(0, 1, 3, 2) * scale
    t = q.shape[2]
    s = np.where(np.tril(np.ones((t, t), dtype=bool)), s, -np.inf)
    if t:
        s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    p = p / p.sum(-1, keepdims=True) if t else p
    return (p @ vv).transpose(0, 2, 1, 3).astype(q.dtype)


register_op(OpDef("core.attention", (3, 3), _infer_attention,
                  lambda xs, a: [attention_ref(*xs, a["scale"])], attrs={"scale": REQUIRED},
                  doc="causal softmax(q k^T * scale) v with grouped-query heads; "
                      "[B, Hq, T, D] x [B, Hkv, T, D] x [B, Hkv, T, Dv] -> [B, T, Hq, Dv]"))

# --------------------------------------------------------------------------- rotary embedding


def _infer_rope(ts: list[TensorType], a: A) -> list[TensorType]:
    x, c, s = ts
    d = x.shape[-1] if x.rank else None
    ok = x.rank >= 1 and x.dtype in FLOAT_DTYPES and isinstance(d, int) and d % 2 == 0
    for t in (c, s):
        ok = ok and t.rank == x.rank and t.dtype == x.dtype and (
            same_dim(t.shape[-1], d) or same_dim(t.shape[-1], (d or 0) // 2)) and all(
            same_dim(td, 1) or same_dim(td, xd) for td, xd in zip(t.shape[:-1], x.shape[:-1],
                                                                   strict=True))
    if not ok or not same_dim(c.shape[-1], s.shape[-1]):
        raise IRError(f"core.rope: want x [..., D] (D even) and cos, sin of x's rank whose "
                      f"dims are x's or 1 and whose last dim is D or D/2; got {x}, {c}, {s}")
    return [x]


def rope_ref(x: np.ndarray, c: np.ndarray, s: np.ndarray) -> np.ndarray:
    """x * cos + rotate_half(x) * sin, rotate_half(x) = concat(-x[..., h:], x[..., :h]); cos
    and sin of last dim D/2 stand for the table repeated twice."""
    h = x.shape[-1] // 2
    if c.shape[-1] == h:
        c, s = np.concatenate([c, c], -1), np.concatenate([s, s], -1)
    xf = _f(x)
    rot = np.concatenate([-xf[..., h:], xf[..., :h]], -1)
    return (xf * _f(c) + rot * _f(s)).astype(x.dtype)


register_op(OpDef("core.rope", (3, 3), _infer_rope, lambda xs, a: [rope_ref(*xs)],
                  doc="rotary embedding, rotate-half form: x * cos + concat(-x2, x1) * sin with "
                      "x1, x2 the halves of the last axis; cos/sin broadcast over x's leading "
                      "dims, last dim D (or D/2: the table repeated)"))

# --------------------------------------------------------------------------- per-head linear


def _infer_linear_heads(ts: list[TensorType], a: A) -> list[TensorType]:
    x, w = ts
    if x.rank < 2 or w.rank != 3 or x.dtype not in FLOAT_DTYPES or w.dtype not in FLOAT_DTYPES \
            or not same_dim(x.shape[-2], w.shape[0]) or not same_dim(x.shape[-1], w.shape[2]):
        raise IRError(f"core.linear_heads: want x [..., H, K] and w [H, N, K], got {x}, {w}")
    return [TensorType(x.shape[:-1] + (w.shape[1],), x.dtype)]


def linear_heads_ref(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return np.einsum("...hk,hnk->...hn", _f(x).astype(np.float64),
                     w.astype(np.float64)).astype(x.dtype)


register_op(OpDef("core.linear_heads", (2, 2), _infer_linear_heads,
                  lambda xs, a: [linear_heads_ref(*xs)],
                  doc="a linear map per head: x [..., H, K], w [H, N, K] -> [..., H, N] "
                      "(multi-head latent attention's absorbed projections)"))
