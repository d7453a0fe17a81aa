"""from_torch on the reference models: the interpreted IR equals torch eager."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moec.frontend import find_moe_blocks, from_torch
from moec.models import DecoderLayer, MoEBlock, StackedMoEBlock, demo_model, skew_router

H, I, E, K = 64, 96, 8, 2


def ops(graph) -> list[str]:
    return [n.op for n in graph.nodes]


def make_block(cls: type, routing: str, norm: bool, skew: bool) -> nn.Module:
    torch.manual_seed(3)
    block = cls(H, I, E, K, routing=routing, norm_topk_prob=norm).eval()
    return skew_router(block, expert=3) if skew else block


@pytest.mark.parametrize("skew", [False, True], ids=["uniform", "skewed"])
@pytest.mark.parametrize("norm", [False, True], ids=["plain", "norm"])
@pytest.mark.parametrize("routing", ["softmax_topk", "topk_softmax"])
@pytest.mark.parametrize("cls", [MoEBlock, StackedMoEBlock])
def test_block_matches_torch(cls, routing, norm, skew, check_against_torch):
    block = make_block(cls, routing, norm, skew)
    graph = from_torch(block, (torch.randn(5, H),))
    check_against_torch(block, graph, H)
    names = ops(graph)
    assert names.count("moe.experts") == 1
    if routing == "softmax_topk":
        assert names[:3] == ["core.linear", "core.softmax", "core.topk"]
        assert ("core.div" in names) == norm
    else:
        assert names[:3] == ["core.linear", "core.topk", "core.softmax"]
    assert "core.topk" in names and graph.find("core.topk")[0].attrs["k"] == K
    assert set(graph.params) >= {"gate.weight", "experts.w_gate", "experts.w_up",
                                 "experts.w_down"}
    assert graph.find("core.linear")[0].operands[1].name == "gate.weight"
    assert len(graph.find("core.linear")[0].operands) == (3 if skew else 2)


def test_skewed_router_sends_every_token_to_one_expert():
    block = make_block(MoEBlock, "softmax_topk", False, True)
    with torch.no_grad():
        ids = torch.topk(block.gate(torch.randn(256, H) * 3), K).indices
    assert bool((ids[:, 0] == 3).all())


@pytest.mark.parametrize("routing,stacked,skew", [
    ("softmax_topk", False, False), ("topk_softmax", False, True),
    ("softmax_topk", True, True), ("topk_softmax", True, False)])
def test_demo_model_matches_torch(routing, stacked, skew, check_against_torch):
    model, (x,) = demo_model(hidden=H, intermediate=I, experts=E, top_k=K, routing=routing,
                             norm_topk_prob=True, stacked=stacked)
    if skew:
        skew_router(model, expert=3)
    graph = from_torch(model, (x,))
    check_against_torch(model, graph, H)
    names = ops(graph)
    assert names.count("core.rmsnorm") == 2 and "core.rsqrt" not in names
    assert names.count("moe.experts") == 1
    assert {"input_norm.weight", "mixer.weight", "post_norm.weight", "mlp.gate.weight",
            "mlp.experts.w_gate", "mlp.experts.w_up", "mlp.experts.w_down"} | (
        {"mlp.gate.bias"} if skew else set()) == set(graph.params)
    locs = {n.op: n.loc for n in graph.nodes}
    assert locs["moe.experts"] == "mlp" and locs["core.linear"] in ("mixer", "mlp.gate")
    assert graph.find("core.rmsnorm")[0].loc == "input_norm"


def test_demo_model_default_size(check_against_torch):
    model, (x,) = demo_model()
    assert x.shape == (16, 256)
    graph = from_torch(model, (x,))
    check_against_torch(model, graph, 256, tokens=(0, 7, 64))


class Stack(nn.Module):
    """Two decoder layers in a ModuleList: names carry the layer index."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([DecoderLayer(H, I, E, K), DecoderLayer(H, I, 4, 1,
                                                                            stacked=True)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def test_nested_names_and_restore(check_against_torch):
    model = Stack().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    graph = from_torch(model, torch.randn(3, H), max_tokens=128)
    check_against_torch(model, graph, H)
    assert graph.dims["T"] == (0, 128)
    assert "layers.0.mlp.gate.weight" in graph.params
    assert graph.params["layers.1.mlp.experts.w_down"].shape == (4, H, I)
    assert [n.loc for n in graph.find("moe.experts")] == ["layers.0.mlp", "layers.1.mlp"]
    assert [n.attrs["k"] for n in graph.find("core.topk")] == [K, 1]
    # the module is handed back unchanged: blocks swapped back, router weights restored
    assert isinstance(model.layers[0].mlp, MoEBlock)
    assert isinstance(model.layers[1].mlp, StackedMoEBlock)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_find_moe_blocks_reads_attributes():
    model = Stack()
    specs = dict(find_moe_blocks(model))
    assert set(specs) == {"layers.0.mlp", "layers.1.mlp"}
    s = specs["layers.0.mlp"]
    assert (s.k, s.scoring, s.order, s.norm_topk, s.activation) == (
        K, "softmax", "score_topk", False, "silu")
    assert tuple(s.w_gate.shape) == (E, I, H) and tuple(s.w_down.shape) == (E, H, I)


def test_example_with_one_token_still_dynamic(check_against_torch):
    block = make_block(MoEBlock, "softmax_topk", True, False)
    graph = from_torch(block, torch.randn(1, H))
    assert str(graph.inputs[0].type) == "f32[T, 64]"
    check_against_torch(block, graph, H, tokens=(0, 9))


def test_exported_program_still_runs():
    """The custom op has an eager kernel, so the swapped module computes the same output."""
    from moec.frontend import MoECall

    block = make_block(StackedMoEBlock, "softmax_topk", True, True)
    ((_, spec),) = find_moe_blocks(block)
    x = torch.randn(11, H)
    with torch.no_grad():
        torch.testing.assert_close(MoECall(spec, block)(x), block(x), rtol=1e-4, atol=1e-5)
