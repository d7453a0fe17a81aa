"""fuse-rope: Before/Expected IR for both spellings of the rotary embedding, the cases it must
leave alone, and the numbers of a fused graph against the unfused one (interpreter)."""

from __future__ import annotations

import numpy as np

from moec.ir import interpret, parse
from moec.passes.canonicalize import Canonicalize
from moec.passes.fuse_rope import FuseRope
from moec.testing import assert_ir_equal, run_pass

HEAD = """
dim T: 0..4096
input %x: f32[1, 4, T, 16]
input %cos: f32[1, 1, T, 16]
input %sin: f32[1, 1, T, 16]
"""
ROTATE_HALF = """
  %a: f32[1, 4, T, 16] = core.mul(%x, %cos)
  %x1: f32[1, 4, T, 8] = core.slice(%x) {axis=3, start=0, stop=8}
  %x2: f32[1, 4, T, 8] = core.slice(%x) {axis=3, start=8}
  %n: f32[1, 4, T, 8] = core.neg(%x2)
  %r: f32[1, 4, T, 16] = core.concat(%n, %x1) {axis=3}
  %b: f32[1, 4, T, 16] = core.mul(%r, %sin)
  %y: f32[1, 4, T, 16] = core.add(%a, %b)
  output %y
"""


def _fused(text: str) -> str:
    return str(run_pass(Canonicalize(), run_pass(FuseRope(), parse(text))))


def test_rotate_half():
    assert_ir_equal(run_pass(Canonicalize(), run_pass(FuseRope(), parse(HEAD + ROTATE_HALF))),
                    HEAD + """
      %y: f32[1, 4, T, 16] = core.rope(%x, %cos, %sin)
      output %y
    """)


def test_split_halves_with_half_tables():
    head = """
    dim T: 0..4096
    input %x: f32[T, 2, 8]
    input %c: f32[T, 1, 4]
    input %s: f32[T, 1, 4]
    """
    before = parse(head + """
      %x1: f32[T, 2, 4] = core.slice(%x) {axis=2, start=0, stop=4}
      %x2: f32[T, 2, 4] = core.slice(%x) {axis=2, start=4}
      %p: f32[T, 2, 4] = core.mul(%x1, %c)
      %q: f32[T, 2, 4] = core.mul(%x2, %s)
      %o1: f32[T, 2, 4] = core.sub(%p, %q)
      %u: f32[T, 2, 4] = core.mul(%x2, %c)
      %v: f32[T, 2, 4] = core.mul(%x1, %s)
      %o2: f32[T, 2, 4] = core.add(%u, %v)
      %y: f32[T, 2, 8] = core.concat(%o1, %o2) {axis=2}
      output %y
    """)
    after = run_pass(Canonicalize(), run_pass(FuseRope(), before))
    assert_ir_equal(after, head + """
      %y: f32[T, 2, 8] = core.rope(%x, %c, %s)
      output %y
    """)
    rng = np.random.default_rng(0)
    args = [rng.standard_normal(s).astype(np.float32) for s in ((5, 2, 8), (5, 1, 4), (5, 1, 4))]
    np.testing.assert_allclose(interpret(after, args)[0], interpret(before, args)[0], rtol=1e-6,
                               atol=1e-6)


def test_not_a_rotation_is_left_alone():
    # the halves swapped the other way round (concat(x1, -x2)) is not rotate_half
    wrong = ROTATE_HALF.replace("core.concat(%n, %x1)", "core.concat(%x1, %n)")
    assert "core.rope" not in _fused(HEAD + wrong)
    # slices that are not the two halves
    odd = ROTATE_HALF.replace("{axis=3, start=8}", "{axis=3, start=7, stop=15}")
    assert "core.rope" not in _fused(HEAD + odd)
    # tables that would broadcast x to a larger shape
    big = HEAD.replace("%cos: f32[1, 1, T, 16]", "%cos: f32[2, 4, T, 16]")
    assert "core.rope" not in _fused(big + ROTATE_HALF.replace(
        "%a: f32[1, 4, T, 16] = core.mul", "%a: f32[2, 4, T, 16] = core.mul").replace(
        "%y: f32[1, 4, T, 16] = core.add", "%y: f32[2, 4, T, 16] = core.add"))


def test_fused_numbers_match():
    before = parse(HEAD + ROTATE_HALF)
    after = run_pass(Canonicalize(), run_pass(FuseRope(), parse(HEAD + ROTATE_HALF)))
    rng = np.random.default_rng(1)
    for t in (0, 1, 7):
        args = [rng.standard_normal(s).astype(np.float32)
                for s in ((1, 4, t, 16), (1, 1, t, 16), (1, 1, t, 16))]
        np.testing.assert_allclose(interpret(after, args)[0], interpret(before, args)[0],
                                   rtol=1e-6, atol=1e-6)
