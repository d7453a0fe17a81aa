"""Helpers for the frontend tests: compare the IR interpreter with torch eager."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

from moec.ir import Graph, interpret, parse, print_graph, verify

TOKENS = (0, 1, 7, 64)


def max_rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    if ref.size == 0:
        return 0.0
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))


@pytest.fixture
def check_against_torch() -> Callable[..., None]:
    """check(module, graph, hidden): the graph verifies and round-trips as text, and
    interpret(graph) == module(x) (fp32, max rel err <= 1e-4) for T in 0, 1, 7, 64."""

    def check(module: nn.Module, graph: Graph, hidden: int, tokens: tuple[int, ...] = TOKENS,
              tol: float = 1e-4) -> None:
        verify(graph)
        text = print_graph(graph)
        assert print_graph(parse(text)) == text  # the frontend's IR round-trips as text
        gen = torch.Generator().manual_seed(7)
        for t in tokens:
            x = torch.randn(t, hidden, generator=gen)
            with torch.no_grad():
                ref = module(x)
            ref = (ref[0] if isinstance(ref, tuple) else ref).numpy()
            (got,) = interpret(graph, [x.numpy()])
            assert got.shape == ref.shape, (t, got.shape, ref.shape)
            err = max_rel_err(got, ref)
            assert err <= tol, f"T={t}: max relative error {err:.3g} > {tol}"

    return check
