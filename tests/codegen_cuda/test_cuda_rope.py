"""The CUDA rope kernel (moec/codegen/cuda/rope.py): its te definition built for the CPU, and
its generated CUDA run by the emulator, against the reference (fp32 2e-5, fp16 1e-2)."""

from __future__ import annotations

import numpy as np
import pytest

from moec.codegen.cuda import rope as R
from moec.ir.nn_ops import rope_ref

from .emulator import emulate
from .test_cuda_definitions import cpu_run
from .test_cuda_emulated import NP

TOL = {"float32": 2e-5, "float16": 1e-2}
CASES = [((1, 4, "T", 16), (1, 1, "T", 16)), (("T", 2, 12), ("T", 1, 6))]


def _inputs(xs, cs, t, dtype):
    rng = np.random.default_rng(t)
    sx = tuple(t if d == "T" else d for d in xs)
    sc = tuple(t if d == "T" else d for d in cs)
    return [rng.standard_normal(s).astype(NP[dtype]) for s in (sx, sc, sc)]


@pytest.mark.parametrize("xs,cs", CASES)
@pytest.mark.parametrize("t", [0, 1, 5])
def test_rope_definition(xs, cs, t):
    x, c, s = _inputs(xs, cs, t, "float32")
    (got,) = cpu_run(R.define_rope(xs, cs, "float32"), [x, c, s], [(x.shape, "float32")])
    np.testing.assert_allclose(got, rope_ref(x, c, s), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_rope_emulated(tmp_path, dtype):
    ks = []
    for i, (xs, cs) in enumerate(CASES):
        k = R.rope(xs, cs, dtype)
        ks.append(type(k)(k.func.with_attr("global_symbol", f"rope{i}_{dtype}"), f"rope{i}_{dtype}", {}))
    em = emulate(ks, tmp_path)
    for i, (xs, cs) in enumerate(CASES):
        for t in (0, 1, 5):
            x, c, s = _inputs(xs, cs, t, dtype)
            got = np.zeros_like(x)
            em[f"rope{i}_{dtype}"](x, c, s, got)
            want = rope_ref(x.astype(np.float32), c.astype(np.float32), s.astype(np.float32))
            np.testing.assert_allclose(got.astype(np.float32), want, rtol=TOL[dtype],
                                       atol=TOL[dtype])


def test_linear_heads_definition_and_emulated(tmp_path):
    from moec.ir.nn_ops import linear_heads_ref

    rng = np.random.default_rng(2)
    w = rng.standard_normal((4, 12, 8)).astype(np.float32)
    k = R.linear_heads((1, "T"), 4, 12, 8)
    em = emulate([k], tmp_path)
    for t in (0, 1, 5):
        x = rng.standard_normal((1, t, 4, 8)).astype(np.float32)
        (got,) = cpu_run(R.define_linear_heads((1, "T"), 4, 12, 8), [x, w],
                         [((1, t, 4, 12), "float32")])
        np.testing.assert_allclose(got, linear_heads_ref(x, w), rtol=2e-5, atol=2e-5)
        out = np.zeros((1, t, 4, 12), np.float32)
        em[k.name](x, w, out)
        np.testing.assert_allclose(out, linear_heads_ref(x, w), rtol=2e-5, atol=2e-5)
