"""Pass lists that place a pass inside a pipeline (`@after:` / `@before:`, in strings, lists and
`insert_pass`), `moec passes` (-v, NAME, origins, first sentences), `moec opt --stats`, statistics
in the timing table, and `python -m moec`."""

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
    PassTiming,
    PrintStats,
    get_pass,
    insert_pass,
    parse_pipeline,
)
from moec.passes.cap_topk import CapTopK
from moec.passes.fuse_gating import FuseGating

ROOT = Path(__file__).parents[2]
DEFAULT = ["canonicalize", "fuse-gating", "reorder-dispatch", "tile-expert-gemm", "fuse-combine",
           "fuse-rope", "canonicalize"]


def names(spec) -> list[str]:
    return [p.spec() for p in parse_pipeline(spec)]


def test_place_a_pass_after_or_before_a_named_one():
    assert names("default,cap-topk{k=1}@after:fuse-gating") == [
        "canonicalize", "fuse-gating", "cap-topk", "reorder-dispatch", *DEFAULT[3:]]
    assert names("default, cap-topk{k=1,renormalize=false} @before:reorder-dispatch")[2] == \
        "cap-topk{renormalize=false}"
    # canonicalize occurs twice: say which
    assert names("default,cap-topk@after:canonicalize#2")[-1] == "cap-topk"
    assert names("default,cap-topk@before:canonicalize#1")[0] == "cap-topk"
    # as list items and Python objects
    assert [p.name for p in parse_pipeline(["default", "cap-topk@after:fuse-gating"])][2] == \
        "cap-topk"
    passes = insert_pass(parse_pipeline("default"), CapTopK(k=1), after="fuse-gating")
    assert [p.name for p in passes][1:4] == ["fuse-gating", "cap-topk", "reorder-dispatch"]


@pytest.mark.parametrize("spec, message", [
    ("default,cap-topk@after:canonicalize", r"canonicalize occurs 2 times; write "
                                            r"@after:canonicalize#1 .. #2"),
    ("cap-topk@after:fuse-gating,default", r"no pass fuse-gating among the passes listed before "
                                           r"it \(none\)"),
    ("default,cap-topk@after:canonicalize#3", r"canonicalize occurs 2 time\(s\)"),
    ("default,cap-topk@after:fuse-gatin", r"no pass fuse-gatin among"),
    ("default@after:canonicalize", r"a named pipeline cannot be placed"),
    ("default,cap-topk@inside:fuse-gating", r"cannot parse pass list"),
])
def test_placement_errors(spec, message):
    with pytest.raises(PassError, match=message):
        parse_pipeline(spec)


def test_insert_pass_needs_one_anchor():
    with pytest.raises(PassError, match="exactly one of after= and before="):
        insert_pass([], CapTopK())


def test_doc_line_is_the_whole_first_sentence():
    assert FuseGating.doc_line() == ("Fuse router linear + softmax/sigmoid + top-k/selection + "
                                     "renormalisation + scaling into one moe.router op.")
    assert get_pass("cap-topk").doc_line().startswith("Dynamic gating: cap the experts per token "
                                                      "at k (keep each router's k best, ")
    assert CapTopK.option_table() == [("k", "int", 1), ("renormalize", "bool", True)]


ROUTER_IR = textwrap.dedent("""
    dim T: 0..64
    input %x: f32[T, 16]
    param @r: f32[4, 16]
    param @wg: f32[4, 8, 16]
    param @wu: f32[4, 8, 16]
    param @wd: f32[4, 16, 8]
    %l: f32[T, 4] = core.linear(%x, @r)
    %p: f32[T, 4] = core.softmax(%l) {axis=-1}
    %v: f32[T, 2], %i: i32[T, 2] = core.topk(%p) {k=2}
    %y: f32[T, 16] = moe.experts(%x, %v, %i, @wg, @wu, @wd)
    output %y
""")


def test_statistics_in_the_timing_table_and_print_stats(capsys):
    timing = PassTiming()
    PassManager(parse_pipeline("default,cap-topk@after:fuse-gating"),
                [timing, PrintStats(sys.stdout)]).run(parse(ROUTER_IR))
    report = timing.report()
    assert report.splitlines()[-2:] == ["statistics:",
                                        f"  {'cap-topk':<30} cap-topk.capped = 1"]
    assert "cap-topk.capped = 1" in capsys.readouterr().out


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "moec", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "TVM_NUM_THREADS": "2"})


def test_python_m_moec_passes_verbose_and_one_pass(tmp_path):
    out = cli("passes", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stdout.splitlines() if x.startswith("fuse-gating "))
    assert line.endswith("into one moe.router op.")  # the sentence, across its two lines
    assert "reorder-dispatch" in out.stdout and "block_m: int" not in out.stdout
    out = cli("passes", "-v", cwd=tmp_path)
    assert "block_m: int = 32" in out.stdout and "renormalize: bool = true" in out.stdout
    out = cli("passes", "cap-topk", cwd=tmp_path)
    assert out.returncode == 0 and "cap-topk  (built-in: moec.passes.cap_topk.CapTopK)" in \
        out.stdout
    assert "Run after fuse-gating" in out.stdout  # the pass file's docstring
    assert "k                int            default 1" in out.stdout
    out = cli("passes", "cap-topc", cwd=tmp_path)
    assert out.returncode == 1 and "did you mean cap-topk" in out.stderr


def test_moec_opt_places_a_pass_and_prints_statistics(tmp_path):
    (tmp_path / "in.ir").write_text(ROUTER_IR)
    out = cli("opt", "in.ir", "-p", "canonicalize,fuse-gating,reorder-dispatch,"
              "cap-topk{k=1}@after:fuse-gating", "--stats", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "k=1" in out.stdout and "moe.align" in out.stdout and "core.slice" in out.stdout
    assert "cap-topk.capped = 1" in out.stderr
    out = cli("opt", "in.ir", "-p", "cap-topk{k=one}", cwd=tmp_path)
    assert out.returncode == 1 and "options: k: int = 1" in out.stderr
