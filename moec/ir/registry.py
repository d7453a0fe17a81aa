"""The op registry: every op is registered by name with its attributes, type inference and a numpy
reference implementation (the ground truth of the interpreter).

Register an op of your own (a dialect other than core/moe) with `register_op`:

    register_op(OpDef("mydialect.double", arity=(1, 1), infer=same_as_first,
                      reference=lambda xs, a: [xs[0] * 2]))
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moec.errors import IRError
from moec.ir.types import TensorType

REQUIRED = object()  # marks an attribute without a default

InferFn = Callable[[list[TensorType], Mapping[str, Any]], list[TensorType]]
RefFn = Callable[[list[np.ndarray], Mapping[str, Any]], list[np.ndarray]]


@dataclass(frozen=True)
class OpDef:
    """An op: name `dialect.op`, operand count range, attributes (name -> default or REQUIRED),
    result type inference and numpy reference."""

    name: str
    arity: tuple[int, int]
    infer: InferFn
    reference: RefFn
    attrs: Mapping[str, Any] = field(default_factory=dict)
    doc: str = ""

    def check_attrs(self, attrs: Mapping[str, Any]) -> dict[str, Any]:
        """Return attrs with defaults filled in; raise IRError on unknown or missing ones."""
        unknown = sorted(set(attrs) - set(self.attrs))
        if unknown:
            raise IRError(f"{self.name}: unknown attribute(s) {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(self.attrs)) or 'none'}")
        out = {}
        for k, default in self.attrs.items():
            if k in attrs:
                if not _fits(default, attrs[k]):
                    raise IRError(f"{self.name}: attribute {k}={attrs[k]!r} is "
                                  f"{type(attrs[k]).__name__}, want {type(default).__name__} "
                                  f"(like the default {default!r})")
                out[k] = attrs[k]
            elif default is REQUIRED:
                raise IRError(f"{self.name}: missing required attribute {k}")
            else:
                out[k] = default
        return out


def _fits(default: Any, value: Any) -> bool:
    """Whether an attribute value has the kind of its default (bool, int, float, str); attributes
    without a default, or with None, are checked by the op's type inference."""
    if default is REQUIRED or default is None:
        return True
    if isinstance(default, (bool, np.bool_)):
        return isinstance(value, (bool, np.bool_))
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(default, int):
        return isinstance(value, numbers.Integral)
    if isinstance(default, float):
        return isinstance(value, numbers.Real)
    if isinstance(default, str):
        return isinstance(value, str)
    return True


_OPS: dict[str, OpDef] = {}


def register_op(op: OpDef) -> OpDef:
    if "." not in op.name:
        raise IRError(f"op name {op.name!r} must be dialect.op")
    _OPS[op.name] = op
    return op


def get_op(name: str) -> OpDef:
    _ensure_loaded()
    try:
        return _OPS[name]
    except KeyError:
        raise IRError(f"unknown op {name!r}; registered: {', '.join(sorted(_OPS))}") from None


def all_ops() -> dict[str, OpDef]:
    _ensure_loaded()
    return dict(_OPS)


def _ensure_loaded() -> None:
    # the built-in dialects register themselves on import
    from moec.ir import core_ops, kv_ops, moe_ops, nn_ops  # noqa: F401


def infer_types(op: str, operand_types: list[TensorType], attrs: Mapping[str, Any]
                ) -> tuple[dict[str, Any], list[TensorType]]:
    """Check arity and attributes, then infer result types. Returns (full attrs, types)."""
    d = get_op(op)
    lo, hi = d.arity
    if not lo <= len(operand_types) <= hi:
        want = str(lo) if lo == hi else f"{lo}..{hi}"
        raise IRError(f"{op}: takes {want} operands, got {len(operand_types)}")
    full = d.check_attrs(attrs)
    return full, d.infer(operand_types, full)
