"""Types of the IR: dtypes, symbolic dimension expressions and tensor types.

A shape is a tuple whose entries are ints or `SymExpr`s. Symbolic expressions are small trees over
named dims (`Sym("T")`) with `+`, `-`, `*` and `//`, folded when both sides are constants, so that
`T*2`, `(T*2)//32+8` and friends can be written, printed, parsed back and evaluated.
"""

from __future__ import annotations

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


class SymExpr:
    """A symbolic dimension expression. Build with Sym and the arithmetic operators."""

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


def _mk(op: str, a: DimLike, b: DimLike) -> DimLike:
    for side in (a, b):
        if not isinstance(side, (int, SymExpr)) or isinstance(side, bool):
            return NotImplemented
    if isinstance(a, int) and isinstance(b, int):
        return _apply(op, a, b)
    # light folding keeps printed shapes readable: T*1 = T, T+0 = T
    if op in ("*", "//") and b == 1:
        return a
    if op == "*" and a == 1:
        return b
    if op in ("+", "-") and b == 0:
        return a
    if op == "+" and a == 0:
        return b
    return BinExpr(op, a, b)


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
    return str(a) == str(b)


def same_type(a: TensorType, b: TensorType) -> bool:
    return a.dtype == b.dtype and len(a.shape) == len(b.shape) and all(
        same_dim(x, y) for x, y in zip(a.shape, b.shape, strict=True))
