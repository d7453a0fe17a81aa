"""The `moe` dialect: routing, dispatch in expert-sorted tiles, grouped GEMMs and the combine.

The layout conventions (slots, tiles, padding sentinel, unspecified padding rows) are in
docs/ops.md; every kernel and pass follows them, and the numpy functions here are the reference.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from moec.errors import IRError
from moec.ir.core_ops import _f, _gelu, _sigmoid, topk_ref
from moec.ir.registry import REQUIRED, OpDef, register_op
from moec.ir.types import DimLike, TensorType, same_dim, same_shape, same_type

A = Mapping[str, Any]
ACTIVATIONS = ("silu", "gelu", "relu", "gelu_tanh", "relu2", "clamped_swiglu", "none")
GATED_ONLY = ("clamped_swiglu",)  # activations that combine gate and up themselves
UNGATED_ONLY = ("relu2", "none")  # squared ReLU: down(relu(up(x))^2); none: down(up(x))
ORDERS = ("score_topk", "topk_score", "sparsemixer")
SCORINGS = ("softmax", "sigmoid", "sqrt_softplus")
# clamped_swiglu's constants, GPT-OSS's by default; alpha=1, offset=0 is the plain clamped
# SwiGLU silu(min(g, limit)) * clamp(u, -limit, limit) (DeepSeek-V4, HY-V4, MiniMax-M3)
ACT_ATTRS = {"alpha": 1.702, "limit": 7.0, "offset": 1.0}


def clamped_swiglu(g: np.ndarray, u: np.ndarray, alpha: float, limit: float,
                   offset: float = 1.0) -> np.ndarray:
    """The clamped gated activation: (clamp(u, -limit, limit) + offset) * g' * sigmoid(alpha g'),
    g' = min(g, limit); GPT-OSS's with alpha=1.702, offset=1."""
    g = np.minimum(g, limit)
    return (np.clip(u, -limit, limit) + np.float32(offset)) * (g * _sigmoid(alpha * g))


def glu(a: A, g: np.ndarray, u: np.ndarray) -> np.ndarray:
    """The gated hidden state of an expert: act(g) * u, or clamped_swiglu(g, u)."""
    if a["activation"] == "clamped_swiglu":
        return clamped_swiglu(g, u, a["alpha"], a["limit"], a["offset"])
    return activation(a["activation"], g) * u


def activation(name: str, x: np.ndarray) -> np.ndarray:
    if name == "silu":
        return x * _sigmoid(x)
    if name == "gelu":
        return _gelu(x, "none")
    if name == "gelu_tanh":
        return _gelu(x, "tanh")
    if name == "relu":
        return np.maximum(x, 0)
    if name == "relu2":
        return np.square(np.maximum(x, 0))
    if name == "none":
        return x
    raise IRError(f"unknown activation {name!r}; expected one of {', '.join(ACTIVATIONS)}")


def sqrt_softplus(x: np.ndarray) -> np.ndarray:
    """sqrt(softplus(x)) = sqrt(log(1 + e^x)): DeepSeek-V4's router scores (positive)."""
    return np.sqrt(np.logaddexp(0.0, x))


SCORE_FNS = {"softmax": lambda v: _softmax(v), "sigmoid": lambda v: _sigmoid(v),
             "sqrt_softplus": sqrt_softplus}


def tile_counts(tokens: DimLike, k: int, num_experts: int, block_m: int) -> tuple[DimLike, DimLike]:
    """Static upper bound of the aligned layout: (tiles TL, rows S = TL * block_m)."""
    tl = (tokens * k) // block_m + num_experts
    return tl, tl * block_m


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise IRError(msg)


# --------------------------------------------------------------------------- router


def router_operands(xs: list, a: A) -> tuple:
    """(x, w, logit_bias | None, selection_bias | None) from the operand list."""
    rest = list(xs[2:])
    lb = rest.pop(0) if a["logit_bias"] else None
    sb = rest.pop(0) if a["select_bias"] else None
    return xs[0], xs[1], lb, sb


def _softmax(v: np.ndarray) -> np.ndarray:
    e = np.exp(v - (v.max(-1, keepdims=True) if v.size else 0))
    return e / e.sum(-1, keepdims=True)


def select_ref(scores: np.ndarray, bias: np.ndarray | None, a: A
               ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k selection on `scores + bias` (grouped when n_groups > 1); weights are the unbiased
    scores of the chosen experts (docs/ops.md, moe.router step 2)."""
    sel = scores + _f(bias) if bias is not None else scores.copy()
    ng, kg = a["n_groups"], a["topk_groups"]
    if ng > 1:
        t, n_e = sel.shape
        grouped = sel.reshape(t, ng, n_e // ng)
        if a["group_score"] == "top2_sum":
            gs = np.sort(grouped, axis=-1)[..., -2:].sum(-1)
        else:
            gs = grouped.max(-1)
        _, keep = topk_ref(gs, kg)
        mask = np.zeros((t, ng), bool)
        np.put_along_axis(mask, keep.astype(np.int64), True, axis=-1)
        sel = np.where(np.repeat(mask, n_e // ng, axis=-1), sel, -np.inf)
    _, ids = topk_ref(sel, a["k"])
    return np.take_along_axis(scores, ids.astype(np.int64), axis=-1), ids


def sparsemixer_ref(logits: np.ndarray, k: int, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """PhiMoE's sparsemixer (inference form): k rounds; each picks the best remaining expert and
    weighs it by a softmax over the remaining experts whose logit is within a relative distance
    2*eps of that best one: (best - l_j) / max(|l_j|, best) <= 2*eps."""
    t, n_e = logits.shape
    weights = np.zeros((t, k), np.float32)
    ids = np.zeros((t, k), np.int32)
    remaining = np.ones((t, n_e), bool)
    rows = np.arange(t)
    with np.errstate(divide="ignore", invalid="ignore"):
        for r in range(k):
            masked = np.where(remaining, logits, -np.inf)
            best = masked.argmax(-1) if t else np.zeros(0, np.int64)
            thr = masked[rows, best][:, None]
            far = (thr - logits) / np.maximum(np.abs(logits), thr) > 2 * eps
            keep = np.where(remaining & ~far, masked, -np.inf)
            weights[:, r] = _softmax(keep)[rows, best] if t else 0
            ids[:, r] = best
            remaining[rows, best] = False
    return weights, ids


def capacity_mask(ids: np.ndarray, capacity: int) -> np.ndarray:
    """bool [T, k]: whether slot (t, j) is within its expert's capacity, counting slots in slot
    order t*k + j (Switch Transformers' token dropping). For ids [..., S, k] (a router on
    sequences) each sequence counts its own slots."""
    if ids.ndim > 2:
        if ids.size == 0:
            return np.ones(ids.shape, bool)
        seqs = ids.reshape(-1, *ids.shape[-2:])
        return np.stack([capacity_mask(q, capacity) for q in seqs]).reshape(ids.shape)
    flat = ids.reshape(-1)
    keep = np.ones(flat.shape, bool)
    for e in np.unique(flat):
        slots = np.nonzero(flat == e)[0]
        keep[slots[capacity:]] = False
    return keep.reshape(ids.shape)


def router_ref(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None, a: A,
               logit_bias: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    logits = _f(x) @ _f(w).T
    if logit_bias is not None:
        logits = logits + _f(logit_bias)
    k, order = a["k"], a["order"]
    score = SCORE_FNS[a["scoring"]]
    if order == "topk_score":
        vals, ids = topk_ref(logits, k)
        weights = score(vals)
    elif order == "sparsemixer":
        weights, ids = sparsemixer_ref(logits, k, a.get("jitter_eps", 0.01))
    else:
        weights, ids = select_ref(score(logits), bias, a)
        if a["norm_topk"]:
            denom = weights.sum(-1, keepdims=True)
            weights = weights / (denom + (0.0 if a["scoring"] == "softmax" else 1e-20))
    weights = weights * a["scale"]
    if a.get("capacity", 0) > 0:
        weights = np.where(capacity_mask(ids, a["capacity"]), weights, 0)
    return weights.astype(np.float32), ids


def _check_selection(op: str, e: int, a: A) -> None:
    _check(1 <= a["k"] <= e, f"{op}: k={a['k']} not in 1..{e}")
    _check(a["group_score"] in ("max", "top2_sum"), f"{op}: group_score {a['group_score']}")
    ng, kg = a["n_groups"], a["topk_groups"]
    _check(ng >= 1 and e % ng == 0 and 1 <= kg <= ng,
           f"{op}: {e} experts cannot form n_groups={ng} with topk_groups={kg}")
    _check(ng == 1 or a["k"] <= kg * (e // ng), f"{op}: k exceeds the experts kept by groups")
    _check(a["group_score"] != "top2_sum" or ng == 1 or e // ng >= 2,
           f"{op}: group_score=top2_sum needs at least 2 experts per group")


def _infer_router(ts: list[TensorType], a: A) -> list[TensorType]:
    x, w = ts[0], ts[1]
    _check(x.rank >= 2 and w.rank == 2 and same_dim(x.shape[-1], w.shape[1]),
           f"moe.router: x {x} and router weight {w} do not match (want x[T,H] or "
           f"x[B,S,H], w[E,H])")
    _check(x.rank == 2 or a["capacity"] > 0,
           f"moe.router: x {x} has rank {x.rank}; only a router with capacity (counted per "
           f"sequence) takes x[B, S, H], flatten it to [T, H] otherwise")
    e = w.shape[0]
    _check(isinstance(e, int), "moe.router: the expert count must be static")
    _check(a["scoring"] in SCORINGS, f"moe.router: scoring {a['scoring']!r} not in "
                                     f"{', '.join(SCORINGS)}")
    _check(a["order"] in ORDERS, f"moe.router: order {a['order']!r} not in {', '.join(ORDERS)}")
    _check_selection("moe.router", e, a)
    if a["order"] != "score_topk":
        _check(not a["norm_topk"] and not a["select_bias"] and a["n_groups"] == 1,
               f"moe.router: order={a['order']} takes no norm_topk, select_bias or groups")
    _check(a["capacity"] >= 0, f"moe.router: capacity {a['capacity']} < 0")
    want = 2 + int(a["logit_bias"]) + int(a["select_bias"])
    _check(len(ts) == want, f"moe.router: logit_bias={a['logit_bias']}, "
                            f"select_bias={a['select_bias']} need {want} operands, got {len(ts)}")
    for b in ts[2:]:
        _check(b.rank == 1 and same_dim(b.shape[0], e), f"moe.router: bias {b} is not [{e}]")
    lead = x.shape[:-1]
    return [TensorType((*lead, a["k"]), "f32"), TensorType((*lead, a["k"]), "i32")]


def _ref_router(xs: list[np.ndarray], a: A) -> list[np.ndarray]:
    x, w, lb, sb = router_operands(xs, a)
    if x.ndim == 2:
        return list(router_ref(x, w, sb, a, logit_bias=lb))
    # x [B, S, H]: route the tokens, then drop over capacity per sequence
    weights, ids = router_ref(x.reshape(-1, x.shape[-1]), w, sb, {**a, "capacity": 0},
                              logit_bias=lb)
    shape = (*x.shape[:-1], a["k"])
    weights, ids = weights.reshape(shape), ids.reshape(shape)
    if a["capacity"] > 0:
        weights = np.where(capacity_mask(ids, a["capacity"]), weights, np.float32(0))
    return [weights, ids]


_SELECT_ATTRS = {"k": REQUIRED, "n_groups": 1, "topk_groups": 1, "group_score": "max",
                 "select_bias": False}
register_op(OpDef(
    "moe.router", (2, 4), _infer_router, _ref_router,
    attrs={**_SELECT_ATTRS, "scoring": "softmax", "order": "score_topk", "norm_topk": False,
           "scale": 1.0, "logit_bias": False, "jitter_eps": 0.01, "capacity": 0},
    doc="router: logits, scoring, (grouped) top-k and renormalisation in one op"))


def _infer_select(ts: list[TensorType], a: A) -> list[TensorType]:
    s = ts[0]
    _check(s.rank == 2 and isinstance(s.shape[1], int) and s.dtype == "f32",
           f"moe.select: scores must be f32[T, E] with a static E, got {s}")
    e = s.shape[1]
    _check_selection("moe.select", e, a)
    _check(len(ts) == 1 + int(a["select_bias"]),
           f"moe.select: select_bias={a['select_bias']} needs {1 + int(a['select_bias'])} "
           f"operands, got {len(ts)}")
    if a["select_bias"]:
        _check(ts[1].rank == 1 and same_dim(ts[1].shape[0], e),
               f"moe.select: bias {ts[1]} is not [{e}]")
    return [TensorType((s.shape[0], a["k"]), "f32"), TensorType((s.shape[0], a["k"]), "i32")]


register_op(OpDef(
    "moe.select", (1, 2), _infer_select,
    lambda xs, a: list(select_ref(_f(xs[0]), xs[1] if len(xs) > 1 else None, a)),
    attrs=_SELECT_ATTRS,
    doc="expert selection: top-k of scores (+ selection bias, grouped), unbiased weights"))

# --------------------------------------------------------------------------- experts (unfused)


def expert_operands(ws: list, a: A) -> tuple[list, list]:
    """Split the expert operands into weights ([gate,] up, down) and biases (same order, or [])."""
    n = 3 if a["gated"] else 2
    return list(ws[:n]), list(ws[n:])


def ffn(v: np.ndarray, e: int, ws: list[np.ndarray], a: A) -> np.ndarray:
    """One expert's MLP on rows v; `ws` are the weights then (when `bias`) the biases."""
    w, b = expert_operands(ws, a)

    def proj(i: int, inp: np.ndarray) -> np.ndarray:
        y = inp @ _f(w[i][e]).T
        return y + _f(b[i][e]) if b else y

    if a["gated"]:
        h = glu(a, proj(0, v), proj(1, v))
    else:
        h = activation(a["activation"], proj(0, v))
    return proj(len(w) - 1, h)


def _expert_weights(name: str, ts: list[TensorType], a: A, hidden: DimLike) -> int:
    n = 3 if a["gated"] else 2
    want = n * (2 if a["bias"] else 1)
    _check(len(ts) == want, f"{name}: {'gated' if a['gated'] else 'non-gated'} experts"
                            f"{' with biases' if a['bias'] else ''} take {want} weights, "
                            f"got {len(ts)}")
    _check(a["activation"] in ACTIVATIONS, f"{name}: activation {a['activation']!r}")
    _check(a["gated"] or a["activation"] not in GATED_ONLY,
           f"{name}: activation {a['activation']} needs gated experts")
    _check(not a["gated"] or a["activation"] not in UNGATED_ONLY,
           f"{name}: activation {a['activation']} is for non-gated experts")
    ws, bs = ts[:n], ts[n:]
    up, down = ws[-2], ws[-1]
    _check(up.rank == 3 and down.rank == 3, f"{name}: expert weights must be [E, ., .]")
    e, inter = up.shape[0], up.shape[1]
    _check(same_dim(up.shape[2], hidden) and same_dim(down.shape[1], hidden)
           and same_dim(down.shape[2], inter) and same_dim(down.shape[0], e),
           f"{name}: up {up} / down {down} do not match hidden {hidden}")
    if a["gated"]:
        _check(same_type(ws[0], up), f"{name}: gate {ws[0]} and up {up} differ")
    for w, b in zip(ws, bs, strict=False):
        _check(b.rank == 2 and same_dim(b.shape[0], e) and same_dim(b.shape[1], w.shape[1]),
               f"{name}: bias {b} does not match weight {w} (want [E, N] for [E, N, K])")
    return e


def _infer_experts(ts: list[TensorType], a: A) -> list[TensorType]:
    x, w, ids = ts[:3]
    _check(x.rank == 2 and w.rank == 2 and ids.rank == 2 and ids.dtype == "i32"
           and same_dim(w.shape[0], x.shape[0]) and same_shape(w.shape, ids.shape),
           f"moe.experts: x {x}, weights {w}, ids {ids} do not match (x[T,H], [T,k], i32[T,k])")
    _check(a["weight_on"] in ("output", "input"), f"moe.experts: weight_on {a['weight_on']!r}")
    _check(a["identity_experts"] >= 0 and (a["identity_experts"] == 0
                                           or a["weight_on"] == "output"),
           "moe.experts: identity_experts must be >= 0, and take weight_on=output")
    _expert_weights("moe.experts", ts[3:], a, x.shape[1])
    return [x]


def _ref_experts(xs: list[np.ndarray], a: A) -> list[np.ndarray]:
    x, w, ids, ws = _f(xs[0]), _f(xs[1]), xs[2], xs[3:]
    out = np.zeros_like(x)
    n_ffn = xs[-1].shape[0]  # the down weight (or bias): FFN experts 0..E-1
    for e in np.unique(ids):
        t, j = np.nonzero(ids == e)
        wt = w[t, j][:, None]
        if e >= n_ffn and a["identity_experts"]:  # an identity (zero-computation) expert
            out[t] += wt * x[t]
        elif a["weight_on"] == "input":
            out[t] += ffn(x[t] * wt, int(e), ws, a)
        else:
            out[t] += wt * ffn(x[t], int(e), ws, a)  # t unique per e (top-k distinct)
    return [out.astype(xs[0].dtype)]


_FFN_ATTRS = {"activation": "silu", "gated": True, "bias": False, **ACT_ATTRS}
register_op(OpDef("moe.experts", (5, 9), _infer_experts, _ref_experts,
                  attrs={**_FFN_ATTRS, "weight_on": "output", "identity_experts": 0},
                  doc="routed experts, unfused: sum_j w[t,j] * FFN_ids[t,j](x[t]); with "
                      "identity_experts=Z, ids E..E+Z-1 (E the FFN experts) add w[t,j] * x[t]"))

# --------------------------------------------------------------------------- aligned layout


def align_ref(ids: np.ndarray, num_experts: int, block_m: int, identity_experts: int = 0
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sorted_ids, tile_expert, slot_row); slots routed to an identity expert (ids
    num_experts.. num_experts + identity_experts - 1) are not placed: their slot_row is -1."""
    t, k = ids.shape
    tl, s = tile_counts(t, k, num_experts, block_m)
    flat = ids.reshape(-1)
    sorted_ids = np.full(s, t * k, np.int32)
    tile_expert = np.full(tl, -1, np.int32)
    slot_row = np.zeros(t * k, np.int32)
    if identity_experts:
        slot_row[flat >= num_experts] = -1
    row = 0
    for e in range(num_experts):
        slots = np.nonzero(flat == e)[0]
        if len(slots) == 0:
            continue
        sorted_ids[row:row + len(slots)] = slots
        slot_row[slots] = np.arange(row, row + len(slots))
        ntile = -(-len(slots) // block_m)
        tile_expert[row // block_m: row // block_m + ntile] = e
        row += ntile * block_m
    return sorted_ids, tile_expert, slot_row.reshape(t, k)


def _infer_align(ts: list[TensorType], a: A) -> list[TensorType]:
    ids = ts[0]
    _check(ids.rank == 2 and ids.dtype == "i32" and isinstance(ids.shape[1], int),
           f"moe.align: ids must be i32[T, k], got {ids}")
    _check(a["block_m"] >= 1 and a["num_experts"] >= 1 and a["identity_experts"] >= 0,
           "moe.align: block_m, num_experts >= 1, identity_experts >= 0")
    tl, s = tile_counts(ids.shape[0], ids.shape[1], a["num_experts"], a["block_m"])
    return [TensorType((s,), "i32"), TensorType((tl,), "i32"), ids]


register_op(OpDef("moe.align", (1, 1), _infer_align,
                  lambda xs, a: list(align_ref(xs[0], a["num_experts"], a["block_m"],
                                               a["identity_experts"])),
                  attrs={"num_experts": REQUIRED, "block_m": REQUIRED, "identity_experts": 0},
                  doc="counting sort of (token, slot) pairs by expert into block_m-row tiles; "
                      "slots of identity experts (ids >= num_experts) are left out, slot_row "
                      "-1"))


def _rows(sorted_ids: np.ndarray, n_slots: int, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    valid = sorted_ids < n_slots
    return valid, np.where(valid, sorted_ids, 0) // top_k


def _infer_permute(ts: list[TensorType], a: A) -> list[TensorType]:
    x, sid = ts
    _check(x.rank == 2 and sid.rank == 1 and sid.dtype == "i32",
           f"moe.permute: want x[T,H], i32[S]; got {x}, {sid}")
    return [TensorType((sid.shape[0], x.shape[1]), x.dtype)]


def _ref_permute(xs: list[np.ndarray], a: A) -> list[np.ndarray]:
    x, sid = xs
    valid, rows = _rows(sid, x.shape[0] * a["top_k"], a["top_k"])
    out = np.zeros((len(sid), x.shape[1]), x.dtype)
    out[valid] = x[rows[valid]]
    return [out]


register_op(OpDef("moe.permute", (2, 2), _infer_permute, _ref_permute,
                  attrs={"top_k": REQUIRED}, doc="gather token rows into the sorted layout"))


def _tiles(tile_expert: np.ndarray, block_m: int):
    for i, e in enumerate(tile_expert):
        if e >= 0:
            yield int(e), slice(i * block_m, (i + 1) * block_m)


def _infer_expert_ffn(ts: list[TensorType], a: A) -> list[TensorType]:
    xs, te = ts[:2]
    _check(xs.rank == 2 and te.rank == 1 and te.dtype == "i32",
           f"moe.expert_ffn: want xs[S,H], i32[TL]; got {xs}, {te}")
    _expert_weights("moe.expert_ffn", ts[2:], a, xs.shape[1])
    return [xs]


def _ref_expert_ffn(xs: list[np.ndarray], a: A) -> list[np.ndarray]:
    x, te, ws = _f(xs[0]), xs[1], xs[2:]
    out = np.zeros_like(x)
    for e, rows in _tiles(te, a["block_m"]):
        out[rows] = ffn(x[rows], e, ws, a)
    return [out.astype(xs[0].dtype)]


register_op(OpDef("moe.expert_ffn", (4, 8), _infer_expert_ffn, _ref_expert_ffn,
                  attrs={"block_m": REQUIRED, **_FFN_ATTRS},
                  doc="each used tile of the sorted layout through its expert's MLP"))

GMM_ACTIVATIONS = ("none", "silu", "gelu", "relu", "gelu_tanh", "relu2", "silu_mul", "gelu_mul",
                   "gelu_tanh_mul", "relu_mul", "clamped_swiglu_mul")


def gmm_operands(xs: list, a: A) -> tuple[Any, list, list, Any, Any]:
    """(x, weights (1 or 2), biases ([] or one per weight), sorted_ids, tile_expert)."""
    nw = 2 if a["activation"].endswith("_mul") else 1
    nb = nw if a["bias"] else 0
    return xs[0], list(xs[1:1 + nw]), list(xs[1 + nw:1 + nw + nb]), xs[-2], xs[-1]


def _infer_gmm(ts: list[TensorType], a: A) -> list[TensorType]:
    act = a["activation"]
    _check(act in GMM_ACTIVATIONS, f"moe.grouped_matmul: activation {act!r}")
    nw = 2 if act.endswith("_mul") else 1
    want = 3 + nw * (2 if a["bias"] else 1)
    _check(len(ts) == want, f"moe.grouped_matmul: activation={act}, bias={a['bias']} takes "
                            f"{want} operands, got {len(ts)}")
    x, ws, bs, sid, te = gmm_operands(ts, a)
    w = ws[0]
    _check(w.rank == 3 and x.rank == 2 and same_dim(x.shape[1], w.shape[2]),
           f"moe.grouped_matmul: x {x} and w {w} do not match (want [., K], [E, N, K])")
    if nw == 2:
        _check(same_type(ws[1], w), f"moe.grouped_matmul: second weight {ws[1]} != {w}")
    for b in bs:
        _check(b.rank == 2 and same_dim(b.shape[0], w.shape[0])
               and same_dim(b.shape[1], w.shape[1]),
               f"moe.grouped_matmul: bias {b} does not match weight {w} (want [E, N])")
    _check(sid.rank == 1 and te.rank == 1 and sid.dtype == "i32" and te.dtype == "i32",
           "moe.grouped_matmul: sorted_ids and tile_expert must be i32 vectors")
    if not a["gather"]:
        _check(same_dim(x.shape[0], sid.shape[0]),
               f"moe.grouped_matmul: without gather x must have S={sid.shape[0]} rows, got {x}")
    return [TensorType((sid.shape[0], w.shape[1]), x.dtype)]


def _ref_gmm(xs: list[np.ndarray], a: A) -> list[np.ndarray]:
    x, ws, bs, sid, te = gmm_operands(xs, a)
    x = _f(x)
    act = a["activation"]
    out = np.zeros((len(sid), ws[0].shape[1]), np.float32)
    if a["gather"]:
        valid, rows = _rows(sid, x.shape[0] * a["top_k"], a["top_k"])
        src = np.zeros((len(sid), x.shape[1]), np.float32)
        src[valid] = x[rows[valid]]
    else:
        src = x
    for e, rows in _tiles(te, a["block_m"]):
        hs = [src[rows] @ _f(w[e]).T + (_f(bs[i][e]) if bs else 0) for i, w in enumerate(ws)]
        if act == "clamped_swiglu_mul":
            out[rows] = clamped_swiglu(hs[0], hs[1], a["alpha"], a["limit"], a["offset"])
        elif act.endswith("_mul"):
            out[rows] = activation(act[:-4], hs[0]) * hs[1]
        else:
            out[rows] = activation(act, hs[0])
    if a["gather"]:
        out[~valid] = 0
    return [out.astype(xs[0].dtype)]


register_op(OpDef("moe.grouped_matmul", (4, 7), _infer_gmm, _ref_gmm,
                  attrs={"block_m": REQUIRED, "top_k": 1, "gather": False,
                         "activation": "none", "bias": False, **ACT_ATTRS},
                  doc="grouped GEMM over expert tiles, optional gather, bias and fused activation"))


def _infer_unpermute(ts: list[TensorType], a: A) -> list[TensorType]:
    y, sr = ts
    _check(y.rank == 2 and sr.rank == 2 and sr.dtype == "i32",
           f"moe.unpermute: want y[S,H], slot_row i32[T,k]; got {y}, {sr}")
    return [TensorType((sr.shape[0], sr.shape[1], y.shape[1]), y.dtype)]


register_op(OpDef("moe.unpermute", (2, 2), _infer_unpermute,
                  lambda xs, a: [xs[0][xs[1]]],
                  doc="rows of the sorted layout back to [T, k, H] token order"))


def _infer_combine(ts: list[TensorType], a: A) -> list[TensorType]:
    y, w, sr = ts[:3]
    _check(y.rank == 2 and w.rank == 2 and same_shape(w.shape, sr.shape) and sr.dtype == "i32",
           f"moe.combine: want y[S,H], weights[T,k], slot_row i32[T,k]; got {y}, {w}, {sr}")
    if len(ts) == 4:
        x = ts[3]
        _check(x.rank == 2 and same_dim(x.shape[0], w.shape[0]) and same_dim(x.shape[1],
                                                                             y.shape[1])
               and x.dtype == y.dtype, f"moe.combine: identity input x {x} must be [T, H] of "
                                       f"y's dtype (y {y}, weights {w})")
    return [TensorType((w.shape[0], y.shape[1]), y.dtype)]


def _ref_combine(xs: list[np.ndarray], a: A) -> list[np.ndarray]:
    y, w, sr = _f(xs[0]), _f(xs[1]), xs[2]
    out = np.zeros((w.shape[0], y.shape[1]), np.float32)
    for j in range(w.shape[1]):
        if len(xs) == 4:  # identity slots (slot_row -1) add w * x
            ident = sr[:, j:j + 1] < 0
            out += w[:, j:j + 1] * np.where(ident, _f(xs[3]), y[np.maximum(sr[:, j], 0)])
        else:
            out += w[:, j:j + 1] * y[sr[:, j]]
    return [out.astype(xs[0].dtype)]


register_op(OpDef("moe.combine", (3, 4), _infer_combine, _ref_combine,
                  doc="weighted scatter-add of sorted rows back to token order; with a fourth "
                      "operand x [T, H], slots whose slot_row is -1 (identity experts) add "
                      "w * x[t]"))


from moec.ir import quant_ops  # noqa: E402, F401  (moe.grouped_matmul_q, built on the above)

# --------------------------------------------------------------------------- expert offload


def _infer_fetch(ts: list[TensorType], a: A) -> list[TensorType]:
    ids, x = ts
    _check(ids.rank == 2 and ids.dtype == "i32" and x.rank == 2 and
           same_dim(ids.shape[0], x.shape[0]),
           f"moe.expert_fetch: want ids i32[T, k] and x [T, H], got {ids}, {x}")
    _check(a["layer"] >= 0 and a["num_experts"] >= 1,
           "moe.expert_fetch: layer >= 0 and num_experts >= 1")
    return [ids]


register_op(OpDef(
    "moe.expert_fetch", (2, 2), _infer_fetch, lambda xs, a: [xs[0].copy()],
    attrs={"layer": REQUIRED, "num_experts": REQUIRED},
    doc="the routed ids, unchanged, once the experts they name are resident: a hook where a "
        "runtime with an expert cache (moec.runtime.expert_cache) loads missing experts and "
        "predicts the next layer's from x (ids >= num_experts are identity experts, which "
        "have no weights); the identity everywhere else"))
