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


# --------------------------------------------------------------------------- dynamic dims


class PositionalMoE(nn.Module):
    """x [B, 6, H] plus a learned table of 6 positions, then an MoE block on the B*6 tokens:
    the sequence dim must stay static, which the default guess (B and S dynamic) gets wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(6, H) * 0.1)
        self.moe = make_block(MoEBlock, "softmax_topk", True, False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.moe((x + self.pos).reshape(-1, H)).reshape(x.shape)


def _check(module: nn.Module, graph, shapes) -> None:
    from moec.ir import interpret, verify

    verify(graph)
    for shape in shapes:
        x = torch.randn(*shape)
        with torch.no_grad():
            want = module(x).numpy()
        got = interpret(graph, [x.numpy()])[0]
        assert got.shape == want.shape
        assert float(abs(got - want).max()) <= 1e-4 * max(float(abs(want).max()), 1e-30)


def test_bsh_example_makes_batch_and_sequence_dynamic():
    block = make_block(MoEBlock, "softmax_topk", True, False)

    class Wrapped(nn.Module):  # a user model holding [B, S, H] activations
        def __init__(self) -> None:
            super().__init__()
            self.block = block

        def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
            return self.block(x.reshape(-1, H)).reshape(x.shape) * torch.sigmoid(gate)

    model = Wrapped().eval()
    graph = from_torch(model, (torch.randn(2, 8, H), torch.randn(2, 8, H)), max_tokens=100)
    assert [str(v.type) for v in graph.inputs] == ["f32[B, S, 64]", "f32[B, S, 64]"]
    assert graph.dims == {"B": (0, 100), "S": (0, 100)}
    from moec.ir import interpret

    for b, s in ((1, 1), (3, 5), (0, 4), (2, 0)):
        x, g = torch.randn(b, s, H), torch.randn(b, s, H)
        with torch.no_grad():
            want = model(x, g).numpy()
        got = interpret(graph, [x.numpy(), g.numpy()])[0]
        assert got.shape == want.shape
        assert float(abs(got - want).max(initial=0)) <= 1e-4 * max(float(abs(want).max(
            initial=0)), 1e-30)


def test_dynamic_dims_states_what_the_guess_gets_wrong():
    from moec.errors import UnsupportedError

    model = PositionalMoE().eval()
    with pytest.raises(UnsupportedError, match="(?s)Constraints violated.*input 0 axis 1 = S.*dynamic_dims="):
        from_torch(model, (torch.randn(2, 6, H),))
    for dims in ({"x": {0: "B"}}, {0: {0: "B"}}, {0: {0: ("B", 1, 8)}}):
        graph = from_torch(model, (torch.randn(2, 6, H),), dynamic_dims=dims)
        assert str(graph.inputs[0].type) == "f32[B, 6, 64]"
        assert graph.dims == {"B": (1, 8) if isinstance(dims[0 if 0 in dims else "x"][0],
                                                        tuple) else (0, 4096)}
        _check(model, graph, [(1, 6, H), (3, 6, H)])
    # an example with B=1 (which export would take for a constant) is widened, not fixed
    graph = from_torch(model, (torch.randn(1, 6, H),), dynamic_dims={"x": {0: "N"}})
    assert str(graph.inputs[0].type) == "f32[N, 6, 64]"
    _check(model, graph, [(4, 6, H)])


@pytest.mark.parametrize("dims,match", [
    ({"y": {0: "B"}}, "names input 'y'"),
    ({3: {0: "B"}}, "names input 3"),
    ({0: {5: "B"}}, "axis 5 is not an axis"),
    ({0: {0: "not a name"}}, "want a dim name"),
    ({0: {0: ("B", 1, 8), 1: ("B", 0, 8)}}, "two ranges"),
])
def test_dynamic_dims_errors_name_the_input(dims, match):
    from moec.errors import UnsupportedError

    with pytest.raises(UnsupportedError, match=match):
        from_torch(PositionalMoE().eval(), (torch.randn(2, 6, H),), dynamic_dims=dims)


def test_static_example_input():
    """dynamic_dims None for an input keeps all of its dims: the graph is fixed to them."""
    block = make_block(MoEBlock, "softmax_topk", True, False)
    graph = from_torch(block, (torch.randn(5, H),), dynamic_dims={0: None})
    assert str(graph.inputs[0].type) == "f32[5, 64]" and graph.dims == {}
    _check(block, graph, [(5, H)])
