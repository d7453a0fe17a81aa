"""`core` ops of generation with a paged KV cache: writing a step's keys/values into the cache
and attention over it. Semantics are in docs/ops.md; the numpy functions here are the reference.

The value cache is `[L, NB, H, BS, D]`: L layers, a pool of NB blocks of BS token slots, H kv
heads of D dims. The key cache is `[L, NB, H, D, BS]`: transposed within each block, so that the
scores of a query against a block's BS keys are BS-wide vector FMAs (as the values' weighted sum
is D-wide ones). A sequence owns the blocks its block table row lists, in order: its token at
position p lives in block `block_table[b, p // BS]`, slot `p % BS`.

One step (a call of the generation function) runs T new tokens of B sequences, flattened:
sequence b's tokens are rows `q_start[b] .. q_start[b] + q_len[b] - 1` of the step, and after
the step its cache holds `kv_len[b]` tokens (the new ones are the last `q_len[b]`).
A prefill is a step with q_len = prompt length, a decode step has q_len = 1 for every sequence,
and chunked prefill mixes them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from moec.errors import IRError
from moec.ir.registry import REQUIRED, OpDef, register_op
from moec.ir.types import FLOAT_DTYPES, TensorType, same_dim

A = Mapping[str, Any]


def _want(cond: bool, msg: str) -> None:
    if not cond:
        raise IRError(msg)


# --------------------------------------------------------------------------- cache_write


def _infer_cache_write(ts: list[TensorType], a: A) -> list[TensorType]:
    cache, x, slots = ts
    _want(cache.rank == 5 and cache.dtype in FLOAT_DTYPES,
          f"core.cache_write: want a cache [L, NB, H, BS, D] (or [L, NB, H, D, BS] with "
          f"transposed=true), got {cache}")
    d = cache.shape[3] if a["transposed"] else cache.shape[4]
    _want(x.rank == 4 and same_dim(x.shape[0], 1) and same_dim(x.shape[1], cache.shape[2])
          and same_dim(x.shape[3], d),
          f"core.cache_write: want x [1, H, T, D] matching the cache {cache}, got {x}")
    _want(slots.rank == 1 and slots.dtype in ("i32", "i64") and same_dim(slots.shape[0],
                                                                          x.shape[2]),
          f"core.cache_write: want integer slots [T] for x {x}, got {slots}")
    layer = a["layer"]
    _want(isinstance(cache.shape[0], int) and 0 <= layer < cache.shape[0],
          f"core.cache_write: layer {layer} is not a layer of the cache {cache}")
    return [cache]


def cache_write_ref(cache: np.ndarray, x: np.ndarray, slots: np.ndarray, layer: int,
                    transposed: bool = False) -> np.ndarray:
    """A copy of `cache` with x[0, :, t] written at slot `slots[t]` of layer `layer`."""
    out = cache.copy()
    bs = cache.shape[4] if transposed else cache.shape[3]
    s = slots.astype(np.int64)
    if s.size and (s.min() < 0 or s.max() >= cache.shape[1] * bs):
        raise IRError(f"core.cache_write: slot out of range [0, {cache.shape[1] * bs})")
    rows = x[0].transpose(1, 0, 2).astype(cache.dtype)  # [T, H, D]
    if transposed:
        out[layer, s // bs, :, :, s % bs] = rows
    else:
        out[layer, s // bs, :, s % bs, :] = rows
    return out


register_op(OpDef(
    "core.cache_write", (3, 3), _infer_cache_write,
    lambda xs, a: [cache_write_ref(*xs, a["layer"], a["transposed"])],
    attrs={"layer": REQUIRED, "transposed": False},
    doc="the cache [L, NB, H, BS, D] ([L, NB, H, D, BS] if transposed) with x [1, H, T, D] "
        "written at slots [T] (block * BS + offset) of layer `layer`; kernels write in place"))

# --------------------------------------------------------------------------- paged_attention


def _infer_paged(ts: list[TensorType], a: A) -> list[TensorType]:
    q, kc, vc, q_start, q_len, kv_len, table = ts[:7]
    _want(q.rank == 4 and same_dim(q.shape[0], 1) and q.dtype in FLOAT_DTYPES,
          f"core.paged_attention: want q [1, Hq, T, D], got {q}")
    _want(kc.rank == 5 and vc.rank == 5 and kc.dtype == vc.dtype
          and all(same_dim(kc.shape[i], vc.shape[i]) for i in range(3))
          and same_dim(kc.shape[4], vc.shape[3]) and same_dim(kc.shape[3], q.shape[3]),
          f"core.paged_attention: want caches [L, NB, Hkv, D, BS] and [L, NB, Hkv, BS, Dv] "
          f"for q {q}, got {kc} and {vc}")
    for name, t in (("q_start", q_start), ("q_len", q_len), ("kv_len", kv_len)):
        _want(t.rank == 1 and t.dtype == "i32" and same_dim(t.shape[0], q_start.shape[0]),
              f"core.paged_attention: want {name} i32[B], got {t}")
    _want(table.rank == 2 and table.dtype == "i32" and same_dim(table.shape[0],
                                                                 q_start.shape[0]),
          f"core.paged_attention: want block_table i32[B, MB], got {table}")
    hq, hkv = q.shape[1], kc.shape[2]
    _want(isinstance(hq, int) and isinstance(hkv, int) and hkv > 0 and hq % hkv == 0,
          f"core.paged_attention: {hq} query heads are not a multiple of {hkv} kv heads")
    _want(0 <= a["layer"] < kc.shape[0], f"core.paged_attention: layer {a['layer']} is not a "
                                         f"layer of the cache {kc}")
    _want(a["window"] >= 0 and a["chunk"] >= 0,
          f"core.paged_attention: window and chunk must be >= 0, got {a['window']}, "
          f"{a['chunk']}")
    if a["sinks"]:
        _want(len(ts) == 8 and ts[7].rank == 1 and same_dim(ts[7].shape[0], hq)
              and ts[7].dtype in FLOAT_DTYPES,
              f"core.paged_attention: sinks=true wants a last operand [Hq], got {ts[7:]}")
    else:
        _want(len(ts) == 7, "core.paged_attention: 8 operands need sinks=true")
    return [TensorType((1, q.shape[2], hq, vc.shape[4]), q.dtype)]


def visible_range(pos: int, window: int, chunk: int) -> tuple[int, int]:
    """The positions [lo, pos] a query at position `pos` attends to (causal, then a sliding
    window of `window` positions and/or the `chunk`-aligned chunk it is in)."""
    lo = 0
    if window:
        lo = max(lo, pos - window + 1)
    if chunk:
        lo = max(lo, pos // chunk * chunk)
    return lo, pos


def paged_attention_ref(q: np.ndarray, kc: np.ndarray, vc: np.ndarray, q_start: np.ndarray,
                        q_len: np.ndarray, kv_len: np.ndarray, table: np.ndarray,
                        sinks: np.ndarray | None, a: A) -> np.ndarray:
    """float64 math; rows of the step that belong to no sequence stay 0."""
    layer, scale = a["layer"], float(a["scale"])
    _, hq, t, _ = q.shape
    hkv, bs, dv = vc.shape[2], vc.shape[3], vc.shape[4]
    rep = hq // hkv
    out = np.zeros((1, t, hq, dv), np.float64)
    for b in range(q_start.shape[0]):
        n, kv, s0 = int(q_len[b]), int(kv_len[b]), int(q_start[b])
        if n == 0:
            continue
        if not (0 <= s0 and s0 + n <= t and n <= kv <= table.shape[1] * bs):
            raise IRError(f"core.paged_attention: sequence {b} has q_start {s0}, q_len {n}, "
                          f"kv_len {kv}: outside the step ({t} tokens) or its block table")
        pos = np.arange(kv)
        blocks = table[b, pos // bs].astype(np.int64)
        keys = kc[layer, blocks, :, :, pos % bs].astype(np.float64)  # [kv, Hkv, D]
        vals = vc[layer, blocks, :, pos % bs, :].astype(np.float64)
        for i in range(n):
            p = kv - n + i
            lo, hi = visible_range(p, a["window"], a["chunk"])
            for h in range(hq):
                qv = q[0, h, s0 + i].astype(np.float64)
                s = keys[lo:hi + 1, h // rep] @ qv * scale
                m = s.max()
                if sinks is not None:
                    m = max(m, float(sinks[h]))
                e = np.exp(s - m)
                den = e.sum() + (np.exp(float(sinks[h]) - m) if sinks is not None else 0.0)
                out[0, s0 + i, h] = e @ vals[lo:hi + 1, h // rep] / den
    return out.astype(q.dtype)


register_op(OpDef(
    "core.paged_attention", (7, 8), _infer_paged,
    lambda xs, a: [paged_attention_ref(*xs[:7], xs[7] if len(xs) == 8 else None, a)],
    attrs={"layer": REQUIRED, "scale": REQUIRED, "window": 0, "chunk": 0, "sinks": False},
    doc="causal attention of a step's queries q [1, Hq, T, D] over the paged caches k "
        "[L, NB, Hkv, D, BS] and v [L, NB, Hkv, BS, Dv] (after the step's cache_write) of each "
        "sequence: q_start/q_len/kv_len i32[B], block_table "
        "i32[B, MB]; window (sliding, 0 = none), chunk (chunked attention, 0 = none), sinks "
        "(a per-head logit in the softmax denominator) -> [1, T, Hq, Dv]"))
