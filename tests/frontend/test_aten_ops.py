"""The dense (non-MoE) part of the translation: ATen ops to core ops."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moec.frontend import from_torch

H = 24


class Dense(nn.Module):
    """A bit of everything the translator maps: linear with bias, matmul by a transposed
    parameter, layer norm, F.rms_norm, activations, scalar arithmetic, reductions, reshapes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(H, 2 * H)
        self.w = nn.Parameter(torch.randn(H, 2 * H) * 0.2)
        self.ln = nn.LayerNorm(H)
        self.scale = nn.Parameter(torch.rand(H) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc(x), approximate="tanh")
        h = h @ self.w.t()                                   # folds into core.linear
        h = self.ln(h) + torch.sigmoid(h) * 0.5 - torch.tanh(h) / 3.0
        h = F.rms_norm(h, (H,), self.scale, eps=1e-5)
        g = torch.softmax(h, dim=-1) + h.mean(-1, keepdim=True) - h.sum(-1, keepdim=True) / H
        g = torch.clamp(g, min=-2.0, max=2.0).relu() + F.silu(h).exp().sqrt()
        g = g.reshape(-1, 4, H // 4).reshape(x.shape[0], H)   # symbolic reshapes
        return 1.0 - g * g.pow(2) + torch.rsqrt(g * g + 1.0)


def test_dense_ops_match_torch(check_against_torch):
    torch.manual_seed(0)
    model = Dense().eval()
    graph = from_torch(model, torch.randn(6, H))
    check_against_torch(model, graph, H)
    ops = {n.op for n in graph.nodes}
    assert {"core.linear", "core.layernorm", "core.rmsnorm", "core.gelu", "core.softmax",
            "core.mean", "core.sum", "core.clamp", "core.reshape"} <= ops
    assert "core.matmul" not in ops and "w" in graph.params and "w.T" not in graph.params
    assert graph.find("core.gelu")[0].attrs["approximate"] == "tanh"


def test_two_inputs_share_the_token_dim(check_against_torch):
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(H, H, bias=False)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.a(x) * y

    graph = from_torch(Two(), (torch.randn(3, H), torch.randn(3, H)))
    assert [str(v.type) for v in graph.inputs] == ["f32[T, 24]", "f32[T, 24]"]
    assert graph.find("core.linear")[0].loc == "a"


def test_softplus(check_against_torch):
    """F.softplus (beta 1, the default threshold) is core.softplus; another beta is refused by
    name rather than computed wrongly."""
    import pytest

    from moec.errors import UnsupportedError

    class Soft(nn.Module):
        def __init__(self, beta: float = 1.0) -> None:
            super().__init__()
            self.fc, self.beta = nn.Linear(H, H), beta

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sqrt(F.softplus(self.fc(x) * 12.0, beta=self.beta))

    model = Soft().eval()
    graph = from_torch(model, torch.randn(6, H))
    assert "core.softplus" in {n.op for n in graph.nodes}
    check_against_torch(model, graph, H)
    with pytest.raises(UnsupportedError, match="softplus with beta=2"):
        from_torch(Soft(2.0).eval(), torch.randn(6, H))
