"""The `core` dialect: dense tensor ops (linear, elementwise, reductions, norms, top-k, reshape).

Semantics are documented in docs/ops.md; the numpy functions here are the reference. Float math
runs in float32 (or float64 for f64) and is cast back to the result dtype.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from moec.errors import IRError
from moec.ir.registry import REQUIRED, OpDef, register_op
from moec.ir.types import (
    FLOAT_DTYPES,
    DimLike,
    TensorType,
    check_dtype,
    numpy_dtype,
    parse_dim,
    same_dim,
)

A = Mapping[str, Any]


def _f(x: np.ndarray) -> np.ndarray:
    """Compute dtype for reference math."""
    return x.astype(np.float64) if x.dtype == np.float64 else x.astype(np.float32)


def _axis(axis: int, rank: int, op: str) -> int:
    if not -rank <= axis < rank:
        raise IRError(f"{op}: axis {axis} out of range for rank {rank}")
    return axis % rank


def _need_float(op: str, t: TensorType) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise IRError(f"{op}: expected a float tensor, got {t}")


def broadcast(op: str, a: TensorType, b: TensorType) -> tuple[DimLike, ...]:
    ra, rb = a.shape[::-1], b.shape[::-1]
    out: list[DimLike] = []
    for i in range(max(len(ra), len(rb))):
        x = ra[i] if i < len(ra) else 1
        y = rb[i] if i < len(rb) else 1
        if same_dim(x, y) or y == 1:
            out.append(x)
        elif x == 1:
            out.append(y)
        else:
            raise IRError(f"{op}: shapes {a} and {b} do not broadcast (dim {x} vs {y})")
    return tuple(out[::-1])


# --------------------------------------------------------------------------- linear algebra


def _infer_linear(ts: list[TensorType], a: A) -> list[TensorType]:
    x, w = ts[0], ts[1]
    _need_float("core.linear", x)
    if w.rank != 2 or x.rank < 1 or not same_dim(x.shape[-1], w.shape[1]):
        raise IRError(f"core.linear: x {x} and weight {w} do not match (want x[..., K], w[N, K])")
    if len(ts) == 3 and (ts[2].rank != 1 or not same_dim(ts[2].shape[0], w.shape[0])):
        raise IRError(f"core.linear: bias {ts[2]} does not match weight {w}")
    return [TensorType(x.shape[:-1] + (w.shape[0],), x.dtype)]


def _ref_linear(xs: list[np.ndarray], a: A) -> list[np.ndarray]:
    y = _f(xs[0]) @ _f(xs[1]).T
    if len(xs) == 3:
        y = y + _f(xs[2])
    return [y.astype(xs[0].dtype)]


def _infer_matmul(ts: list[TensorType], a: A) -> list[TensorType]:
    x, w = ts
    if x.rank < 2 or w.rank != 2 or not same_dim(x.shape[-1], w.shape[0]):
        raise IRError(f"core.matmul: {x} @ {w} does not match (want [..., M, K] @ [K, N])")
    return [TensorType(x.shape[:-1] + (w.shape[1],), x.dtype)]


register_op(OpDef("core.linear", (2, 3), _infer_linear, _ref_linear, doc="x @ w.T (+ b)"))
register_op(OpDef("core.matmul", (2, 2), _infer_matmul,
                  lambda xs, a: [(_f(xs[0]) @ _f(xs[1])).astype(xs[0].dtype)], doc="a @ b"))

# --------------------------------------------------------------------------- elementwise

_BINARY = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide,
           "maximum": np.maximum, "minimum": np.minimum}


def _infer_binary(name: str):
    def infer(ts: list[TensorType], a: A) -> list[TensorType]:
        x, y = ts
        if x.dtype != y.dtype:
            raise IRError(f"{name}: operand dtypes differ ({x} vs {y}); insert a core.cast")
        return [TensorType(broadcast(name, x, y), x.dtype)]
    return infer


for _n, _fn in _BINARY.items():
    register_op(OpDef(f"core.{_n}", (2, 2), _infer_binary(f"core.{_n}"),
                      (lambda fn: lambda xs, a: [fn(_f(xs[0]), _f(xs[1]))
                                                 .astype(xs[0].dtype)])(_fn),
                      doc=f"elementwise {_n} with broadcasting"))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _gelu(x: np.ndarray, approximate: str) -> np.ndarray:
    if approximate == "tanh":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    from math import erf

    return 0.5 * x * (1.0 + np.vectorize(erf, otypes=[x.dtype])(x / math.sqrt(2.0)))


_UNARY = {
    "silu": (lambda x, a: x * _sigmoid(x), {}),
    "gelu": (lambda x, a: _gelu(x, a["approximate"]), {"approximate": "none"}),
    "relu": (lambda x, a: np.maximum(x, 0), {}),
    "sigmoid": (lambda x, a: _sigmoid(x), {}),
    "tanh": (lambda x, a: np.tanh(x), {}),
    "exp": (lambda x, a: np.exp(x), {}),
    "neg": (lambda x, a: -x, {}),
    "sqrt": (lambda x, a: np.sqrt(x), {}),
    "softplus": (lambda x, a: np.logaddexp(0.0, x), {}),  # log(1 + e^x), without overflow
    "rsqrt": (lambda x, a: 1.0 / np.sqrt(x), {}),
    "scale": (lambda x, a: x * a["value"], {"value": REQUIRED}),
    "clamp": (lambda x, a: np.clip(x, -np.inf if a["min"] is None else a["min"],
                                   np.inf if a["max"] is None else a["max"]),
              {"min": None, "max": None}),
}


def _infer_unary(name: str):
    def infer(ts: list[TensorType], a: A) -> list[TensorType]:
        _need_float(name, ts[0])
        return [ts[0]]
    return infer


for _n, (_fn, _attrs) in _UNARY.items():
    register_op(OpDef(f"core.{_n}", (1, 1), _infer_unary(f"core.{_n}"),
                      (lambda fn: lambda xs, a: [fn(_f(xs[0]), a).astype(xs[0].dtype)])(_fn),
                      attrs=_attrs, doc=f"elementwise {_n}"))


def _infer_cast(ts: list[TensorType], a: A) -> list[TensorType]:
    return [TensorType(ts[0].shape, check_dtype(a["dtype"]))]


register_op(OpDef("core.cast", (1, 1), _infer_cast,
                  lambda xs, a: [xs[0].astype(numpy_dtype(a["dtype"]))],
                  attrs={"dtype": REQUIRED}, doc="convert to another dtype"))

# --------------------------------------------------------------------------- reductions


def _infer_softmax(ts: list[TensorType], a: A) -> list[TensorType]:
    _need_float("core.softmax", ts[0])
    _axis(a["axis"], ts[0].rank, "core.softmax")
    return [ts[0]]


def _ref_softmax(xs: list[np.ndarray], a: A) -> list[np.ndarray]:
    x = _f(xs[0])
    m = np.max(x, axis=a["axis"], keepdims=True) if x.size else x
    e = np.exp(x - m)
    return [(e / np.sum(e, axis=a["axis"], keepdims=True)).astype(xs[0].dtype)]


register_op(OpDef("core.softmax", (1, 1), _infer_softmax, _ref_softmax, attrs={"axis": -1},
                  doc="softmax along axis"))


def _infer_reduce(name: str):
    def infer(ts: list[TensorType], a: A) -> list[TensorType]:
        x = ts[0]
        ax = _axis(a["axis"], x.rank, name)
        shape = list(x.shape)
        if a["keepdim"]:
            shape[ax] = 1
        else:
            del shape[ax]
        return [TensorType(tuple(shape), x.dtype)]
    return infer


for _n, _fn in {"sum": np.sum, "mean": np.mean}.items():
    register_op(OpDef(f"core.{_n}", (1, 1), _infer_reduce(f"core.{_n}"),
                      (lambda fn: lambda xs, a: [np.asarray(fn(_f(xs[0]), axis=a["axis"],
                                                               keepdims=a["keepdim"]))
                                                 .astype(xs[0].dtype)])(_fn),
                      attrs={"axis": REQUIRED, "keepdim": False}, doc=f"{_n} along axis"))


def topk_ref(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k along the last axis, descending; ties go to the lower index (stable sort)."""
    idx = np.argsort(-x, axis=-1, kind="stable")[..., :k]
    return np.take_along_axis(x, idx, axis=-1), idx.astype(np.int32)


def _infer_topk(ts: list[TensorType], a: A) -> list[TensorType]:
    x, k = ts[0], a["k"]
    if x.rank < 1 or not isinstance(x.shape[-1], int) or not 1 <= k <= x.shape[-1]:
        raise IRError(f"core.topk: k={k} needs a static last dim >= k, got {x}")
    shape = x.shape[:-1] + (k,)
    return [TensorType(shape, x.dtype), TensorType(shape, "i32")]


register_op(OpDef("core.topk", (1, 1), _infer_topk,
                  lambda xs, a: list(topk_ref(xs[0], a["k"])), attrs={"k": REQUIRED},
                  doc="top-k values (descending) and i32 indices along the last axis"))

# --------------------------------------------------------------------------- norms


def _infer_norm(name: str, nparams: int):
    def infer(ts: list[TensorType], a: A) -> list[TensorType]:
        x = ts[0]
        _need_float(name, x)
        for p in ts[1:]:
            if p.rank != 1 or not same_dim(p.shape[0], x.shape[-1]):
                raise IRError(f"{name}: parameter {p} does not match hidden dim of {x}")
        return [x]
    return infer


def _ref_rmsnorm(xs: list[np.ndarray], a: A) -> list[np.ndarray]:
    x = _f(xs[0])
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + a["eps"]) * _f(xs[1])
    return [y.astype(xs[0].dtype)]


def _ref_layernorm(xs: list[np.ndarray], a: A) -> list[np.ndarray]:
    x = _f(xs[0])
    mu = np.mean(x, axis=-1, keepdims=True)
    var = np.mean((x - mu) ** 2, axis=-1, keepdims=True)
    y = (x - mu) / np.sqrt(var + a["eps"]) * _f(xs[1]) + _f(xs[2])
    return [y.astype(xs[0].dtype)]


register_op(OpDef("core.rmsnorm", (2, 2), _infer_norm("core.rmsnorm", 1), _ref_rmsnorm,
                  attrs={"eps": 1e-6}, doc="x / sqrt(mean(x^2) + eps) * w"))
register_op(OpDef("core.layernorm", (3, 3), _infer_norm("core.layernorm", 2), _ref_layernorm,
                  attrs={"eps": 1e-5}, doc="layer norm over the last axis"))

# --------------------------------------------------------------------------- shape


def _infer_reshape(ts: list[TensorType], a: A) -> list[TensorType]:
    x, shape = ts[0], list(a["shape"])
    if any(isinstance(d, str) for d in shape):
        return [TensorType(_symbolic_reshape(x, shape), x.dtype)]
    if any(not isinstance(d, int) or d < -1 for d in shape) or shape.count(-1) > 1:
        raise IRError(f"core.reshape: shape {shape} must be ints with at most one -1")
    static = math.prod(d for d in shape if d != -1)
    known = [d for d in x.shape if isinstance(d, int)]
    sym = [d for d in x.shape if not isinstance(d, int)]
    if -1 in shape:
        if not sym:
            total = math.prod(known)
            if static == 0 or total % static:
                raise IRError(f"core.reshape: cannot reshape {x} to {shape}")
            fill: DimLike = total // static
        else:
            rest = math.prod(known)
            if static == 0 or rest % static and static % rest:
                raise IRError(f"core.reshape: cannot reshape {x} to {shape}")
            expr = sym[0]
            for d in sym[1:]:
                expr = expr * d
            fill = expr * (rest // static) if rest % static == 0 else expr // (static // rest)
        shape[shape.index(-1)] = fill
    elif sym or math.prod(known) != static:
        raise IRError(f"core.reshape: cannot reshape {x} to {shape} (use -1 for the token dim)")
    return [TensorType(tuple(shape), x.dtype)]


def _symbolic_reshape(x: TensorType, shape: list) -> tuple[DimLike, ...]:
    """A target shape that names its symbolic dims (`["B", "S", 64]`, for more than one
    symbolic dim, which -1 cannot stand for): ints and dim expressions, no -1; the element
    counts must be equal as polynomials."""
    out: list[DimLike] = []
    for d in shape:
        if isinstance(d, str):
            out.append(parse_dim(d))
        elif isinstance(d, int) and not isinstance(d, bool) and d >= 0:
            out.append(d)
        else:
            raise IRError(f"core.reshape: shape {shape} mixes dim names with {d!r}; "
                          "use ints and dim expressions only")
    if not same_dim(math.prod(out), math.prod(x.shape)):
        raise IRError(f"core.reshape: cannot reshape {x} to {shape}: "
                      f"{math.prod(out)} elements, not {math.prod(x.shape)}")
    return tuple(out)


def _ref_reshape(xs: list[np.ndarray], a: A) -> list[np.ndarray]:
    if any(isinstance(d, str) for d in a["shape"]):  # the interpreter binds named dims first
        raise IRError("core.reshape with named dims needs their values (run it in interpret)")
    return [xs[0].reshape(tuple(a["shape"]))]


register_op(OpDef("core.reshape", (1, 1), _infer_reshape,
                  _ref_reshape, attrs={"shape": REQUIRED},
                  doc="reshape; -1 stands for the (symbolic) rest, or symbolic dims are named "
                      "(\"B\", \"S\")"))
