"""Vectorisable float32 math as TIR expressions: exp, sigmoid, tanh, GELU and friends.

TVM lowers `T.exp`/`T.tanh`/`T.erf` on LLVM CPU targets to libm calls, which the vectoriser
scalarises (one `expf` call per lane, ~10x slower). These versions use only arithmetic, compares
and bit casts, so an 8- or 16-lane loop stays in SIMD registers. Accuracy (checked against float64
in tests/codegen/test_fmath.py): exp <= 2 ulp; tanh, sigmoid, gelu ~1e-7 relative.
"""

from __future__ import annotations

from collections.abc import Callable

from tvm import tirx

from moec.codegen.kernels.base import let
from moec.errors import CodegenError

F32 = "float32"
PrimExpr = tirx.Expr


def c(v: float) -> PrimExpr:
    return tirx.const(v, F32)


def select(cond: PrimExpr, a: PrimExpr, b: PrimExpr) -> PrimExpr:
    # Select (both sides evaluated) vectorises; if_then_else would become a branch per lane.
    return tirx.Select(cond, a, b)


def fmax(a: PrimExpr, b: PrimExpr) -> PrimExpr:
    return tirx.Max(a, b)


def fmin(a: PrimExpr, b: PrimExpr) -> PrimExpr:
    return tirx.Min(a, b)


def _horner(x: PrimExpr, coeffs: list[float]) -> PrimExpr:
    acc = c(coeffs[0])
    for k in coeffs[1:]:
        acc = acc * x + c(k)
    return acc


_EXP_HI = 88.72283935546875  # log(FLT_MAX): larger inputs give inf
_EXP_LO = -87.33654022216797  # log(FLT_MIN): smaller inputs give 0 (denormals are flushed)


def exp(x: PrimExpr) -> PrimExpr:
    """e**x: Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, a degree-6 polynomial in r
    (Cephes expf coefficients), then scaling by 2**n built from exponent bits. 2**n is applied
    as two halves so that n in [-126, 128] never leaves the normal range."""

    def body(v: PrimExpr) -> PrimExpr:
        xc = fmin(fmax(v, c(_EXP_LO)), c(_EXP_HI))
        n = tirx.floor(xc * c(1.4426950408889634) + c(0.5))

        def reduced(n: PrimExpr) -> PrimExpr:
            r = xc - n * c(0.693359375) - n * c(-2.12194440e-4)

            def poly(r: PrimExpr) -> PrimExpr:
                p = _horner(
                    r,
                    [1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
                     1.6666665459e-1, 5.0000001201e-1],
                )
                return p * r * r + r + c(1.0)

            ni = tirx.Cast("int32", n)
            half = ni >> 1  # arithmetic shift: floor(n / 2)
            return let(r, poly) * _pow2(half) * _pow2(ni - half)

        res = let(n, reduced)
        res = select(v > c(_EXP_HI), c(float("inf")), res)
        res = select(v < c(_EXP_LO), c(0.0), res)
        return select(tirx.isnan(v), v, res)  # NaN propagates (the clamp above would eat it)

    return let(x, body)


def _pow2(n: PrimExpr) -> PrimExpr:
    """2**n for int32 n in [-126, 127], by writing n + 127 into the exponent field."""
    return tirx.reinterpret(F32, (n + tirx.const(127, "int32")) << tirx.const(23, "int32"))


def sigmoid(x: PrimExpr) -> PrimExpr:
    # exp(-x) overflows to inf for x < -88.7, giving exactly 0: no NaN from inf/inf.
    return c(1.0) / (c(1.0) + exp(-x))


def softplus(x: PrimExpr) -> PrimExpr:
    """log(1 + e^x) = max(x, 0) + log1p(e^-|x|): no overflow, and accurate where it is tiny
    (x << 0, where log(1 + e^x) would round to 0). log1p is a libm call (not vectorised)."""
    return let(x, lambda v: fmax(v, c(0.0)) + tirx.log1p(exp(-tirx.abs(v))))


def sqrt_softplus(x: PrimExpr) -> PrimExpr:
    """sqrt(softplus(x)): DeepSeek-V4's router scores."""
    return tirx.sqrt(softplus(x))


def silu(x: PrimExpr) -> PrimExpr:
    return let(x, lambda v: v / (c(1.0) + exp(-v)))


def tanh(x: PrimExpr) -> PrimExpr:
    """Odd polynomial (Cephes tanhf) for |x| < 0.625, where 1 - 2/(e^2x + 1) cancels badly;
    the exp form elsewhere (it saturates to +-1 cleanly since 2/inf = 0)."""

    def body(v: PrimExpr) -> PrimExpr:
        a = tirx.abs(v)

        def small(s: PrimExpr) -> PrimExpr:
            p = _horner(
                s,
                [-5.70498872745e-3, 2.06390887954e-2, -5.37397155531e-2, 1.33314422036e-1,
                 -3.33332819422e-1],
            )
            return p * s * v + v

        big = c(1.0) - c(2.0) / (exp(a + a) + c(1.0))
        signed = let(big, lambda b: select(v < c(0.0), -b, b))
        return select(a < c(0.625), let(v * v, small), signed)

    return let(x, body)


def erfc_pos(z: PrimExpr) -> PrimExpr:
    """erfc(z) for z >= 0 with relative error < 1.2e-7 (Chebyshev fit of Numerical Recipes'
    erfcc), accurate in the tail where 1 - erf(z) would cancel."""

    def body(t: PrimExpr) -> PrimExpr:
        p = _horner(
            t,
            [0.17087277, -0.82215223, 1.48851587, -1.13520398, 0.27886807, -0.18628806,
             0.09678418, 0.37409196, 1.00002368, -1.26551223],
        )
        return t * exp(-z * z + p)

    return let(c(1.0) / (c(1.0) + c(0.5) * z), body)


def gelu(x: PrimExpr) -> PrimExpr:
    """Exact GELU x * Phi(x) = 0.5 x erfc(-x / sqrt 2), via erfc(|x| / sqrt 2) so that the
    negative tail keeps full relative precision."""

    def body(v: PrimExpr) -> PrimExpr:
        e = erfc_pos(tirx.abs(v) * c(0.7071067811865476))
        return c(0.5) * v * let(e, lambda e: select(v < c(0.0), e, c(2.0) - e))

    return let(x, body)


def gelu_tanh(x: PrimExpr) -> PrimExpr:
    """GELU, tanh approximation: 0.5 x (1 + tanh(u)) written as x * sigmoid(2u), which is the
    same function without the cancellation of 1 + tanh(u) for negative u."""

    def body(v: PrimExpr) -> PrimExpr:
        u2 = c(2.0 * 0.7978845608028654) * (v + c(0.044715) * v * v * v)
        return v / (c(1.0) + exp(-u2))

    return let(x, body)


def relu(x: PrimExpr) -> PrimExpr:
    return fmax(x, c(0.0))


def clamped_swiglu(g: PrimExpr, u: PrimExpr, alpha: float, limit: float,
                   offset: float = 1.0) -> PrimExpr:
    """The clamped gated activation: (clamp(u, -limit, limit) + offset) * g' * sigmoid(alpha g'),
    g' = min(g, limit) (GPT-OSS: alpha=1.702, offset=1; alpha=1, offset=0: silu(g') * u')."""

    def body(gc: PrimExpr) -> PrimExpr:
        up = fmin(fmax(u, c(-limit)), c(limit))
        up = up + c(offset) if offset != 0.0 else up
        return up * (gc / (c(1.0) + exp(gc * c(-alpha))))

    return let(fmin(g, c(limit)), body)


ACTIVATIONS: dict[str, Callable[[PrimExpr], PrimExpr]] = {
    "none": lambda v: v,
    "silu": silu,
    "gelu": gelu,
    "gelu_tanh": gelu_tanh,
    "relu": relu,
    "relu2": lambda v: let(relu(v), lambda r: r * r),
    "sigmoid": sigmoid,
    "tanh": tanh,
}


def activation(name: str) -> Callable[[PrimExpr], PrimExpr]:
    """The float32 activation function called `name` (see ACTIVATIONS)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise CodegenError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}") from None
