"""MoE block recognition: structural variants, user recognisers, and the errors for what is not
recognised or not translatable."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moec.errors import UnsupportedError
from moec.frontend import (
    MoESpec,
    find_moe_blocks,
    from_torch,
    register_moe_recognizer,
    unregister_moe_recognizer,
)
from moec.models import MoEBlock, SwiGLUExpert

H, I, E = 32, 48, 6


def _loop_experts(x: torch.Tensor, experts: nn.ModuleList, w: torch.Tensor,
                  ids: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(x)
    for e, ex in enumerate(experts):
        tok, slot = torch.where(ids == e)
        out.index_add_(0, tok, ex(x[tok]) * w[tok, slot, None])
    return out


# --------------------------------------------------------------------------- structural variants


class MixtralLikeExpert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Linear(H, I, bias=False)
        self.w2 = nn.Linear(I, H, bias=False)
        self.w3 = nn.Linear(H, I, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act_fn(self.w1(x)) * self.w3(x))


class MixtralLikeBlock(nn.Module):
    """[B, S, H] in, (out, router_logits) out; renormalised softmax->topk."""

    def __init__(self) -> None:
        super().__init__()
        self.top_k = 2
        self.gate = nn.Linear(H, E, bias=False)
        self.experts = nn.ModuleList(MixtralLikeExpert() for _ in range(E))

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, s, h = hidden.shape
        x = hidden.view(-1, h)
        logits = self.gate(x)
        w = F.softmax(logits, dim=1, dtype=torch.float)
        w, ids = torch.topk(w, self.top_k, dim=-1)
        w = (w / w.sum(dim=-1, keepdim=True)).to(x.dtype)
        return _loop_experts(x, self.experts, w, ids).reshape(b, s, h), logits


class MixtralLikeLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block_sparse_moe = MixtralLikeBlock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.block_sparse_moe(x.unsqueeze(0))
        return x + y.squeeze(0)


class GeluExpert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(H, I, bias=False)
        self.fc2 = nn.Linear(I, H, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SigmoidBlock(nn.Module):
    """Non-gated GELU experts, sigmoid scores, k=3, renormalised; no attribute hints at all."""

    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(H, E, bias=False)
        self.mlps = nn.ModuleList(GeluExpert() for _ in range(E))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, ids = torch.topk(torch.sigmoid(self.router(x)), 3)
        return _loop_experts(x, self.mlps, w / w.sum(-1, keepdim=True), ids)


class FusedStackedBlock(nn.Module):
    """3-D weights in the transposed layout with gate and up fused: gate_up [E, H, 2I],
    down [E, I, H]; top-1 then softmax (a no-op) scaled by 2.5."""

    def __init__(self) -> None:
        super().__init__()
        self.routed_scaling_factor = 2.5
        self.gate = nn.Linear(H, E, bias=False)
        self.gate_up_proj = nn.Parameter(torch.randn(E, H, 2 * I) * H ** -0.5)
        self.down_proj = nn.Parameter(torch.randn(E, I, H) * I ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vals, ids = torch.topk(self.gate(x), 1)
        w = torch.softmax(vals, -1) * self.routed_scaling_factor
        out = torch.zeros_like(x)
        for e in range(E):
            g, u = (x @ self.gate_up_proj[e]).chunk(2, dim=-1)
            y = (F.silu(g) * u) @ self.down_proj[e]
            out = out + (w * (ids == e)).sum(-1, keepdim=True) * y
        return out


@pytest.mark.parametrize("make,check", [
    (MixtralLikeLayer, dict(k=2, norm_topk=True, order="score_topk", returns_logits=True)),
    (SigmoidBlock, dict(k=3, scoring="sigmoid", norm_topk=True, activation="gelu",
                        gated=False)),
    (FusedStackedBlock, dict(k=1, scale=2.5)),  # top-1 softmax: any order is the same
])
def test_structural_variants(make, check, check_against_torch):
    torch.manual_seed(1)
    model = make().eval()
    ((path, spec),) = find_moe_blocks(model)
    gated = check.pop("gated", True)
    assert (spec.w_gate is not None) == gated
    for attr, want in check.items():
        assert getattr(spec, attr) == want, attr
    graph = from_torch(model, torch.randn(4, H))
    check_against_torch(model, graph, H)
    assert graph.find("moe.experts")[0].attrs["gated"] == gated
    assert f"{path + '.' if path else ''}experts.w_up" in graph.params


# --------------------------------------------------------------------------- user recognisers


class RawRouterBlock(nn.Module):
    """Router kept as a bare parameter: the built-in recogniser finds no router."""

    def __init__(self) -> None:
        super().__init__()
        self.wg = nn.Parameter(torch.randn(E, H) * H ** -0.5)
        self.experts = nn.ModuleList(SwiGLUExpert(H, I) for _ in range(E))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, ids = torch.topk(torch.softmax(x @ self.wg.t(), -1), 2)
        return _loop_experts(x, self.experts, w, ids)


def _raw_router_spec(module: nn.Module, path: str, k: int = 2) -> MoESpec | None:
    if not isinstance(module, RawRouterBlock):
        return None
    ex = module.experts
    return MoESpec(router_weight=module.wg, router_name="wg", k=k,
                   w_gate=torch.stack([e.gate_proj.weight for e in ex]),
                   w_up=torch.stack([e.up_proj.weight for e in ex]),
                   w_down=torch.stack([e.down_proj.weight for e in ex]))


class NoRouterBlock(nn.Module):
    """Experts picked by token position: nothing in the block routes."""

    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleList(SwiGLUExpert(H, I) for _ in range(E))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = (torch.arange(len(x)) % E)[:, None]
        return _loop_experts(x, self.experts, torch.ones(len(x), 1), ids)


def test_builtin_reports_missing_router():
    with pytest.raises(UnsupportedError, match=r"found 6 experts \('experts'\) but no router.*"
                                               r"register_moe_recognizer"):
        from_torch(NoRouterBlock(), torch.randn(4, H))


def test_bare_parameter_router_is_recognised(check_against_torch):
    torch.manual_seed(2)
    block = RawRouterBlock().eval()
    ((_, spec),) = find_moe_blocks(block)
    assert spec.router_name == "wg" and spec.router_is_param and spec.k == 2
    check_against_torch(block, from_torch(block, torch.randn(4, H)), H)


def test_user_recognizer(check_against_torch):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(H, H), RawRouterBlock()).eval()
    register_moe_recognizer(_raw_router_spec)
    try:
        graph = from_torch(model, torch.randn(4, H))
    finally:
        unregister_moe_recognizer(_raw_router_spec)
    check_against_torch(model, graph, H)
    assert "1.wg" in graph.params and graph.find("moe.experts")[0].loc == "1"


def test_user_recognizer_with_wrong_spec_is_rejected():
    def wrong(module: nn.Module, path: str) -> MoESpec | None:
        return _raw_router_spec(module, path, k=1)

    register_moe_recognizer(wrong)
    try:
        with pytest.raises(UnsupportedError, match="from recogniser wrong does not reproduce"):
            from_torch(RawRouterBlock(), torch.randn(4, H))
    finally:
        unregister_moe_recognizer(wrong)


# --------------------------------------------------------------------------- what is not found


class SharedExpertBlock(MoEBlock):
    def __init__(self) -> None:
        super().__init__(H, I, E, 2)
        self.shared_expert = SwiGLUExpert(H, I)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.shared_expert(x)


class TemperatureBlock(MoEBlock):
    def __init__(self) -> None:
        super().__init__(H, I, E, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, ids = torch.topk(torch.softmax(self.gate(x) / 3.0, -1), self.top_k)
        return _loop_experts(x, self.experts, w, ids)


class TanhExpert(SwiGLUExpert):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(torch.tanh(self.gate_proj(x)) * self.up_proj(x))


class TanhBlock(MoEBlock):
    def __init__(self) -> None:
        super().__init__(H, I, E, 2)
        self.experts = nn.ModuleList(TanhExpert(H, I) for _ in range(E))


class BiasExpertBlock(MoEBlock):
    def __init__(self) -> None:
        super().__init__(H, I, E, 2)
        for ex in self.experts:
            ex.up_proj = nn.Linear(H, I, bias=True)


class BadStackedBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(H, E, bias=False)
        self.w_in = nn.Parameter(torch.randn(E, I, H + 1))
        self.w_out = nn.Parameter(torch.randn(E, H + 1, I))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@pytest.mark.parametrize("make,shared", [(SharedExpertBlock, True), (BiasExpertBlock, False)])
def test_shared_experts_and_expert_biases(make, shared, check_against_torch):
    torch.manual_seed(4)
    block = make().eval()
    ((_, spec),) = find_moe_blocks(block)
    assert spec.shared_experts == (("shared_expert",) if shared else ())
    assert (spec.b_up is not None) == (not shared)
    graph = from_torch(block, torch.randn(4, H))
    check_against_torch(block, graph, H)
    assert graph.find("moe.experts")[0].attrs["bias"] == (not shared)


class PreNormBlock(MoEBlock):
    """Normalises its input before routing: a part the recogniser does not model."""

    def __init__(self) -> None:
        super().__init__(H, I, E, 2)
        self.pre_norm = nn.LayerNorm(H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.pre_norm(x))


@pytest.mark.parametrize("make,message", [
    (PreNormBlock, r"top-k routing not found.*does not model: pre_norm.*register_moe_recognizer"),
    (TemperatureBlock, r"MoE block 'moe' \(TemperatureBlock\): top-k routing not found"),
    (TanhBlock, r"expert MLP 'experts.0' \(TanhExpert\) not recognised"),
    (BadStackedBlock, r"do not fit hidden size 32"),
])
def test_unrecognised_part_is_named(make, message):
    with pytest.raises(UnsupportedError, match=message):
        find_moe_blocks(nn.ModuleDict({"moe": make()}))


# --------------------------------------------------------------------------- unsupported ops


class Spectral(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fft.rfft(x, dim=-1).real


@torch.library.custom_op("moectest::triple", mutates_args=())
def triple(x: torch.Tensor) -> torch.Tensor:
    return x * 3


@triple.register_fake
def _triple_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class Triple(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return triple(x)


class Outer(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.proj = nn.Linear(H, H)
        self.body = nn.ModuleDict({"mix": inner})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body["mix"](self.proj(x))


@pytest.mark.parametrize("inner,op,cls", [
    (Spectral(), "aten.fft_rfft.default", "Spectral"),
    (Triple(), "moectest.triple.default", "Triple"),
])
def test_unsupported_op_names_op_path_and_line(inner, op, cls):
    with pytest.raises(UnsupportedError) as info:
        from_torch(Outer(inner), torch.randn(4, H))
    msg = str(info.value)
    assert f"no moec translation for op {op}" in msg
    assert f"in module 'body.mix' ({cls})" in msg
    assert "test_recognize.py:" in msg


def test_unrecognised_moe_falls_through_to_an_op_error():
    """A loop over MLPs without any router is not taken for an MoE block; its data-dependent
    ops then fail translation with the op named."""

    class Picky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.branches = nn.ModuleList(GeluExpert() for _ in range(2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            tok = torch.nonzero(x[:, 0] > 0).squeeze(-1)
            return x.index_add(0, tok, self.branches[0](x[tok]))

    with pytest.raises(UnsupportedError, match=r"no moec translation for op aten\..*\(Picky\)"):
        from_torch(Picky(), torch.randn(4, H))


# --------------------------------------------------------------------------- unknown families


class NovelBlock(nn.Module):
    """No transformers class and no familiar names: a sigmoid router with a selection bias and
    group-limited top-k, experts as [E, H, 2I] with gate/up interleaved and biases, a GELU shared
    expert; the hints are only the usual attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.top_k, self.n_group, self.topk_group = 2, 3, 2
        self.scorer = nn.Module()
        self.scorer.weight = nn.Parameter(torch.randn(E, H) * H ** -0.5)
        self.scorer.register_buffer("balance", torch.randn(E) * 0.3)
        self.bank = nn.Module()
        self.bank.inp = nn.Parameter(torch.randn(E, H, 2 * I) * H ** -0.5)
        self.bank.inp_b = nn.Parameter(torch.randn(E, 2 * I) * 0.1)
        self.bank.out = nn.Parameter(torch.randn(E, I, H) * I ** -0.5)
        self.common = GeluExpert()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(x @ self.scorer.weight.t())
        pick = (s + self.scorer.balance).view(len(x), 3, E // 3)
        keep = pick.topk(2, -1)[0].sum(-1).topk(self.topk_group, -1)[1]
        mask = torch.zeros(len(x), 3, dtype=torch.bool).scatter(1, keep, True)
        pick = pick.masked_fill(~mask[..., None], float("-inf")).view(len(x), E)
        ids = pick.topk(self.top_k, -1)[1]
        w = s.gather(1, ids)
        w = w / w.sum(-1, keepdim=True)
        out = self.common(x)
        for e in range(E):
            tok, slot = torch.where(ids == e)
            h = x[tok] @ self.bank.inp[e] + self.bank.inp_b[e]
            h = F.silu(h[:, 0::2]) * h[:, 1::2]
            out = out.index_add(0, tok, (h @ self.bank.out[e]) * w[tok, slot, None])
        return out


def test_an_unknown_family_with_the_same_parts_works(check_against_torch):
    torch.manual_seed(5)
    block = NovelBlock().eval()
    ((_, spec),) = find_moe_blocks(block)
    assert (spec.scoring, spec.n_groups, spec.topk_groups, spec.group_score) == (
        "sigmoid", 3, 2, "top2_sum")
    assert spec.select_bias_name == "scorer.balance" and spec.shared_experts == ("common",)
    assert spec.b_gate is not None and spec.norm_topk
    graph = from_torch(block, torch.randn(4, H))
    check_against_torch(block, graph, H)
    assert {"scorer.weight", "scorer.balance", "experts.b_up", "common.fc1.weight"} <= set(
        graph.params)


class MaskedBlock(MoEBlock):
    """Experts and a router, but forward needs a second argument: not callable as block(x)."""

    def __init__(self) -> None:
        super().__init__(H, I, E, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * mask


def test_a_block_that_cannot_be_probed_is_skipped_and_the_trace_error_says_why():
    block = MaskedBlock().eval()
    notes: dict[str, str] = {}
    assert find_moe_blocks(block, notes) == []
    assert "calling the block on a random [16, H] input" in notes[""]
    with pytest.raises(UnsupportedError, match=r"(?s)not recognised as an MoE block: .*"
                                               r"register_moe_recognizer"):
        from_torch(block, (torch.randn(4, H), torch.ones(4, 1)))
