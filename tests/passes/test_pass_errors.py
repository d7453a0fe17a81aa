"""Errors a pass author meets, each naming the pass (or op) and saying what to do: exceptions
escaping a pass, attribute mistakes in `rw.create`, a pass that changes the IR but returns False,
option mistakes in pass strings and in Python, and checked patterns (`P.op`, `single_use`)."""

import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import pytest

from moec import P, Pass
from moec.errors import IRError, PassError
from moec.ir import parse
from moec.ir.builder import make_node
from moec.passes import PassManager, Rewriter, match, parse_pipeline
from moec.passes.cap_topk import CapTopK

TEXT = """
dim T: 0..8
input %x: f32[T, 16]
param @r: f32[4, 16]
%w: f32[T, 2], %i: i32[T, 2] = moe.router(%x, @r) {k=2}
%n: f32[T, 16] = core.neg(%x)
output %n, %w, %i
"""


@pytest.fixture(autouse=True)
def keep_ir(monkeypatch, tmp_path):
    """The IR before a failing pass is kept only when asked (MOEC_DEBUG >= 1), in
    MOEC_DEBUG_DIR: these tests read it."""
    monkeypatch.setenv("MOEC_DEBUG", "1")
    monkeypatch.setenv("MOEC_DEBUG_DIR", str(tmp_path))


def _dumped(msg: str) -> str:
    return Path(re.search(r"IR before the pass: (\S+)\)", msg).group(1)).read_text()


def test_any_exception_in_a_pass_names_it_with_the_ir_before():
    @dataclass(frozen=True)
    class ReadsTopK(Pass):
        name: ClassVar[str] = "reads-top-k"

        def run(self, graph, ctx):
            return graph.find("moe.router")[0].attrs["top_k"] > 1  # the attribute is `k`

    with pytest.raises(PassError) as e:
        PassManager([ReadsTopK()]).run(parse(TEXT))
    msg = str(e.value)
    assert msg.startswith("pass reads-top-k failed: KeyError: 'top_k' (at test_pass_errors.py:")
    assert "in run)" in msg and "moe.router(%x, @r)" in _dumped(msg)
    assert isinstance(e.value.__cause__, KeyError)


def test_attribute_mistakes_in_create_are_ir_errors_naming_the_op():
    g = parse(TEXT)
    x, r = g.inputs[0], g.params["r"]
    with pytest.raises(IRError, match=r"moe.router: attribute k='1' is str, want int|"
                                      r"moe.router: cannot infer"):
        Rewriter(g).create("moe.router", [x, r], {"k": "1"})
    with pytest.raises(IRError, match=r"moe.router: attribute norm_topk=1 is int, want bool"):
        make_node(g, "moe.router", [x, r], {"k": 1, "norm_topk": 1}, loc="layers.0.mlp")
    with pytest.raises(IRError, match=r"moe.router: attribute scale='2' is str, want float"):
        make_node(g, "moe.router", [x, r], {"k": 1, "scale": "2"}, loc=None)
    with pytest.raises(IRError, match=r"core.topk: cannot infer result types from attributes "
                                      r"\{'k': '1'\}: TypeError: .* \(at layers.0.mlp\)"):
        make_node(g, "core.topk", [x], {"k": "1"}, loc="layers.0.mlp")

    @dataclass(frozen=True)
    class BadCreate(Pass):
        name: ClassVar[str] = "bad-create"

        def run(self, graph, ctx):
            Rewriter(graph).create("core.topk", [graph.inputs[0]], {"k": 1.5})
            return True

    with pytest.raises(PassError, match=r"pass bad-create failed: core.topk: bad dim 1.5 in "
                                        r"shape .* \(at test_pass_errors.py:\d+ in run\)"):
        PassManager([BadCreate()]).run(parse(TEXT))


def test_a_pass_that_changes_the_ir_but_returns_false_is_named():
    @dataclass(frozen=True)
    class Sneaky(Pass):
        name: ClassVar[str] = "sneaky"

        def run(self, graph, ctx):
            rw = Rewriter(graph)
            neg = graph.find("core.neg")[0]
            rw.replace_op(neg, [rw.create("core.relu", [neg.operands[0]], before=neg).result])
            return False

    with pytest.raises(PassError, match=r"pass sneaky returned False but changed the IR; `run` "
                                        r"must return True") as e:
        PassManager([Sneaky()]).run(parse(TEXT))
    assert "core.neg" in _dumped(str(e.value))
    # an honest pass that changes nothing passes
    PassManager([*parse_pipeline("canonicalize,fuse-gating")]).run(parse(TEXT))


def test_option_mistakes_list_the_options():
    with pytest.raises(PassError, match=r"bad options for pass cap-topk: no option kk; did you "
                                        r"mean k\? its options: k: int = 1, renormalize: bool = "
                                        r"True"):
        parse_pipeline("cap-topk{kk=1}")
    with pytest.raises(PassError, match=r"cap-topk: k='1' is not int \(options: k: int = 1"):
        CapTopK(k="1")  # built in Python: checked as the string form is
    with pytest.raises(PassError, match=r"renormalize=1 is not bool"):
        CapTopK(renormalize=1)
    with pytest.raises(PassError, match=r"k=x is not int|k='x' is not int"):
        parse_pipeline("cap-topk{k=x}")
    with pytest.raises(PassError, match="must be key=value"):
        parse_pipeline("cap-topk{k}")

    @dataclass(frozen=True)
    class Typed(Pass):
        name: ClassVar[str] = "typed"
        mode: Literal["a", "b"] = "a"
        limit: int | None = None

        def run(self, graph, ctx):
            return False

    Typed(mode="b", limit=3)
    Typed(limit=None)
    with pytest.raises(PassError, match=r"mode='c' is not Literal\['a', 'b'\]"):
        Typed(mode="c")
    with pytest.raises(PassError, match=r"limit=2.5 is not int \| None"):
        Typed(limit=2.5)


def test_p_op_checks_op_names_and_attribute_keys():
    with pytest.raises(PassError, match=r"P.op: unknown op 'core.scal'; did you mean core.scale"):
        P.op("core.scal", P.any("x"))
    with pytest.raises(PassError, match=r"P.op\('core.topk'\): attribute\(s\) 'kk' not known to "
                                        r"core.topk; did you mean k\? its attributes: k"):
        P.op("core.topk", attrs={"kk": 2})
    with pytest.raises(PassError, match=r"'moe.select'\): attribute\(s\) 'scoring' not known"):
        P.op(("moe.router", "moe.select"), attrs={"scoring": "softmax"})
    with pytest.raises(PassError, match="P.rest\\(\\) must be the last"):
        P.op("core.add", P.rest(), P.any())
    with pytest.raises(PassError, match="operand pattern 0 is 'x'"):
        P.op("core.neg", "x")
    assert P.op(("core.softmax", "core.sigmoid"), P.any("x")).op == ("core.softmax",
                                                                       "core.sigmoid")


def test_single_use_does_not_match_a_value_that_is_also_a_graph_output():
    pat = P.op("core.relu", P.op("core.neg", P.any("x"), name="n", single_use=True))
    inner = """
    dim T: 0..8
    input %x: f32[T, 4]
    %n: f32[T, 4] = core.neg(%x)
    %y: f32[T, 4] = core.relu(%n)
    """
    g = parse(inner + "output %y\n")
    assert match(pat, g.find("core.relu")[0])["n.node"].op == "core.neg"
    g = parse(inner + "output %y, %n\n")  # %n is used once, and is an output
    assert match(pat, g.find("core.relu")[0]) is None
    g = parse(inner + "%z: f32[T, 4] = core.add(%n, %y)\noutput %z\n")  # two uses
    assert match(pat, g.find("core.relu")[0]) is None
