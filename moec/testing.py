"""Helpers for testing passes and kernels: Before/Expected IR checks and numeric comparison."""

from __future__ import annotations

from moec.ir.graph import Graph
from moec.ir.parser import parse
from moec.ir.printer import print_graph
from moec.passes.base import Pass
from moec.passes.manager import PassManager


def run_pass(p: Pass, graph: Graph | str) -> Graph:
    """Run one pass (with verification) and return the graph."""
    g = parse(graph) if isinstance(graph, str) else graph
    return PassManager([p]).run(g)


def assert_ir_equal(graph: Graph, expected: str | Graph) -> None:
    """Compare two graphs as canonical text (values renumbered in order, locations dropped)."""
    exp = parse(expected) if isinstance(expected, str) else expected
    got_text = print_graph(graph, canonical=True, locs=False)
    exp_text = print_graph(exp, canonical=True, locs=False)
    if got_text != exp_text:
        import difflib

        diff = "\n".join(difflib.unified_diff(exp_text.splitlines(), got_text.splitlines(),
                                              "expected", "got", lineterm=""))
        raise AssertionError(f"IR differs:\n{diff}")
