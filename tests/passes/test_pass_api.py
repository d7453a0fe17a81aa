"""The public pass-writing API: plugins through the `moec.passes` entry-point group, pass objects
in moec.compile, and verifier messages that say what a broken pass did."""

import sys
import textwrap

import numpy as np
import pytest

import moec
from moec.errors import PassError
from moec.ir import parse
from moec.passes import PassManager, base, parse_pipeline


def test_entry_point_plugin_is_loaded(tmp_path, monkeypatch):
    pkg = tmp_path / "my_moec_plugin.py"
    pkg.write_text(textwrap.dedent('''
        from dataclasses import dataclass
        from typing import ClassVar
        from moec import Pass

        @dataclass(frozen=True)
        class CountNodes(Pass):
            """Record the node count in the pass context (changes nothing)."""
            name: ClassVar[str] = "count-nodes"
            def run(self, graph, ctx):
                ctx.stats["nodes"] = len(graph.nodes)
                return False
    '''))
    dist = tmp_path / "my_moec_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-moec-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[moec.passes]\ncount-nodes = my_moec_plugin:CountNodes\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(base, "_plugins_loaded", False)
    monkeypatch.delitem(base._REGISTRY, "count-nodes", raising=False)
    try:
        passes = parse_pipeline("canonicalize,+count-nodes")
        assert type(passes[-1]).__module__ == "my_moec_plugin"
        pm = PassManager(passes)
        pm.run(parse("dim T: 0..4\ninput %x: f32[T, 4]\n%y: f32[T, 4] = core.relu(%x)\n"
                      "output %y\n"))
        assert pm.ctx.stats["nodes"] == 1
    finally:
        base._REGISTRY.pop("count-nodes", None)
        sys.modules.pop("my_moec_plugin", None)


def test_compile_takes_pass_objects():
    from moec.models.reference import demo_model
    from moec.passes.reorder_dispatch import ReorderDispatch

    module, example = demo_model(seed=3, hidden=32, intermediate=48, experts=4, top_k=2)
    passes = [*parse_pipeline("default")]
    passes[2] = ReorderDispatch(block_m=8)  # an object with options, in place of the default
    art = moec.compile(module, example, passes=passes, max_tokens=32)
    assert "block_m=8" in art.ir_text and "reorder-dispatch{block_m=8}" in art.pipeline
    import torch

    x = torch.randn(5, 32)
    with torch.no_grad():
        want = module(x).numpy()
    np.testing.assert_allclose(art.load_model()(x.numpy()), want, rtol=1e-4, atol=1e-5)


def test_a_pass_that_breaks_types_is_named():
    from dataclasses import dataclass
    from typing import ClassVar

    from moec import Pass
    from moec.ir.types import Sym, TensorType

    @dataclass(frozen=True)
    class Breaker(Pass):
        name: ClassVar[str] = "breaker"

        def run(self, graph, ctx):
            graph.nodes[0].results[0].type = TensorType((Sym("T"), 5), "f32")
            return True

    g = parse("dim T: 0..4\ninput %x: f32[T, 4]\n%y: f32[T, 4] = core.relu(%x)\noutput %y\n")
    with pytest.raises(PassError, match=r"pass breaker left invalid IR: .*core.relu.*has type "
                                        r"f32\[T, 5\], but the operands give f32\[T, 4\]"):
        PassManager([Breaker()]).run(g)


def test_a_failing_pass_keeps_its_ir_only_when_asked(tmp_path, monkeypatch):
    """Every failing pass used to leave a tmp*_before_<pass>.ir file in the temporary folder;
    now only with MOEC_DEBUG >= 1, and in one folder (MOEC_DEBUG_DIR)."""
    import tempfile
    from dataclasses import dataclass
    from typing import ClassVar

    from moec import Pass
    from moec.errors import IRError

    @dataclass(frozen=True)
    class Failing(Pass):
        name: ClassVar[str] = "failing"

        def run(self, graph, ctx):
            raise IRError("no luck")

    text = "dim T: 0..4\ninput %x: f32[T, 4]\n%y: f32[T, 4] = core.relu(%x)\noutput %y\n"
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.delenv("MOEC_DEBUG", raising=False)
    monkeypatch.setenv("MOEC_DEBUG_DIR", str(tmp_path / "debug"))
    with pytest.raises(PassError, match="pass failing failed: no luck .*set MOEC_DEBUG=1 to keep"):
        PassManager([Failing()]).run(parse(text))
    assert list(tmp.iterdir()) == [] and not (tmp_path / "debug").exists()
    monkeypatch.setenv("MOEC_DEBUG", "1")
    with pytest.raises(PassError, match="IR before the pass: .*_before_failing.ir") as e:
        PassManager([Failing()]).run(parse(text))
    kept = list((tmp_path / "debug").iterdir())
    assert len(kept) == 1 and str(kept[0]) in str(e.value)
    assert "core.relu" in kept[0].read_text() and list(tmp.iterdir()) == []
