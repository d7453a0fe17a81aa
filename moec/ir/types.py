"""Types of the IR: dtypes, symbolic dimension expressions and tensor types.

A shape is a tuple whose entries are ints or `SymExpr`s. Symbolic expressions are small trees over
named dims (`Sym("T")`) with `+`, `-`, `*` and `//`, kept in a canonical form (products and sums
multiplied out, constants folded, terms ordered: see SymExpr), so that `T*2`, `T*2//32+8`, `B*S`
and friends can be written, printed, parsed back, compared and evaluated.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Union

import numpy as np

from moec.errors import IRError

DType = str  # IR dtypes are plain strings: "f32", "bf16", "i32", ...
DTYPES = ("f32", "f16", "bf16", "f64", "i32", "i64", "i8", "u8", "bool")
FLOAT_DTYPES = ("f32", "f16", "bf16", "f64")
_NP_NAMES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16", "f64": "float64",
             "i32": "int32", "i64": "int64", "i8": "int8", "u8": "uint8", "bool": "bool"}
_FROM_NP = {v: k for k, v in _NP_NAMES.items()}


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise IRError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    return dtype


def numpy_dtype(dtype: str) -> np.dtype:
    """The numpy dtype of an IR dtype (bf16 through ml_dtypes)."""
    check_dtype(dtype)
    if dtype == "bf16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(_NP_NAMES[dtype])


def dtype_of_numpy(dt: np.dtype | str) -> str:
    name = np.dtype(dt).name
    if name not in _FROM_NP:
        raise IRError(f"numpy dtype {name} has no IR dtype; use one of {', '.join(_FROM_NP)}")
    return _FROM_NP[name]


def tvm_dtype(dtype: str) -> str:
    """TVM spells dtypes like numpy: float32, bfloat16, int32, bool."""
    return _NP_NAMES[check_dtype(dtype)]


# --------------------------------------------------------------------------- symbolic dims

_PREC = {"+": 1, "-": 1, "*": 2, "//": 2}
MAX_POLY_TERMS = 256
"""Most terms a symbolic dim may expand to (products of sums multiply out)."""


class SymExpr:
    """A symbolic dimension expression. Build with Sym and the arithmetic operators.

    Every expression the operators build is in a canonical form: sums and products are
    multiplied out into a polynomial over named dims and floor divisions, constants folded and
    terms and factors ordered, so that equal polynomials are equal objects and print the same
    (`8*T`, `T*8` and `T*4+T*4` are all `T*8`; `(T+4)*8` and `T*8+32` both print `(T+4)*8`)."""

    __slots__ = ()

    def __add__(self, other: DimLike) -> DimLike:
        return _mk("+", self, other)

    def __radd__(self, other: DimLike) -> DimLike:
        return _mk("+", other, self)

    def __sub__(self, other: DimLike) -> DimLike:
        return _mk("-", self, other)

    def __rsub__(self, other: DimLike) -> DimLike:
        return _mk("-", other, self)

    def __mul__(self, other: DimLike) -> DimLike:
        return _mk("*", self, other)

    def __rmul__(self, other: DimLike) -> DimLike:
        return _mk("*", other, self)

    def __floordiv__(self, other: DimLike) -> DimLike:
        return _mk("//", self, other)

    def __rfloordiv__(self, other: DimLike) -> DimLike:
        return _mk("//", other, self)

    def evaluate(self, env: dict[str, int]) -> int:
        raise NotImplementedError

    def free_syms(self) -> set[str]:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class Sym(SymExpr):
    """A named symbolic dimension, e.g. the token count `T`."""

    name: str

    def evaluate(self, env: dict[str, int]) -> int:
        if self.name not in env:
            raise IRError(f"symbolic dim {self.name} is not bound")
        return int(env[self.name])

    def free_syms(self) -> set[str]:
        return {self.name}

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class BinExpr(SymExpr):
    op: str
    lhs: DimLike
    rhs: DimLike

    def evaluate(self, env: dict[str, int]) -> int:
        a, b = eval_dim(self.lhs, env), eval_dim(self.rhs, env)
        return _apply(self.op, a, b)

    def free_syms(self) -> set[str]:
        out: set[str] = set()
        for side in (self.lhs, self.rhs):
            if isinstance(side, SymExpr):
                out |= side.free_syms()
        return out

    def __str__(self) -> str:
        def wrap(side: DimLike, right: bool) -> str:
            s = str(side)
            if isinstance(side, BinExpr):
                p, q = _PREC[side.op], _PREC[self.op]
                if p < q or (right and p == q):
                    return f"({s})"
            return s

        return f"{wrap(self.lhs, False)}{self.op}{wrap(self.rhs, True)}"


DimLike = Union[int, SymExpr]  # noqa: UP007 (a runtime alias; `|` needs both sides as types)


def _apply(op: str, a: int, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if b == 0:
        raise IRError("division by zero in a symbolic dim")
    return a // b


# A polynomial: {monomial: coefficient}, a monomial a sorted tuple of atoms (named dims and
# floor divisions that do not simplify), the constant term under the empty monomial.
_Poly = dict[tuple[SymExpr, ...], int]


def _atom_key(a: SymExpr) -> tuple[int, str]:
    return (0 if isinstance(a, Sym) else 1, str(a))


def _poly(d: DimLike) -> _Poly:
    if isinstance(d, int):
        return {(): d} if d else {}
    if isinstance(d, Sym):
        return {(d,): 1}
    assert isinstance(d, BinExpr)
    if d.op == "//":
        return _floordiv(_poly(d.lhs), _poly(d.rhs))
    a, b = _poly(d.lhs), _poly(d.rhs)
    if d.op == "+":
        return _add(a, b, 1)
    if d.op == "-":
        return _add(a, b, -1)
    return _mul(a, b)


def _add(a: _Poly, b: _Poly, sign: int) -> _Poly:
    out = dict(a)
    for m, c in b.items():
        v = out.get(m, 0) + sign * c
        if v:
            out[m] = v
        else:
            out.pop(m, None)
    return _bounded(out)


def _mul(a: _Poly, b: _Poly) -> _Poly:
    out: _Poly = {}
    for ma, ca in a.items():
        for mb, cb in b.items():
            m = tuple(sorted(ma + mb, key=_atom_key))
            v = out.get(m, 0) + ca * cb
            if v:
                out[m] = v
            else:
                out.pop(m, None)
    return _bounded(out)


def _floordiv(a: _Poly, b: _Poly) -> _Poly:
    if not b:
        raise IRError("division by zero in a symbolic dim")
    if set(b) == {()} and b[()] > 0:
        c = b[()]
        # (c*Q + R) // c == Q + R // c for integer-valued Q: split every coefficient so that
        # R keeps the remainders in [0, c)
        q = {m: v // c for m, v in a.items() if v // c}
        r = {m: v % c for m, v in a.items() if v % c}
        if not r:
            return _bounded(q)
        if set(r) == {()}:
            return _add(q, {(): r[()] // c}, 1)
        g = math.gcd(c, *r.values())  # (T*2+2)//4 == (T+1)//2
        r = {m: v // g for m, v in r.items()}
        return _add(q, {(BinExpr("//", _expr(r), c // g),): 1}, 1)
    num, den = _expr(a), _expr(b)
    if isinstance(num, int) and isinstance(den, int):
        return _poly(_apply("//", num, den))
    return {(BinExpr("//", num, den),): 1}


def _bounded(p: _Poly) -> _Poly:
    if len(p) > MAX_POLY_TERMS:
        raise IRError(f"symbolic dim expression with more than {MAX_POLY_TERMS} terms")
    return p


def _monomial(m: tuple[SymExpr, ...], c: int) -> DimLike:
    """|c| * the atoms of m, atoms first: `B*S*8`."""
    out: DimLike | None = None
    for atom in m:
        out = atom if out is None else BinExpr("*", out, atom)
    if out is None:
        return abs(c)
    return out if abs(c) == 1 else BinExpr("*", out, abs(c))


def _expr(p: _Poly) -> DimLike:
    """The canonical expression of a polynomial (see SymExpr)."""
    if not p:
        return 0
    if set(p) == {()}:
        return p[()]
    terms = sorted(p.items(), key=lambda t: (-len(t[0]), [_atom_key(a) for a in t[0]]))
    if len(terms) > 1:
        g = math.gcd(*(c for _, c in terms))
        if g > 1:  # (T+4)*8 rather than T*8+32
            return BinExpr("*", _expr({m: c // g for m, c in terms}), g)
    first = next((i for i, (_, c) in enumerate(terms) if c > 0), None)
    if first is None:  # every term negative: 0-T-1
        out: DimLike = 0
    else:
        out = _monomial(*terms[first])
        terms = terms[:first] + terms[first + 1:]
    for m, c in terms:
        out = BinExpr("+" if c > 0 else "-", out, _monomial(m, c))
    return out


def _mk(op: str, a: DimLike, b: DimLike) -> DimLike:
    for side in (a, b):
        if not isinstance(side, (int, SymExpr)) or isinstance(side, bool):
            return NotImplemented
    if isinstance(a, int) and isinstance(b, int):
        return _apply(op, a, b)
    if op in ("*", "//") and b == 1 or op in ("+", "-") and b == 0:
        return canonical(a)
    return _expr(_poly(BinExpr(op, a, b)))


def canonical(d: DimLike) -> DimLike:
    """`d` in the canonical form the operators build (see SymExpr)."""
    return d if isinstance(d, (int, Sym)) else _expr(_poly(d))


_DIM_TOKEN = re.compile(r"\s*(?:(\d+)|([A-Za-z_][A-Za-z0-9_]*)|(//|[-+*()]))")


def parse_dim(text: str) -> DimLike:
    """A dim from its printed form (`"B*S"`, `"T//2+4"`), in canonical form. Names become
    `Sym`s; raises IRError for anything else."""
    toks: list[str] = []
    pos, text = 0, text.strip()
    while pos < len(text):
        m = _DIM_TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise IRError(f"bad dim expression {text!r}")
        toks.append(m.group(m.lastindex or 0))
        pos = m.end()
    if not toks or len(toks) > 4 * MAX_POLY_TERMS:
        raise IRError(f"bad dim expression {text!r}")
    i = 0

    def atom() -> DimLike:
        nonlocal i
        if i >= len(toks):
            raise IRError(f"bad dim expression {text!r}")
        tok = toks[i]
        i += 1
        if tok.isdigit():
            return int(tok)
        if tok[0].isalpha() or tok[0] == "_":
            return Sym(tok)
        if tok == "(":
            d = expr()
            if i >= len(toks) or toks[i] != ")":
                raise IRError(f"bad dim expression {text!r}: unbalanced parentheses")
            i += 1
            return d
        raise IRError(f"bad dim expression {text!r} at {tok!r}")

    def term() -> DimLike:
        nonlocal i
        d = atom()
        while i < len(toks) and toks[i] in ("*", "//"):
            op = toks[i]
            i += 1
            d = _combine(op, d, atom())
        return d

    def expr() -> DimLike:
        nonlocal i
        d = term()
        while i < len(toks) and toks[i] in ("+", "-"):
            op = toks[i]
            i += 1
            d = _combine(op, d, term())
        return d

    out = expr()
    if i != len(toks):
        raise IRError(f"bad dim expression {text!r}")
    return out


def _combine(op: str, a: DimLike, b: DimLike) -> DimLike:
    if isinstance(a, int) and isinstance(b, int):
        return _apply(op, a, b)
    return _mk(op, a, b)


def eval_dim(d: DimLike, env: dict[str, int]) -> int:
    return d if isinstance(d, int) else d.evaluate(env)


def dim_str(d: DimLike) -> str:
    return str(d)


# --------------------------------------------------------------------------- tensor types


@dataclass(frozen=True)
class TensorType:
    """The type of every IR value: a shape (ints and symbolic dims) and a dtype."""

    shape: tuple[DimLike, ...]
    dtype: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(self.shape))
        check_dtype(self.dtype)
        for d in self.shape:
            if isinstance(d, bool) or not isinstance(d, (int, SymExpr)):
                raise IRError(f"bad dim {d!r} in shape {self.shape}: ints or symbolic dims only")
            if isinstance(d, int) and d < 0:
                raise IRError(f"negative dim {d} in shape {self.shape}")

    @property
    def rank(self) -> int:
        return len(self.shape)

    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    def concrete(self, env: dict[str, int]) -> tuple[int, ...]:
        return tuple(eval_dim(d, env) for d in self.shape)

    def __str__(self) -> str:
        return f"{self.dtype}[{', '.join(dim_str(d) for d in self.shape)}]"


def same_dim(a: DimLike, b: DimLike) -> bool:
    """Whether two dims are equal as polynomials (`T*8` and `8*T`, `(T+4)*8` and `T*8+32`)."""
    if a == b:
        return True
    dims = (int, SymExpr)
    return isinstance(a, dims) and isinstance(b, dims) and canonical(a) == canonical(b)


def same_shape(a: tuple[DimLike, ...], b: tuple[DimLike, ...]) -> bool:
    return len(a) == len(b) and all(same_dim(x, y) for x, y in zip(a, b, strict=True))


def same_type(a: TensorType, b: TensorType) -> bool:
    return a.dtype == b.dtype and same_shape(a.shape, b.shape)
