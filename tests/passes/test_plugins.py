"""Plugins through the `moec.passes` entry-point group, from a fake installed distribution (a
*.dist-info folder on sys.path, which importlib.metadata reads like any installed package): a
good plugin, a broken one, one colliding with a built-in, a non-Pass entry point, a key that
differs from the pass name, and an explicit override. A failing plugin is reported once, naming
the distribution and the entry point, and the rest of moec works."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from moec.errors import PassError
from moec.ir import parse
from moec.passes import (
    PassManager,
    base,
    get_pass,
    parse_pipeline,
    pass_origin,
    plugin_problems,
    register_pass,
    registered_passes,
    reload_plugins,
)
from moec.passes.canonicalize import Canonicalize
from moec.passes.fuse_combine import FuseCombine

ROOT = Path(__file__).parents[2]

PLUGIN = '''
from dataclasses import dataclass
from typing import ClassVar

from moec import Pass


@dataclass(frozen=True)
class CountOps(Pass):
    """Count the nodes of each op (an analysis: changes nothing)."""

    name: ClassVar[str] = "count-ops"
    prefix: str = ""

    def run(self, graph, ctx):
        for n in graph.nodes:
            if n.op.startswith(self.prefix):
                ctx.stats[f"count-ops.{n.op}"] = ctx.stats.get(f"count-ops.{n.op}", 0) + 1
        return False


@dataclass(frozen=True)
class MyCanonicalize(Pass):
    """A plugin's own canonicalize (collides with the built-in)."""

    name: ClassVar[str] = "canonicalize"

    def run(self, graph, ctx):
        return False


@dataclass(frozen=True)
class KeyedPass(Pass):
    """Registered under a key that is not its name."""

    name: ClassVar[str] = "keyed-pass"

    def run(self, graph, ctx):
        return False


def helper(graph):
    return graph
'''

ENTRY_POINTS = """[moec.passes]
count-ops = moec_test_plugin:CountOps
missing = moec_test_plugin:Missing
canonicalize = moec_test_plugin:MyCanonicalize
helper = moec_test_plugin:helper
keyed = moec_test_plugin:KeyedPass
broken-import = moec_test_plugin_broken:Thing
"""

OVERRIDE = '''
from dataclasses import dataclass
from typing import ClassVar

from moec import Pass, register_pass


@register_pass(override=True)
@dataclass(frozen=True)
class QuietFuseCombine(Pass):
    """Replaces the built-in fuse-combine on purpose."""

    name: ClassVar[str] = "fuse-combine"

    def run(self, graph, ctx):
        return False
'''


def write_dist(root: Path, name: str, modules: dict[str, str], entry_points: str) -> None:
    for mod, text in modules.items():
        (root / f"{mod}.py").write_text(textwrap.dedent(text))
    info = root / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points)


@pytest.fixture
def site(tmp_path):
    """A folder on sys.path holding fake distributions; plugins reloaded before and after."""
    sys.path.insert(0, str(tmp_path))
    yield tmp_path
    sys.path.remove(str(tmp_path))
    for mod in [m for m in sys.modules if m.startswith("moec_test_plugin")]:
        del sys.modules[mod]
    reload_plugins()
    assert get_pass("canonicalize") is Canonicalize and get_pass("fuse-combine") is FuseCombine
    assert "count-ops" not in registered_passes()


def test_good_broken_colliding_and_non_pass_plugins(site, capsys):
    write_dist(site, "moec-test-plugin", {
        "moec_test_plugin": PLUGIN,
        "moec_test_plugin_broken": "raise ImportError('needs a library that is not installed')",
    }, ENTRY_POINTS)
    reload_plugins()
    err = capsys.readouterr().err
    problems = plugin_problems()
    assert len(problems) == 5, problems
    assert err.count("moec: warning: plugin moec-test-plugin 0.1, entry point `") == 5, err
    by_key = {p.split("entry point `")[1].split(" =")[0]: p for p in problems}
    assert "AttributeError" in by_key["missing"] and "Missing" in by_key["missing"]
    assert "ImportError: needs a library" in by_key["broken-import"]
    assert "already taken" in by_key["canonicalize"] and "override=True" in by_key["canonicalize"]
    assert "is a function, not a subclass of moec.Pass" in by_key["helper"]
    assert "key 'keyed' differs from the pass's name 'keyed-pass'" in by_key["keyed"]

    # the good plugin works, the built-ins are untouched, and nothing is reported twice
    passes = registered_passes()
    assert passes["count-ops"].__module__ == "moec_test_plugin"
    assert pass_origin("count-ops") == "plugin moec-test-plugin 0.1"
    assert passes["canonicalize"] is Canonicalize and pass_origin("canonicalize") == "built-in"
    assert "keyed-pass" in passes and "helper" not in passes and "missing" not in passes
    pm = PassManager(parse_pipeline("canonicalize,count-ops{prefix=core.}"))
    pm.run(parse("dim T: 0..4\ninput %x: f32[T, 4]\n%y: f32[T, 4] = core.relu(%x)\n"
                  "%z: f32[T, 4] = core.relu(%y)\noutput %z\n"))
    assert pm.ctx.stats == {"count-ops.core.relu": 2}
    assert capsys.readouterr().err == ""
    with pytest.raises(PassError, match=r"unknown pass 'missing'.*5 plugin\(s\) failed"):
        get_pass("missing")


def test_a_fixed_plugin_loads_on_reload(site, capsys):
    """A plugin that failed is retried by reload_plugins (after it was fixed)."""
    write_dist(site, "moec-test-plugin", {"moec_test_plugin": PLUGIN},
               "[moec.passes]\ncount-ops = moec_test_plugin:Counter\n")
    reload_plugins()
    assert len(plugin_problems()) == 1 and "count-ops" not in registered_passes()
    assert "no attribute 'Counter'" in capsys.readouterr().err
    (site / "moec_test_plugin.py").write_text(textwrap.dedent(PLUGIN) + "\nCounter = CountOps\n")
    del sys.modules["moec_test_plugin"]
    reload_plugins()
    assert plugin_problems() == [] and "count-ops" in registered_passes()
    assert capsys.readouterr().err == ""


def test_override_must_be_explicit(site):
    write_dist(site, "moec-test-plugin-override", {"moec_test_plugin_override": OVERRIDE},
               "[moec.passes]\nfuse-combine = moec_test_plugin_override:QuietFuseCombine\n")
    reload_plugins()
    assert plugin_problems() == []
    assert get_pass("fuse-combine").__name__ == "QuietFuseCombine"
    assert pass_origin("fuse-combine").startswith("plugin moec-test-plugin-override 0.1, "
                                                  "overrides built-in")
    # in the default pipeline too: that is what override=True is for
    assert [type(p).__name__ for p in parse_pipeline("default")][4] == "QuietFuseCombine"


def test_register_pass_refuses_a_taken_name():
    from dataclasses import dataclass
    from typing import ClassVar

    from moec import Pass

    @dataclass(frozen=True)
    class Mine(Pass):
        name: ClassVar[str] = "fuse-gating"

        def run(self, graph, ctx):
            return False

    with pytest.raises(PassError, match=r"'fuse-gating' of .*Mine is already taken by "
                                        r"moec.passes.fuse_gating.FuseGating \(built-in\)"):
        register_pass(Mine)
    with pytest.raises(PassError, match="not a subclass of moec.Pass"):
        register_pass(len)
    assert get_pass("fuse-gating").__name__ == "FuseGating"
    assert register_pass(get_pass("fuse-gating")) is get_pass("fuse-gating")  # again: allowed
    assert base._ORIGIN["fuse-gating"] == "built-in"


def test_cli_lists_plugins_and_keeps_working(site):
    """`python -m moec passes` with the broken plugins installed: exit 0, one warning per
    failing entry point, the good plugin listed with its origin; `moec opt` runs it."""
    write_dist(site, "moec-test-plugin", {"moec_test_plugin": PLUGIN}, ENTRY_POINTS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "moec", *args], cwd=site, env=env,
                              capture_output=True, text=True, timeout=300)

    out = cli("passes")
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("moec: warning: plugin moec-test-plugin 0.1") == 5, out.stderr
    assert "count-ops" in out.stdout and "[plugin moec-test-plugin 0.1]" in out.stdout
    assert "plugins that failed to load:" in out.stdout
    (site / "in.ir").write_text("dim T: 0..4\ninput %x: f32[T, 4]\n%y: f32[T, 4] = core.relu(%x)"
                                "\noutput %y\n")
    out = cli("opt", "in.ir", "-p", "count-ops", "--stats")
    assert out.returncode == 0, out.stderr
    assert "count-ops.core.relu = 1" in out.stderr and "core.relu(%x)" in out.stdout
