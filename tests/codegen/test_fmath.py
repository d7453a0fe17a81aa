"""Accuracy of the vectorised float32 math (moec/codegen/kernels/fmath.py) against float64,
on a dense grid over the whole useful range, plus the special values (inf, nan, underflow).

Bounds: relative error <= 5e-7 (about 4 ulp) where the true value is above 1e-30 in magnitude,
absolute error <= 1e-33 below that (near exp's underflow). GELU's negative tail adds the
conditioning of exp(-a) on its float32 argument a (a = x^2/2 for the erf form, 2u = 1.6(x +
0.045 x^3) for the tanh form): rounding a costs |a| * 6e-8 of relative error, inherent to any
float32 evaluation of these formulas, so there the bound is 5e-7 + 2.5e-7 |a| (absolute error
stays below 1e-11 since the values are tiny).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from moec.codegen.kernels import elementwise_unary

GRID = np.concatenate([
    np.linspace(-100.0, 100.0, 40001),
    np.linspace(-1e-3, 1e-3, 2001),  # small arguments: tanh's polynomial branch, exp ~ 1 + x
    np.linspace(-0.7, 0.7, 2001),  # around tanh's branch point 0.625
]).astype(np.float32)

_erfc = np.vectorize(math.erfc, otypes=[np.float64])
REFS = {
    ("exp", ()): np.exp,
    ("sigmoid", ()): lambda x: 1 / (1 + np.exp(-x)),
    ("silu", ()): lambda x: x / (1 + np.exp(-x)),
    ("tanh", ()): np.tanh,
    ("gelu", (("approximate", "none"),)): lambda x: 0.5 * x * _erfc(-x / math.sqrt(2)),
    # 0.5 (1 + tanh u) = sigmoid(2u): the same function without float64's own cancellation
    ("gelu", (("approximate", "tanh"),)):
        lambda x: x / (1 + np.exp(-2 * math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
}


@pytest.fixture(scope="module")
def lib(kernel_lib):
    ks = {key: elementwise_unary(key[0], ("T",), "float32", **dict(key[1])) for key in REFS}
    lib = kernel_lib(ks.values())
    lib.k = ks
    return lib


def _run(lib, key, x):
    (y,) = lib(lib.k[key], x, outs=[(x.shape, "float32")])
    return y


@pytest.mark.parametrize("key", list(REFS), ids=lambda k: "_".join([k[0], *[v for _, v in k[1]]]))
def test_accuracy(lib, key):
    x = GRID
    with np.errstate(over="ignore"):
        ref = REFS[key](x.astype(np.float64))
    y = _run(lib, key, x).astype(np.float64)
    finite = np.abs(ref) < 3.0e38
    big = finite & (np.abs(ref) > 1e-30)
    small = finite & ~big
    rel = np.abs(y[big] - ref[big]) / np.abs(ref[big])
    xb = x[big].astype(np.float64)
    bound = np.full(xb.shape, 5e-7)
    if key == ("gelu", (("approximate", "none"),)):
        bound += 2.5e-7 * xb**2 / 2
    if key == ("gelu", (("approximate", "tanh"),)):
        bound += 2.5e-7 * np.abs(2 * math.sqrt(2 / math.pi) * (xb + 0.044715 * xb**3))
    worst = (rel / bound).argmax()
    assert rel[worst] <= bound[worst], f"rel err {rel[worst]:.2e} at x={xb[worst]}"
    assert np.abs(y[small] - ref[small]).max(initial=0) <= 1e-33
    assert np.all(np.isinf(y[~finite]) | (np.abs(y[~finite]) > 3e38))


def test_special_values(lib):
    x = np.array([np.inf, -np.inf, np.nan, 89.0, -104.0, 0.0, -0.0], np.float32)
    exp = _run(lib, ("exp", ()), x)
    assert exp[0] == np.inf and exp[1] == 0 and np.isnan(exp[2])
    assert exp[3] == np.inf and exp[4] == 0 and exp[5] == 1 and exp[6] == 1
    sig = _run(lib, ("sigmoid", ()), x)
    assert sig[0] == 1 and sig[1] == 0 and np.isnan(sig[2]) and sig[5] == 0.5
    th = _run(lib, ("tanh", ()), x)
    assert th[0] == 1 and th[1] == -1 and np.isnan(th[2]) and th[5] == 0
    g = _run(lib, ("gelu", (("approximate", "none"),)), x)
    assert g[0] == np.inf and g[5] == 0 and np.isnan(g[2])
