"""The opaque MoE calls the torch frontend puts in place of each recognised block before export,
and the torch form of their semantics.

`torch.ops.moec.moe_router` (router weights -> routing weights f32 [T, k] and expert ids i32
[T, k]) and `torch.ops.moec.moe_experts` (tokens, routing, stacked expert weights and biases ->
[T, H]) are `torch.library.custom_op`s; their fake kernels only give the output shapes, so
`torch.export` with a dynamic token dim records one call each instead of tracing the data-dependent
routing and expert loop. Their eager kernels are plain torch implementations of moe.router and
moe.experts (docs/ops.md), so the exported program still runs.

`route` and `expert_ffn` are the same semantics as functions; the recogniser's probes use them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SCORINGS = ("softmax", "sigmoid", "sqrt_softplus")
ORDERS = ("score_topk", "topk_score", "sparsemixer")
ACTIVATIONS = ("silu", "gelu", "relu", "gelu_tanh", "relu2", "clamped_swiglu")
UNGATED_ONLY = ("relu2",)
GROUP_SCORES = ("max", "top2_sum")


def activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    """Apply an (ungated) expert activation by name."""
    if activation == "silu":
        return F.silu(h)
    if activation == "gelu":
        return F.gelu(h)
    if activation == "relu":
        return F.relu(h)
    if activation == "relu2":
        return F.relu(h).square()
    if activation == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def glu(g: torch.Tensor, u: torch.Tensor, activation: str, alpha: float = 1.702,
        limit: float = 7.0, offset: float = 1.0) -> torch.Tensor:
    """The gated hidden state: act(g) * u, or the clamped SwiGLU
    (clamp(u, -limit, limit) + offset) * g' * sigmoid(alpha * g') with g' = min(g, limit):
    GPT-OSS's with alpha=1.702, offset=1; silu(g') * clamp(u) with alpha=1, offset=0."""
    if activation == "clamped_swiglu":
        g = g.clamp(max=limit)
        return (u.clamp(-limit, limit) + offset) * (g * torch.sigmoid(alpha * g))
    return activate(g, activation) * u


SCORE_FNS = {"softmax": lambda v: torch.softmax(v, dim=-1), "sigmoid": torch.sigmoid,
             "sqrt_softplus": lambda v: torch.sqrt(F.softplus(v))}  # DeepSeek-V4's scores


def _sparsemixer(logits: torch.Tensor, k: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    remaining = torch.ones_like(logits, dtype=torch.bool)
    weights, ids = [], []
    for _ in range(k):
        masked = logits.masked_fill(~remaining, float("-inf"))
        thr, best = masked.max(dim=-1, keepdim=True)
        far = (thr - logits) / logits.abs().clamp(min=thr) > 2 * eps
        keep = masked.masked_fill(far, float("-inf"))
        weights.append(torch.softmax(keep, dim=-1).gather(-1, best))
        ids.append(best)
        remaining = remaining.scatter(-1, best, False)
    return torch.cat(weights, dim=-1), torch.cat(ids, dim=-1)


def _select(scores: torch.Tensor, bias: torch.Tensor | None, k: int, n_groups: int,
            topk_groups: int, group_score: str) -> torch.Tensor:
    sel = scores + bias.float() if bias is not None else scores
    if n_groups > 1:
        t, e = sel.shape
        grouped = sel.view(t, n_groups, e // n_groups)
        gs = grouped.topk(2, dim=-1)[0].sum(-1) if group_score == "top2_sum" \
            else grouped.max(dim=-1).values
        keep = torch.zeros_like(gs, dtype=torch.bool).scatter(
            1, gs.topk(topk_groups, dim=-1)[1], True)
        sel = sel.masked_fill(~keep.repeat_interleave(e // n_groups, dim=-1), float("-inf"))
    return torch.topk(sel, k, dim=-1)[1]


def route(logits: torch.Tensor, k: int, scoring: str, order: str, norm_topk: bool,
          scale: float = 1.0, select_bias: torch.Tensor | None = None, n_groups: int = 1,
          topk_groups: int = 1, group_score: str = "max", capacity: int = 0,
          jitter_eps: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing weights (f32 [T, k]) and expert ids (int64 [T, k]) from router logits [T, E],
    as moe.router in docs/ops.md."""
    logits = logits.float()
    score = SCORE_FNS[scoring]
    if order == "score_topk":
        scores = score(logits)
        ids = _select(scores, select_bias, k, n_groups, topk_groups, group_score)
        weights = scores.gather(-1, ids)
        if norm_topk:
            denom = weights.sum(dim=-1, keepdim=True)
            weights = weights / (denom if scoring == "softmax" else denom + 1e-20)
    elif order == "topk_score":
        vals, ids = torch.topk(logits, k, dim=-1)
        weights = score(vals)
    else:
        weights, ids = _sparsemixer(logits, k, jitter_eps)
    if scale != 1.0:
        weights = weights * scale
    if capacity > 0:
        weights = weights * capacity_keep(ids, logits.shape[-1], capacity)
    return weights, ids


def capacity_keep(ids: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """bool like ids ([T, k], or [B, S, k] counted per sequence): whether a slot is among the
    first `capacity` slots of its expert, in slot order t*k + j."""
    flat = ids.reshape(*ids.shape[:-2], -1)  # [..., S*k]: the slots of each sequence in order
    onehot = F.one_hot(flat.long(), num_experts)
    position = (onehot.cumsum(-2) * onehot).sum(-1)  # 1-based rank among the expert's slots
    return (position <= capacity).reshape(ids.shape)


def expert_ffn(x: torch.Tensor, w_gate: torch.Tensor | None, w_up: torch.Tensor,
               w_down: torch.Tensor, activation: str, b_gate: torch.Tensor | None = None,
               b_up: torch.Tensor | None = None, b_down: torch.Tensor | None = None,
               alpha: float = 1.702, limit: float = 7.0, offset: float = 1.0) -> torch.Tensor:
    """One expert's FFN on x [n, H] with w_* of one expert ([I, H], [I, H], [H, I]) and optional
    biases ([I], [I], [H])."""
    up = F.linear(x, w_up, b_up)
    h = glu(F.linear(x, w_gate, b_gate), up, activation, alpha, limit, offset) \
        if w_gate is not None else activate(up, activation)
    return F.linear(h, w_down, b_down)


def experts_forward(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                    w_gate: torch.Tensor | None, w_up: torch.Tensor, w_down: torch.Tensor,
                    b_gate: torch.Tensor | None, b_up: torch.Tensor | None,
                    b_down: torch.Tensor | None, activation: str, alpha: float, limit: float,
                    weight_on: str, offset: float = 1.0, identity_experts: int = 0
                    ) -> torch.Tensor:
    """Eager moe.experts: sum_j w[t,j] * FFN_ids[t,j](x[t]) (weight_on=output) or
    sum_j FFN_ids[t,j](w[t,j] * x[t]) (weight_on=input); ids E..E+identity_experts-1 after the
    E FFN experts are identity experts: w[t,j] * x[t]."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    n_ffn = w_up.shape[0]
    for e in range(n_ffn + identity_experts):
        tok, slot = torch.where(ids == e)
        if tok.numel() == 0:
            continue
        w = weights[tok, slot, None].to(x.dtype)
        if e >= n_ffn:
            out.index_add_(0, tok, x[tok].float() * w.float())
            continue
        inp = x[tok] * w if weight_on == "input" else x[tok]
        y = expert_ffn(inp, None if w_gate is None else w_gate[e], w_up[e], w_down[e],
                       activation, None if b_gate is None else b_gate[e],
                       None if b_up is None else b_up[e], None if b_down is None else b_down[e],
                       alpha, limit, offset).float()
        out.index_add_(0, tok, y if weight_on == "input" else y * w.float())
    return out.to(x.dtype)


@torch.library.custom_op("moec::moe_router", mutates_args=())
def moe_router(x: torch.Tensor, weight: torch.Tensor, logit_bias: torch.Tensor | None,
               select_bias: torch.Tensor | None, k: int, scoring: str, order: str,
               norm_topk: bool, scale: float, n_groups: int, topk_groups: int, group_score: str,
               capacity: int, jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One recognised router: x [T, H] -> (weights f32 [T, k], ids i32 [T, k]); a router with
    capacity also takes x [B, S, H] (-> [B, S, k]) and counts capacity per sequence."""
    h = x.reshape(-1, x.shape[-1])
    logits = F.linear(h.float(), weight.float(), None if logit_bias is None else logit_bias.float())
    w, ids = route(logits, k, scoring, order, norm_topk, scale, select_bias, n_groups,
                   topk_groups, group_score, 0, jitter_eps)
    w, ids = w.reshape(*x.shape[:-1], k), ids.reshape(*x.shape[:-1], k)
    if capacity > 0:
        w = w * capacity_keep(ids, weight.shape[0], capacity)
    return w, ids.to(torch.int32)


@moe_router.register_fake
def _moe_router_fake(x: torch.Tensor, weight: torch.Tensor, logit_bias: object,
                     select_bias: object, k: int, *args: object
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    return (x.new_empty((*x.shape[:-1], k), dtype=torch.float32),
            x.new_empty((*x.shape[:-1], k), dtype=torch.int32))


@torch.library.custom_op("moec::moe_experts", mutates_args=())
def moe_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                w_gate: torch.Tensor | None, w_up: torch.Tensor, w_down: torch.Tensor,
                b_gate: torch.Tensor | None, b_up: torch.Tensor | None,
                b_down: torch.Tensor | None, activation: str, alpha: float, limit: float,
                weight_on: str, offset: float = 1.0, identity_experts: int = 0) -> torch.Tensor:
    """Routed experts: x [T, H], routing [T, k] -> [T, H] (see experts_forward)."""
    return experts_forward(x, weights, ids, w_gate, w_up, w_down, b_gate, b_up, b_down,
                           activation, alpha, limit, weight_on, offset, identity_experts)


@moe_experts.register_fake
def _moe_experts_fake(x: torch.Tensor, *args: object) -> torch.Tensor:
    return torch.empty_like(x)
