"""Weight-only quantised expert GEMMs: `moe.grouped_matmul_q` and the numpy (de)quantisers.

Formats (the pass quantize-experts writes them, the kernels read them, the reference here
dequantises and runs moe.grouped_matmul's reference):

- int8 (`bits=8`): symmetric, one scale per group of `group_size` along K (group_size >= K:
  one scale per output channel, what quantize-experts writes by default):
  `q = round(w / s)` in [-127, 127], `s = r * max|w[n, group]| / 127` with the clip ratio r in
  CLIP_RATIOS of least squared error; q `i8[E, N, K]`, scale `f32[E, N, ceil(K/group_size)]`;
  `w ~ q * s`.
- int4 (`bits=4`): asymmetric, group-wise along K (`group_size`, default 128; the last group
  may be shorter): per group `s = (max - min) / 15`, `z = round(-min / s)` in [0, 15],
  `q = clamp(round(w / s) + z, 0, 15)`; `w ~ (q - z) * s`. Two values per byte, even k in the
  low nibble: q `u8[E, N, K/2]` (K even), scale and zero `f32[E, N, ceil(K/group_size)]`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from moec.errors import IRError
from moec.ir.moe_ops import ACT_ATTRS, GMM_ACTIVATIONS, _ref_gmm
from moec.ir.registry import REQUIRED, OpDef, register_op
from moec.ir.types import TensorType, same_dim

A = Mapping[str, Any]
BITS = (8, 4)
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def num_groups(k: int, bits: int, group_size: int) -> int:
    return -(-k // group_size)


def _groups(w: np.ndarray, group_size: int, fill_first: bool) -> tuple[np.ndarray, int]:
    """w [..., N, K] -> [..., N, G, group_size], the last group padded with zeros, or with the
    group's first value (`fill_first`: padding must not widen an asymmetric range)."""
    *lead, n, k = w.shape
    g = -(-k // group_size)
    pad = np.zeros((*lead, n, g * group_size), np.float32)
    pad[..., :k] = w
    groups = pad.reshape(*lead, n, g, group_size)
    if fill_first:
        tail = k - (g - 1) * group_size
        groups[..., -1, tail:] = groups[..., -1, :1]
    return groups, g


def quantize(w: np.ndarray, bits: int, group_size: int = 128
             ) -> tuple[np.ndarray, ...]:
    """`w [..., N, K]` -> (q, scale) for int8 or (q_packed, scale, zero) for int4."""
    w = np.asarray(w, np.float32)
    if bits == 8:
        k = w.shape[-1]
        groups, _ = _groups(w, group_size, fill_first=False)
        amax = np.abs(groups).max(axis=-1, keepdims=True)
        best_s, best_err = None, None
        for r in CLIP_RATIOS:  # the clip range with the least squared error, per group
            s = np.where(amax == 0, 1.0, amax * r / 127.0).astype(np.float32)
            err = ((np.clip(np.rint(groups / s), -127, 127) * s - groups) ** 2).sum(
                -1, keepdims=True)
            if best_s is None:
                best_s, best_err = s, err
            else:
                better = err < best_err
                best_s, best_err = np.where(better, s, best_s), np.minimum(err, best_err)
        q = np.clip(np.rint(groups / best_s), -127, 127).astype(np.int8)
        q = q.reshape(*w.shape[:-1], -1)[..., :k]
        return np.ascontiguousarray(q), best_s[..., 0].astype(np.float32)
    if bits != 4:
        raise IRError(f"quantize: bits must be 8 or 4, got {bits}")
    *lead, n, k = w.shape
    if k % 2:
        raise IRError(f"quantize: int4 needs an even K, got {k}")
    groups, g = _groups(w, group_size, fill_first=True)
    lo = np.minimum(groups.min(axis=-1), 0.0)
    hi = np.maximum(groups.max(axis=-1), 0.0)
    s = ((hi - lo) / 15.0).astype(np.float32)
    s = np.where(s == 0, 1.0, s).astype(np.float32)
    z = np.clip(np.rint(-lo / s), 0, 15).astype(np.float32)
    q = np.clip(np.rint(groups / s[..., None]) + z[..., None], 0, 15)
    q = q.reshape(*lead, n, g * group_size)[..., :k].astype(np.uint8)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    return packed, s, z


def dequantize(parts: list[np.ndarray], bits: int, group_size: int, k: int) -> np.ndarray:
    """The f32 `[..., N, K]` weight that `quantize` parts stand for."""
    gi = np.arange(k) // group_size
    if bits == 8:
        q, s = parts
        return q.astype(np.float32) * s[..., gi]
    packed, s, z = parts
    q = np.empty((*packed.shape[:-1], 2 * packed.shape[-1]), np.float32)
    q[..., 0::2] = packed & 15
    q[..., 1::2] = packed >> 4
    return (q[..., :k] - z[..., gi]) * s[..., gi]


def gmmq_operands(xs: list, a: A) -> tuple[Any, list[list], list, Any, Any]:
    """(x, [[q, scale(, zero)] per weight], biases, sorted_ids, tile_expert)."""
    per = 2 if a["bits"] == 8 else 3
    nw = 2 if a["activation"].endswith("_mul") else 1
    ws = [list(xs[1 + i * per:1 + (i + 1) * per]) for i in range(nw)]
    nb = nw if a["bias"] else 0
    start = 1 + nw * per
    return xs[0], ws, list(xs[start:start + nb]), xs[-2], xs[-1]


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise IRError("moe.grouped_matmul_q: " + msg)


def _infer(ts: list[TensorType], a: A) -> list[TensorType]:
    bits, act = a["bits"], a["activation"]
    _check(bits in BITS, f"bits must be 8 or 4, got {bits}")
    _check(act in GMM_ACTIVATIONS, f"activation {act!r}")
    _check(a["group_size"] >= 2 and a["group_size"] % 2 == 0, "group_size must be even")
    per = 2 if bits == 8 else 3
    nw = 2 if act.endswith("_mul") else 1
    want = 3 + nw * per + (nw if a["bias"] else 0)
    _check(len(ts) == want, f"bits={bits}, activation={act}, bias={a['bias']} takes {want} "
                            f"operands, got {len(ts)}")
    x, ws, bs, sid, te = gmmq_operands(ts, a)
    _check(x.rank == 2 and isinstance(x.shape[1], int), f"x must be [., K] with static K: {x}")
    k = x.shape[1]
    q0 = ws[0][0]
    _check(q0.rank == 3, f"quantised weight must be [E, N, K'], got {q0}")
    e, n = q0.shape[0], q0.shape[1]
    kq, dt = (k, "i8") if bits == 8 else (k // 2, "u8")
    if bits == 4:
        _check(k % 2 == 0, f"int4 needs an even K, got {k}")
    g = num_groups(k, bits, a["group_size"])
    for parts in ws:
        q, *sz = parts
        _check(q.dtype == dt and q.rank == 3 and same_dim(q.shape[2], kq)
               and same_dim(q.shape[0], e) and same_dim(q.shape[1], n),
               f"weight {q} does not match x {x} (want {dt}[E, N, {kq}])")
        for t in sz:
            _check(t.dtype == "f32" and t.rank == 3 and same_dim(t.shape[0], e)
                   and same_dim(t.shape[1], n) and same_dim(t.shape[2], g),
                   f"scale/zero {t} does not match (want f32[{e}, {n}, {g}])")
    for b in bs:
        _check(b.rank == 2 and same_dim(b.shape[0], e) and same_dim(b.shape[1], n),
               f"bias {b} does not match (want [{e}, {n}])")
    _check(sid.rank == 1 and te.rank == 1 and sid.dtype == "i32" and te.dtype == "i32",
           "sorted_ids and tile_expert must be i32 vectors")
    if not a["gather"]:
        _check(same_dim(x.shape[0], sid.shape[0]), f"without gather x must have S rows: {x}")
    return [TensorType((sid.shape[0], n), x.dtype)]


def _ref(xs: list[np.ndarray], a: A) -> list[np.ndarray]:
    x, ws, bs, sid, te = gmmq_operands(xs, a)
    k = x.shape[1]
    dense = [dequantize(parts, a["bits"], a["group_size"], k) for parts in ws]
    attrs = {key: a[key] for key in ("block_m", "top_k", "gather", "activation", "bias",
                                     *ACT_ATTRS)}
    return _ref_gmm([x, *dense, *bs, sid, te], attrs)


register_op(OpDef("moe.grouped_matmul_q", (5, 11), _infer, _ref,
                  attrs={"block_m": REQUIRED, "top_k": 1, "gather": False,
                         "activation": "none", "bias": False, "bits": REQUIRED,
                         "group_size": 128, **ACT_ATTRS},
                  doc="moe.grouped_matmul with weight-only int8/int4 expert weights"))


# --------------------------------------------------------------------------- dense int8 linear


def _infer_linear_q(ts: list[TensorType], a: A) -> list[TensorType]:
    x, q, s = ts[0], ts[1], ts[2]
    if x.dtype != "f32" or x.rank < 1 or not isinstance(x.shape[-1], int):
        raise IRError(f"core.linear_q: x must be f32[..., K] with a static K, got {x}")
    k = x.shape[-1]
    if q.dtype != "i8" or q.rank != 2 or not same_dim(q.shape[1], k):
        raise IRError(f"core.linear_q: weight {q} does not match x {x} (want i8[N, {k}])")
    n = q.shape[0]
    if s.dtype != "f32" or s.rank != 2 or not same_dim(s.shape[0], n) or s.shape[1] != 1:
        raise IRError(f"core.linear_q: scale {s} does not match weight {q} (want f32[{n}, 1])")
    if len(ts) == 4 and (ts[3].rank != 1 or not same_dim(ts[3].shape[0], n)
                         or ts[3].dtype != "f32"):
        raise IRError(f"core.linear_q: bias {ts[3]} does not match weight {q} (want f32[{n}])")
    return [TensorType(x.shape[:-1] + (n,), x.dtype)]


def _ref_linear_q(xs: list[np.ndarray], a: A) -> list[np.ndarray]:
    x, q, s = xs[0], xs[1], xs[2]
    w = q.astype(np.float64) * s.astype(np.float64)
    y = x.astype(np.float64) @ w.T
    if len(xs) == 4:
        y = y + xs[3].astype(np.float64)
    return [y.astype(x.dtype)]


register_op(OpDef("core.linear_q", (3, 4), _infer_linear_q, _ref_linear_q,
                  doc="x @ (q * scale).T (+ b): core.linear with weight-only int8 weights "
                      "(q i8[N, K], one scale per output channel f32[N, 1]; quantize-linears)"))
