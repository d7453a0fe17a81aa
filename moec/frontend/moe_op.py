"""The opaque MoE call the torch frontend puts in place of each recognised block before export.

`torch.ops.moec.moe_block` is a `torch.library.custom_op` whose arguments are the block's router
weights, its stacked expert weights and the routing attributes; its fake kernel only says the
output has the input's shape, so `torch.export` with a dynamic token dim records one call per
block instead of tracing the data-dependent expert loop. The eager kernel is a plain torch
implementation of the moe.experts semantics (docs/ops.md), so the exported program still runs.

`route` and `expert_ffn` are the same semantics as functions; the recogniser's probes use them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SCORINGS = ("softmax", "sigmoid")
ORDERS = ("score_topk", "topk_score")
ACTIVATIONS = ("silu", "gelu", "relu", "gelu_tanh")


def activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    """Apply an expert activation by name."""
    if activation == "silu":
        return F.silu(h)
    if activation == "gelu":
        return F.gelu(h)
    if activation == "relu":
        return F.relu(h)
    if activation == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def route(logits: torch.Tensor, k: int, scoring: str, order: str, norm_topk: bool,
          scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing weights (f32 [T, k]) and expert ids ([T, k]) from router logits [T, E].

    Follows moe.router in docs/ops.md (without selection bias and grouped top-k)."""
    logits = logits.float()
    score = torch.softmax if scoring == "softmax" else None
    if order == "score_topk":
        probs = score(logits, dim=-1) if score else torch.sigmoid(logits)
        weights, ids = torch.topk(probs, k, dim=-1)
        if norm_topk:
            denom = weights.sum(dim=-1, keepdim=True)
            weights = weights / (denom + 1e-20 if scoring == "sigmoid" else denom)
    else:
        vals, ids = torch.topk(logits, k, dim=-1)
        weights = score(vals, dim=-1) if score else torch.sigmoid(vals)
    if scale != 1.0:
        weights = weights * scale
    return weights, ids


def expert_ffn(x: torch.Tensor, w_gate: torch.Tensor | None, w_up: torch.Tensor,
               w_down: torch.Tensor, activation: str) -> torch.Tensor:
    """One expert's FFN on x [n, H] with w_* of one expert ([I, H], [I, H], [H, I])."""
    up = x @ w_up.t()
    h = activate(x @ w_gate.t(), activation) * up if w_gate is not None else activate(up,
                                                                                        activation)
    return h @ w_down.t()


def moe_forward(x: torch.Tensor, router_weight: torch.Tensor, router_bias: torch.Tensor | None,
                w_gate: torch.Tensor | None, w_up: torch.Tensor, w_down: torch.Tensor, k: int,
                scoring: str, order: str, norm_topk: bool, scale: float,
                activation: str) -> torch.Tensor:
    """Eager reference of a whole MoE block in the frontend's canonical form."""
    logits = F.linear(x, router_weight, router_bias)
    weights, ids = route(logits, k, scoring, order, norm_topk, scale)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(w_up.shape[0]):
        tok, slot = torch.where(ids == e)
        if tok.numel() == 0:
            continue
        g = w_gate[e] if w_gate is not None else None
        y = expert_ffn(x[tok], g, w_up[e], w_down[e], activation).float()
        out.index_add_(0, tok, y * weights[tok, slot, None])
    return out.to(x.dtype)


@torch.library.custom_op("moec::moe_block", mutates_args=())
def moe_block(x: torch.Tensor, router_weight: torch.Tensor, router_bias: torch.Tensor | None,
              w_gate: torch.Tensor | None, w_up: torch.Tensor, w_down: torch.Tensor, k: int,
              scoring: str, order: str, norm_topk: bool, scale: float,
              activation: str) -> torch.Tensor:
    """One recognised MoE block: x [T, H] -> [T, H] (see moe_forward)."""
    return moe_forward(x, router_weight, router_bias, w_gate, w_up, w_down, k, scoring, order,
                       norm_topk, scale, activation)


@moe_block.register_fake
def _moe_block_fake(x: torch.Tensor, *args: object) -> torch.Tensor:
    return torch.empty_like(x)
