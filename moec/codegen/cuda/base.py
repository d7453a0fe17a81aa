"""Shared pieces of the CUDA kernel library: the Kernel record, symbolic shapes, finishing a
scheduled PrimFunc (attributes, zero-size grid guard) and small TIR helpers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import tvm_ffi
from tvm import te, tirx
from tvm.s_tir.stmt import SBlock, SBlockRealize

from moec.errors import CodegenError

try:  # the CPU library owns the record; both libraries must hand the lowerer the same type
    from moec.codegen.kernels.base import Kernel
except ImportError:  # pragma: no cover - until the CPU library lands

    @dataclass
    class Kernel:  # type: ignore[no-redef]
        """A TIR kernel plus offline transforms of its constant weight operands.

        `arg_transforms[i]` maps operand i (a weight known at compile time) to the layout the
        kernel expects; the caller applies it once when it builds the module."""

        func: tirx.PrimFunc
        name: str
        arg_transforms: dict[int, Callable[[np.ndarray], np.ndarray]] = field(
            default_factory=dict)


Dim = int | str
FLOATS = ("float32", "float16", "bfloat16")
WARP = 32


def check_dtype(dtype: str, allowed: Sequence[str] = FLOATS) -> str:
    if dtype not in allowed:
        raise CodegenError(f"dtype {dtype!r} not supported here; expected one of {allowed}")
    return dtype


class Shapes:
    """Symbolic dims by name for one kernel: the same name is the same int64 var everywhere."""

    def __init__(self) -> None:
        self.vars: dict[str, tirx.Var] = {}

    def dim(self, d: Dim) -> tirx.PrimExpr:
        """A dim as int64 (static ones too: mixing int32 and int64 indices puts casts into
        block bindings, which then no longer count as affine for the schedule)."""
        if isinstance(d, str):
            if d not in self.vars:
                self.vars[d] = te.var(d, "int64")
            return self.vars[d]
        if not isinstance(d, int | np.integer) or d < 0:
            raise CodegenError(f"a dimension must be a non-negative int or a name, got {d!r}")
        return tirx.IntImm("int64", int(d))

    def shape(self, shape: Sequence[Dim]) -> tuple:
        return tuple(self.dim(d) for d in shape)


def numel(shape: Sequence) -> tirx.PrimExpr | int:
    """Product of dims; symbolic dims make it int64."""
    out: tirx.PrimExpr | int = 1
    for d in shape:
        out = out * d
    return out


def _grid_guard(node: tirx.For, exit_if: Callable[[tirx.Var], tirx.PrimExpr] | None) -> tirx.For:
    """blockIdx loop of extent e -> extent max(e, 1), and blocks past e return at once.

    The CUDA runtime refuses a launch whose grid has a zero dimension, which a symbolic token
    count of 0 produces; one idle block is launched instead. The guard is an early return, not
    an `if` around the body, because TVM cannot place __syncthreads inside a condition (a
    block-uniform return is safe with barriers). `exit_if(bx)` adds a condition of our own on
    blockIdx.x (the grouped GEMM leaves unused tiles with it)."""
    if node.kind != tirx.ForKind.THREAD_BINDING or node.thread_binding is None:
        return node
    tag = str(node.thread_binding.thread_tag)
    if not tag.startswith("blockIdx"):
        return node
    ext, conds = node.extent, []
    if not isinstance(ext, tirx.IntImm):
        conds.append(node.loop_var >= ext)
        ext = tirx.max(ext, tirx.const(1, str(ext.ty)))
    if exit_if is not None and tag == "blockIdx.x":
        conds.append(exit_if(node.loop_var))
    if not conds:
        return node
    cond = conds[0]
    for c in conds[1:]:
        cond = tirx.Or(cond, c)
    leave = tirx.IfThenElse(cond, tirx.Evaluate(tirx.op.thread_return()), None)
    return tirx.For(node.loop_var, node.min, ext, node.kind, tirx.SeqStmt([leave, node.body]),
                    node.thread_binding, node.annotations)


def finalize(func: tirx.PrimFunc, name: str,
             exit_if: Callable[[tirx.Var], tirx.PrimExpr] | None = None) -> tirx.PrimFunc:
    """Name a scheduled kernel, guard zero-size grids and keep Relax from touching it.

    `tirx.is_scheduled` stops the CUDA pipeline's dlight pass from rescheduling it and
    `op_pattern = 8` (opaque) stops FuseOps/FuseTIR from merging it with its neighbours."""
    func = tvm_ffi.structural_map(func, [(tirx.For, lambda n: _grid_guard(n, exit_if))])
    if not isinstance(func.body, SBlockRealize):
        # Hand-written kernels get the opaque root block that s_tir functions have: Relax
        # passes (RewriteDataflowReshape, op-pattern analysis) read every callee through it.
        func = func.with_body(SBlockRealize([], True, SBlock([], [], [], "root", func.body)))
    return func.with_attrs({"global_symbol": name, "tirx.noalias": True,
                            "tirx.is_scheduled": True, "op_pattern": 8})


def _expr(x) -> tirx.PrimExpr:
    return x.asobject() if isinstance(x, te.tensor.TensorSlice) else x


def f32(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """x as float32 (no-op when it already is)."""
    return cast(x, "float32")


def cast(x: tirx.PrimExpr, dtype: str) -> tirx.PrimExpr:
    x = _expr(x)
    return x if str(x.ty) == dtype else x.astype(dtype)


def ceildiv(a, b: int):
    return (a + (b - 1)) // b
