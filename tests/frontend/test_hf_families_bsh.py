"""Hugging Face MoE blocks compiled from the `[batch, seq, hidden]` inputs they take: each
family's block traced from one `[2, 8, H]` example runs at other batch and sequence sizes
(`[1, 1, H]`, `[1, 37, H]`, `[3, 5, H]`, `[0, 4, H]`) and matches transformers' own output
(fp32, max relative error <= 1e-4), as IR (every family) and compiled for the CPU (a few
families by default, the rest marked slow). One trace and at most one compile per family
(module-scoped)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers", reason="transformers is a test extra: pip install -e .[test]")

from hf_families import FAMILIES, H, build, reference_bsh, skewed_tokens  # noqa: E402

from moec.frontend import from_torch  # noqa: E402
from moec.ir import interpret, parse, print_graph, verify  # noqa: E402

TOL = 1e-4
EXAMPLE = (2, 8)
SHAPES = ((1, 1), (1, 37), (3, 5), (0, 4))
MAX_TOKENS = 256


def max_rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    if ref.size == 0:
        return 0.0
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))


def reference(block: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    return reference_bsh(block, x).numpy()


def _inputs() -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(11)
    return [(f"[{b}, {s}, H]", torch.randn(b, s, H, generator=gen)) for b, s in SHAPES]


class _Blocks:
    """Per family: the block, its graph traced from a [2, 8, H] example, its compiled model."""

    def __init__(self) -> None:
        self.blocks: dict[str, torch.nn.Module] = {}
        self.graphs: dict[str, object] = {}
        self.models: dict[str, object] = {}

    def graph(self, family: str):
        if family not in self.graphs:
            self.blocks[family] = build(family)
            example = torch.randn(*EXAMPLE, H, generator=torch.Generator().manual_seed(3))
            self.graphs[family] = from_torch(self.blocks[family], (example,))
        return self.blocks[family], self.graphs[family]

    def model(self, family: str):
        import moec

        block, _ = self.graph(family)
        if family not in self.models:
            self.models[family] = moec.compile(block, (torch.randn(*EXAMPLE, H),),
                                               max_tokens=MAX_TOKENS).load_model()
        return block, self.models[family]


@pytest.fixture(scope="module")
def blocks() -> _Blocks:
    return _Blocks()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_graph_from_bsh_example_matches_transformers(family, blocks):
    """The IR keeps the example's rank with B and S symbolic (the MoE ops see the B*S
    tokens); it verifies, round-trips as text and reproduces the block at other B and S."""
    block, graph = blocks.graph(family)
    assert [str(v.type) for v in graph.inputs] == [f"f32[B, S, {H}]"]
    assert graph.dims == {"B": (0, 4096), "S": (0, 4096)}
    verify(graph)
    text = print_graph(graph)
    assert print_graph(parse(text)) == text
    for name, x in _inputs():
        ref = reference(block, x)
        (got, *_) = interpret(graph, [x.numpy()])
        assert got.shape == ref.shape, f"{family} {name}: {got.shape} != {ref.shape}"
        err = max_rel_err(got, ref)
        assert err <= TOL, f"{family} {name}: max relative error {err:.3g}"


_COMPILED_FAST = ("mixtral", "llama4", "switch_transformers")
COMPILED = [pytest.param(f, marks=() if f in _COMPILED_FAST else pytest.mark.slow)
            for f in FAMILIES]


@pytest.mark.parametrize("family", COMPILED)
def test_compiled_from_bsh_example_matches_transformers(family, blocks):
    """The artifact's signature says which dims are dynamic (B and S, and B*S bounded by
    max_tokens); it runs at other B and S, and an [S, H] call is one sequence."""
    block, model = blocks.model(family)
    sig = model.signature
    assert sig.inputs[0].shape == ("B", "S", H)
    assert {n: (d.min, d.max) for n, d in sig.dims.items()} == {"B": (0, MAX_TOKENS),
                                                                "S": (0, MAX_TOKENS)}
    assert [(lim.expr, lim.max) for lim in sig.limits] == [("B*S", MAX_TOKENS)]
    for name, x in _inputs():
        ref = reference(block, x)
        got = model(x)
        got = (got[0] if isinstance(got, tuple) else got).numpy()
        assert got.shape == ref.shape, f"{family} {name}: {got.shape} != {ref.shape}"
        err = max_rel_err(got, ref)
        assert err <= TOL, f"{family} compiled {name}: max relative error {err:.3g}"
    x = _inputs()[1][1]  # [1, 37, H]
    one = model(x[0].numpy())
    one = one[0] if isinstance(one, tuple) else one
    want = reference(block, x)
    assert one.shape == (want.shape[1:] if want.ndim == 3 else want.shape)
    assert max_rel_err(one.reshape(want.shape), want) <= TOL


def test_capacity_is_counted_per_sequence(blocks):
    """Switch Transformers counts expert capacity per sequence. Three sequences of 40 tokens
    that all prefer one expert (capacity 24): each sequence drops 16 tokens, where counting
    over the 120 tokens of the call would drop 96, which the check would catch."""
    from moec.frontend.moe_op import capacity_keep

    block, model = blocks.model("switch_transformers")
    _, graph = blocks.graph("switch_transformers")
    x = skewed_tokens(block, 120).reshape(3, 40, H)
    ids = block.router.classifier(x).argmax(-1, keepdim=True)
    per_seq = capacity_keep(ids, 8, 24)
    assert int((~per_seq).sum()) == 48 and int((~capacity_keep(ids.reshape(-1, 1), 8, 24)
                                                  ).sum()) == 96
    ref = reference(block, x)
    for stage, got in (("IR", interpret(graph, [x.numpy()])[0]), ("compiled", model(x).numpy())):
        err = max_rel_err(got, ref)
        assert err <= TOL, f"{stage}: max relative error {err:.3g}"
