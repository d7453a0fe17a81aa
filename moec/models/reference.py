"""Small reference MoE models in plain torch, written the way eager model code usually is.

They serve the demo, the tests and the benchmarks, and are what the torch frontend is checked
against: nothing here is moec-specific, the frontend has to recognise these blocks structurally.

- `MoEBlock`: router `nn.Linear(H, E)` named `gate`, experts an `nn.ModuleList` of SwiGLU MLPs
  (`gate_proj`, `up_proj`, `down_proj`), forward as a loop over experts with `torch.where` masks and
  `index_add_` (the Hugging Face Mixtral/Qwen-MoE style).
- `StackedMoEBlock`: the same maths with the experts held as 3-D parameters in a child module
  `experts` (`w_gate [E, I, H]`, `w_up [E, I, H]`, `w_down [E, H, I]`), combined densely through a
  `[T, E]` routing-weight matrix.
- `DecoderLayer`: RMSNorm -> linear "mixer" (residual) -> RMSNorm -> MoE block (residual).
- `demo_model(...)`: a seeded `DecoderLayer` and example inputs; `skew_router(block, expert)`:
  make every token pick one expert first (load imbalance for tests and benchmarks).

Routing options (both blocks): `routing="softmax_topk"` computes `softmax(logits)` then takes the
top-k probabilities (renormalised to sum 1 when `norm_topk_prob`); `routing="topk_softmax"` takes
the top-k logits first and softmaxes those k values (`norm_topk_prob` is then a no-op).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ROUTINGS = ("softmax_topk", "topk_softmax")


def _route(logits: torch.Tensor, top_k: int, routing: str, norm_topk_prob: bool
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing weights [T, k] (f32) and expert ids [T, k] from router logits [T, E]."""
    if routing == "softmax_topk":
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, top_k, dim=-1)
        if norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
    elif routing == "topk_softmax":
        vals, ids = torch.topk(logits, top_k, dim=-1)
        weights = F.softmax(vals, dim=-1, dtype=torch.float32)
    else:
        raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
    return weights, ids


class SwiGLUExpert(nn.Module):
    """One expert: `down_proj(silu(gate_proj(x)) * up_proj(x))`."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEBlock(nn.Module):
    """Sparse MoE block, x [T, H] -> [T, H], experts as an `nn.ModuleList` of SwiGLU MLPs."""

    def __init__(self, hidden: int, intermediate: int, experts: int, top_k: int,
                 routing: str = "softmax_topk", norm_topk_prob: bool = False) -> None:
        super().__init__()
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
        self.num_experts = experts
        self.top_k = top_k
        self.routing = routing
        self.norm_topk_prob = norm_topk_prob
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList(SwiGLUExpert(hidden, intermediate) for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = _route(self.gate(x), self.top_k, self.routing, self.norm_topk_prob)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(ids == e)
            if tok.numel() == 0:
                continue
            y = expert(x[tok]) * weights[tok, slot, None]
            out.index_add_(0, tok, y)
        return out


class StackedExperts(nn.Module):
    """Expert weights as 3-D parameters: `w_gate`, `w_up` [E, I, H] and `w_down` [E, H, I]."""

    def __init__(self, hidden: int, intermediate: int, experts: int) -> None:
        super().__init__()
        bound_h, bound_i = hidden ** -0.5, intermediate ** -0.5
        self.w_gate = nn.Parameter(torch.empty(experts, intermediate, hidden).uniform_(
            -bound_h, bound_h))
        self.w_up = nn.Parameter(torch.empty(experts, intermediate, hidden).uniform_(
            -bound_h, bound_h))
        self.w_down = nn.Parameter(torch.empty(experts, hidden, intermediate).uniform_(
            -bound_i, bound_i))


class StackedMoEBlock(nn.Module):
    """MoE block with stacked 3-D expert weights, combined through a dense [T, E] weight matrix."""

    def __init__(self, hidden: int, intermediate: int, experts: int, top_k: int,
                 routing: str = "softmax_topk", norm_topk_prob: bool = False) -> None:
        super().__init__()
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
        self.num_experts = experts
        self.top_k = top_k
        self.routing = routing
        self.norm_topk_prob = norm_topk_prob
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.experts = StackedExperts(hidden, intermediate, experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = _route(self.gate(x), self.top_k, self.routing, self.norm_topk_prob)
        combine = torch.zeros(x.shape[0], self.num_experts, dtype=x.dtype, device=x.device)
        combine = combine.scatter(1, ids, weights.to(x.dtype))
        out = torch.zeros_like(x)
        ex = self.experts
        for e in range(self.num_experts):
            h = F.silu(x @ ex.w_gate[e].t()) * (x @ ex.w_up[e].t())
            out = out + combine[:, e:e + 1] * (h @ ex.w_down[e].t())
        return out


class RMSNorm(nn.Module):
    """RMSNorm as eager model code writes it (computed in f32, cast back, scaled by `weight`)."""

    def __init__(self, hidden: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        var = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(var + self.eps)
        return self.weight * h.to(dtype)


class DecoderLayer(nn.Module):
    """x [T, H] -> [T, H]: `h = x + mixer(norm1(x)); out = h + mlp(norm2(h))`."""

    def __init__(self, hidden: int, intermediate: int, experts: int, top_k: int,
                 routing: str = "softmax_topk", norm_topk_prob: bool = False,
                 stacked: bool = False) -> None:
        super().__init__()
        self.input_norm = RMSNorm(hidden)
        self.mixer = nn.Linear(hidden, hidden, bias=False)
        self.post_norm = RMSNorm(hidden)
        block = StackedMoEBlock if stacked else MoEBlock
        self.mlp = block(hidden, intermediate, experts, top_k, routing, norm_topk_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.mixer(self.input_norm(x))
        return h + self.mlp(self.post_norm(h))


def demo_model(seed: int = 0, hidden: int = 256, intermediate: int = 512, experts: int = 8,
               top_k: int = 2, routing: str = "softmax_topk", norm_topk_prob: bool = False,
               stacked: bool = False, tokens: int = 16) -> tuple[DecoderLayer, tuple[torch.Tensor]]:
    """A seeded `DecoderLayer` in eval mode and example inputs `(x,)` with x f32 [tokens, hidden].

    The same arguments always give the same weights and inputs. The norm weights are randomised
    around 1 so that they matter numerically."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DecoderLayer(hidden, intermediate, experts, top_k, routing, norm_topk_prob,
                             stacked)
    with torch.no_grad():
        for norm in (model.input_norm, model.post_norm):
            norm.weight.copy_(1.0 + 0.1 * torch.randn(hidden, generator=gen))
    x = torch.randn(tokens, hidden, generator=gen)
    return model.eval(), (x,)


def skew_router(block: nn.Module, expert: int = 3, margin: float = 10.0) -> nn.Module:
    """Make every token pick `expert` first: the router gets a logit bias of `margin` on `expert`.

    A bias-free linear router cannot do this for every input (`x` and `-x` rank the experts in
    reverse), hence the bias; the router's other logits keep deciding the remaining k-1 choices.
    `margin` must exceed the spread of the router logits (about +-3 at the demo sizes).
    Works on `MoEBlock`, `StackedMoEBlock` and anything else whose router is `block.gate`; also
    accepts a `DecoderLayer` (skews its `mlp`). Returns `block`, changed in place."""
    if isinstance(block, DecoderLayer):
        skew_router(block.mlp, expert, margin)
        return block
    old: nn.Linear = block.gate
    if not 0 <= expert < old.out_features:
        raise ValueError(f"expert {expert} out of range 0..{old.out_features - 1}")
    new = nn.Linear(old.in_features, old.out_features, bias=True,
                    device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(old.weight)
        new.bias.zero_()
        new.bias[expert] = margin
    block.gate = new
    return block
