"""Small MoE blocks in plain PyTorch, one per routing or expert form of newer transformers
families (issue 17 §2), for the recogniser tests: each is a few lines of the form itself,
not a copy of a family. Random weights, eval mode; x [T, H] or [B, S, H]."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

H, I, E, K = 32, 48, 8, 2


class MLP(nn.Module):
    def __init__(self, h: int = H, i: int = I) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _loop(experts: nn.ModuleList, x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor
          ) -> torch.Tensor:
    out = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        tok, slot = torch.where(ids == e)
        if len(tok):
            out.index_add_(0, tok, expert(x[tok]) * w[tok, slot, None])
    return out


class SigmoidBiasMoE(nn.Module):
    """Sigmoid scores, top-k on score + a selection bias, renormalised, times a constant, plus
    optional shared experts times a constant. Where the bias lives (`bias_at`):
    "block" (a buffer of the block, passed into the router), "router_child" (a [1, E] buffer in
    a child of the router module). `route_scale` and `shared_coef` carry names no hint lists."""

    def __init__(self, bias_at: str = "block", route_scale: float = 1.0,
                 shared_coef: float | None = None, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.router = Router(bias_at == "router_child")
        if bias_at == "block":
            self.register_buffer("score_correction", torch.randn(E, generator=gen) * 0.5)
        self.experts = nn.ModuleList(MLP() for _ in range(E))
        self.route_scale = route_scale
        self.shared = MLP(H, 40) if shared_coef is not None else None
        self.shared_coef = shared_coef
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
            if bias_at == "router_child":
                self.router.statics.e_score_correction_bias.copy_(
                    torch.randn(1, E, generator=gen) * 0.5)
        self.eval()

    def correction(self) -> torch.Tensor:
        if hasattr(self, "score_correction"):
            return self.score_correction
        return self.router.statics.e_score_correction_bias[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(-1, H)
        w, ids = self.router(h, self.correction())
        y = _loop(self.experts, h, w * self.route_scale, ids)
        if self.shared is not None:
            y = (y + self.shared(h)) * self.shared_coef
        return y.reshape(x.shape)


class Statics(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("e_score_correction_bias", torch.zeros(1, E))


class Router(nn.Module):
    def __init__(self, with_statics: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(E, H))
        if with_statics:
            self.statics = Statics()

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.sigmoid(F.linear(x, self.weight))
        ids = torch.topk(scores + bias, K, dim=-1).indices
        w = scores.gather(-1, ids)
        return w / w.sum(-1, keepdim=True), ids


class DropoutScaledMoE(nn.Module):
    """Softmax top-k whose output is scaled at evaluation time by 1 - p (an old-style dropout
    written out), under no attribute name a hint lists."""

    def __init__(self, p: float = 0.1, seed: int = 1) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.wg = nn.Linear(H, E, bias=False)
        self.experts = nn.ModuleList(MLP() for _ in range(E))
        self.keep = 1.0 - p
        with torch.no_grad():
            for q in self.parameters():
                q.copy_(torch.randn(q.shape, generator=gen) * q.shape[-1] ** -0.5)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.wg(x), dim=-1)
        w, ids = torch.topk(probs, K, dim=-1)
        return _loop(self.experts, x, w, ids) * self.keep


class ZeroExpertsMoE(nn.Module):
    """A router over E + 2 experts whose fused gate/up weight covers them all but whose down
    weight covers only E (zero-computation experts): not supported, and the error must say
    which weight's expert count differs."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(H, E + 2, bias=False)
        self.gate_up_proj = nn.Parameter(torch.randn(E + 2, 2 * I, H) * 0.1)
        self.down_proj = nn.Parameter(torch.randn(E, H, I) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class DropoutListMoE(nn.Module):
    """Softmax top-k over an experts ModuleList that also holds a Dropout (identity at
    inference) after the expert MLPs."""

    def __init__(self, seed: int = 2) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.gate = nn.Linear(H, E, bias=False)
        self.experts = nn.ModuleList([*(MLP() for _ in range(E)), nn.Dropout(0.1)])
        with torch.no_grad():
            for q in self.parameters():
                q.copy_(torch.randn(q.shape, generator=gen) * q.shape[-1] ** -0.5)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, ids = torch.topk(torch.softmax(self.gate(x), dim=-1), K, dim=-1)
        return self.experts[E](_loop(self.experts[:E], x, w, ids))


class DenseMaskedMoE(nn.Module):
    """Experts and a router, combined densely (every expert on every token), with a second
    input: it cannot be probed as block(x), so it is traced as plain ops, which moec says."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(H, E, bias=False)
        self.experts = nn.ModuleList(MLP() for _ in range(E))
        self.eval()

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.gate(x), dim=-1)
        y = probs[:, :1] * self.experts[0](x)
        for e in range(1, E):
            y = y + probs[:, e:e + 1] * self.experts[e](x)
        return y * mask


class ReLUSquared(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


class PlainMLP(nn.Module):
    """A non-gated expert: down(act(up(x))), with or without biases."""

    def __init__(self, act: nn.Module, bias: bool) -> None:
        super().__init__()
        self.up_proj = nn.Linear(H, I, bias=bias)
        self.act = act
        self.down_proj = nn.Linear(I, H, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


class NonGatedMoE(nn.Module):
    """Softmax top-k, renormalised, over non-gated experts with activation relu2
    (`down(relu(up(x))^2)`), relu or gelu, with or without biases."""

    def __init__(self, act: str = "relu2", bias: bool = False, seed: int = 3) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        make = {"relu2": ReLUSquared, "relu": nn.ReLU, "gelu": nn.GELU}[act]
        self.gate = nn.Linear(H, E, bias=False)
        self.experts = nn.ModuleList(PlainMLP(make(), bias) for _ in range(E))
        with torch.no_grad():
            for q in self.parameters():
                q.copy_(torch.randn(q.shape, generator=gen) * q.shape[-1] ** -0.5
                        if q.dim() == 2 else torch.randn(q.shape, generator=gen) * 0.1)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, ids = torch.topk(torch.softmax(self.gate(x), dim=-1), K, dim=-1)
        return _loop(self.experts, x, w / w.sum(-1, keepdim=True), ids)


class SqrtSoftplusRouter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(E, H))
        self.register_buffer("e_score_correction_bias", torch.zeros(E))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.sqrt(F.softplus(F.linear(x, self.weight)))
        ids = torch.topk(scores + self.e_score_correction_bias, K, dim=-1).indices
        w = scores.gather(-1, ids)
        return w / (w.sum(-1, keepdim=True) + 1e-20), ids


class SqrtSoftplusMoE(nn.Module):
    """sqrt(softplus(logits)) scores, top-k on score + bias, renormalised, scaled by a constant
    (DeepSeek-V4's router), over SwiGLU experts."""

    def __init__(self, seed: int = 4) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.gate = SqrtSoftplusRouter()
        self.experts = nn.ModuleList(MLP() for _ in range(E))
        self.routed_scaling_factor = 1.5
        with torch.no_grad():
            for q in self.parameters():
                q.copy_(torch.randn(q.shape, generator=gen) * q.shape[-1] ** -0.5)
            self.gate.e_score_correction_bias.copy_(torch.randn(E, generator=gen) * 0.3)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(-1, H)
        w, ids = self.gate(h)
        return _loop(self.experts, h, w * self.routed_scaling_factor, ids).reshape(x.shape)


def _clamped_glu(g: torch.Tensor, u: torch.Tensor, form: str, limit: float) -> torch.Tensor:
    if form == "plain":  # DeepSeek-V4, HY-V4, MiniMax-M3: no alpha, no +1
        return F.silu(g.clamp(max=limit)) * u.clamp(-limit, limit)
    if form == "gpt_oss":
        g = g.clamp(max=limit)
        return (u.clamp(-limit, limit) + 1) * g * torch.sigmoid(1.702 * g)
    return F.silu(g) * u  # "none": a limit attribute, but no clamp


class ClampedMLP(nn.Module):
    def __init__(self, form: str, limit: float) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(H, I, bias=False)
        self.up_proj = nn.Linear(H, I, bias=False)
        self.down_proj = nn.Linear(I, H, bias=False)
        self.form, self.swiglu_limit = form, limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(_clamped_glu(self.gate_proj(x), self.up_proj(x), self.form,
                                           self.swiglu_limit))


class ClampedExperts(nn.Module):
    def __init__(self, form: str, limit: float) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.zeros(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.zeros(E, H, I))
        self.form, self.limit = form, limit

    def forward(self, x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e in range(E):
            tok, slot = torch.where(ids == e)
            if len(tok):
                g, u = F.linear(x[tok], self.gate_up_proj[e]).chunk(2, dim=-1)
                y = F.linear(_clamped_glu(g, u, self.form, self.limit), self.down_proj[e])
                out.index_add_(0, tok, y * w[tok, slot, None])
        return out


class ClampedSwiGLUMoE(nn.Module):
    """Softmax top-k, renormalised, over SwiGLU experts clamped at `limit`: `form` "plain" is
    silu(min(g, L)) * clamp(u, -L, L), "gpt_oss" (clamp(u, -L, L) + 1) * g' * sigmoid(1.702 g'),
    "none" no clamp (the limit attribute is there all the same). Stacked experts (`limit`) or a
    ModuleList (`swiglu_limit`); `scale` multiplies the expert weights (0.1: the probe's small
    inputs stay far below a limit of 7); `skew` a router bias sending most tokens to experts 0
    and 1."""

    def __init__(self, form: str = "plain", limit: float = 0.6, listed: bool = False,
                 scale: float = 1.0, skew: float = 0.0, seed: int = 6) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.gate = nn.Linear(H, E)
        self.experts = nn.ModuleList(ClampedMLP(form, limit) for _ in range(E)) if listed \
            else ClampedExperts(form, limit)
        with torch.no_grad():
            for name, q in self.named_parameters():
                q.copy_(torch.randn(q.shape, generator=gen) * q.shape[-1] ** -0.5 * (
                    1.0 if name.startswith("gate.") else scale))
            self.gate.bias.zero_()
            self.gate.bias[:2] = skew
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, ids = torch.topk(torch.softmax(self.gate(x), dim=-1), K, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        if isinstance(self.experts, nn.ModuleList):
            return _loop(self.experts, x, w, ids)
        return self.experts(x, w, ids)


class IdentityExpertsMoE(nn.Module):
    """Softmax scores over E FFN experts and Z identity (zero-computation) experts, top-k on
    score + a correction bias, scaled (LongCat-Flash's routing); a slot routed to an id >= E adds
    w * x. Experts: a ModuleList of E MLPs (`layout` "listed"), or stacked weights whose fused
    gate/up holds E + Z experts and down E ("wide_gate_up", as LongCat-Flash allocates them) or
    both E ("stacked"). `skew` is added to the identity experts' correction bias (most tokens
    pick one)."""

    def __init__(self, layout: str = "wide_gate_up", z: int = 2, skew: float = 0.0,
                 seed: int = 7) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.n_ffn, self.z = E, z
        self.router = nn.Linear(H, E + z, bias=False)
        self.register_buffer("e_score_correction_bias", torch.zeros(E + z))
        self.routed_scaling_factor = 2.0
        if layout == "listed":
            self.experts = nn.ModuleList(MLP() for _ in range(E))
        else:
            self.gate_up_proj = nn.Parameter(torch.zeros(E + z if layout == "wide_gate_up" else E,
                                                         2 * I, H))
            self.down_proj = nn.Parameter(torch.zeros(E, H, I))
        with torch.no_grad():
            for q in self.parameters():
                q.copy_(torch.randn(q.shape, generator=gen) * q.shape[-1] ** -0.5)
            self.e_score_correction_bias[E:] = skew
        self.eval()

    def ffn(self, e: int, v: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "experts"):
            return self.experts[e](v)
        g, u = F.linear(v, self.gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(F.silu(g) * u, self.down_proj[e])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(-1, H)
        scores = torch.softmax(self.router(h), dim=-1)
        ids = torch.topk(scores + self.e_score_correction_bias, K, dim=-1).indices
        w = scores.gather(-1, ids) * self.routed_scaling_factor
        out = torch.zeros_like(h)
        for e in range(self.n_ffn + self.z):
            tok, slot = torch.where(ids == e)
            if len(tok):
                y = h[tok] if e >= self.n_ffn else self.ffn(e, h[tok])
                out.index_add_(0, tok, y * w[tok, slot, None])
        return out.reshape(x.shape)
