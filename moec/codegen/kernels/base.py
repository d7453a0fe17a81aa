"""What every kernel builder returns, and the helpers they share.

Builders write hand-scheduled TVMScript (`@T.prim_func` over plain loops): loops are parallel
over rows / tiles, vectorised over the contiguous axis with a scalar tail, so a symbolic size
never turns a vector loop into a predicated scalar one (what an s_tir `split` of a symbolic
extent does). `finish` wraps the body in an empty root block for Relax (see there).

TVM 0.27 pitfalls that shape the code (each one crashed or miscompiled here):
- a TVMScript assignment `v = expr` inside a `T.vectorized` loop lowers to a scalar `Bind` that
  the vectorizer mis-handles (every lane gets lane 0's value). Inside vector loops, reuse values
  through `let` (an expression-level `tirx.Let`), never a statement binding;
- an expression holding a `let` must not appear twice in one tree (the var would be defined
  twice), and bf16 casts must not wrap one (their legalisation duplicates the operand);
- the simplifier folds `x != x` to false: test NaN with `isnan`;
- comparisons do not promote int32 to int64 (arithmetic does), so index math is kept in int64;
- scratch lives on the stack only if it is a default-scope `T.alloc_buffer` under 1 KiB: a
  `scope="local"` buffer, and a statement binding `v = expr` (a one-element local cell), become
  a `TVMBackendAllocWorkspace` call per parallel task, and LLVM then keeps neither accumulators
  nor indices in registers. Inside a Relax module that made the grouped GEMM 8x slower. Bind
  scalars with `v: T.let = expr`; `heap_scratch` lists what still goes to the heap.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from tvm import s_tir, tirx
from tvm.target import codegen

from moec.codegen.target import host_target
from moec.errors import CodegenError

Dim = int | str
Shape = Sequence[Dim]
ArgTransform = Callable[[np.ndarray], np.ndarray]

FLOAT_DTYPES = ("float32", "float16", "bfloat16")
OP_PATTERN_OPAQUE = 8  # relax OpPatternKind::kOpaque


@dataclass(frozen=True)
class Kernel:
    """A compiled-to-be TVM kernel in destination-passing style.

    `func` takes its inputs first, then its outputs (all buffers); its `global_symbol` is `name`.
    `arg_transforms[i]` is an offline transform (e.g. weight packing) that the caller applies at
    compile time to the constant passed as input `i`; the kernel expects the transformed array."""

    func: tirx.PrimFunc
    name: str
    arg_transforms: Mapping[int, ArgTransform] = field(default_factory=dict)


class Dims:
    """The symbolic dimensions of one builder: the same name always maps to the same int64 var,
    so that `("T", 64)` and `("T", 8)` share their token count."""

    def __init__(self) -> None:
        self._vars: dict[str, tirx.Var] = {}

    def var(self, name: str) -> tirx.Var:
        if not name.isidentifier():
            raise CodegenError(f"symbolic dimension name {name!r} is not an identifier")
        if name not in self._vars:
            self._vars[name] = tirx.Var(name, "int64")
        return self._vars[name]

    def dim(self, d: Dim) -> tirx.Expr:
        if isinstance(d, str):
            return self.var(d)
        if isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0:
            return i64(int(d))
        raise CodegenError(f"a dimension must be an int >= 0 or a name, got {d!r}")

    def shape(self, spec: Shape) -> list[tirx.Expr]:
        return [self.dim(d) for d in spec]


def i64(x: int | tirx.Expr) -> tirx.Expr:
    """`x` as an int64 expression (Python ints become int64 immediates)."""
    if isinstance(x, (int, np.integer)):
        return tirx.IntImm("int64", int(x))
    if str(x.ty.dtype) != "int64":
        return tirx.Cast("int64", x)
    return x


def static(x: tirx.Expr | int) -> int | None:
    """The value of a constant expression, or None if it is symbolic."""
    if isinstance(x, int):
        return x
    return int(x.value) if isinstance(x, tirx.IntImm) else None


def prod(xs: Sequence[tirx.Expr]) -> tirx.Expr:
    """Product of int64 expressions, folding constants (so static shapes stay static)."""
    const, out = 1, None
    for x in xs:
        v = static(x)
        if v is not None:
            const *= v
        else:
            out = i64(x) if out is None else out * i64(x)
    if out is None:
        return i64(const)
    return out if const == 1 else out * i64(const)


def ceildiv(a: tirx.Expr, b: int) -> tirx.Expr:
    a_static = static(a)
    if a_static is not None:
        return i64(-(-a_static // b))
    return (i64(a) + i64(b - 1)) // i64(b)


def normalize_axis(axis: int, rank: int, builder: str) -> int:
    if not -rank <= axis < rank:
        raise CodegenError(f"{builder}: axis {axis} is out of range for rank {rank}")
    return axis % rank


def check_dtype(builder: str, dtype: str, allowed: Sequence[str] = ("float32",)) -> str:
    if dtype not in allowed:
        raise CodegenError(f"{builder}: dtype {dtype!r} is not supported (supported: {allowed})")
    return dtype


HALF_WEIGHTS = ("float16", "bfloat16")  # weight dtypes a float32 GEMM widens as it reads them


def check_weight_dtype(builder: str, dtype: str, w_dtype: str | None) -> str:
    """The storage dtype of a GEMM's weights: `dtype` itself, or float16 / bfloat16 weights
    under float32 activations (widened in registers as they are read)."""
    if w_dtype is None or w_dtype == dtype:
        return dtype
    if dtype != "float32" or w_dtype not in HALF_WEIGHTS:
        raise CodegenError(f"{builder}: {w_dtype} weights with {dtype} activations are not "
                           f"supported (half weights take float32 activations: "
                           f"{HALF_WEIGHTS})")
    return w_dtype


@functools.cache
def _vector_bits() -> int:
    return 512 if codegen.llvm_cpu_has_features(["avx512f"], host_target(1)) else 256


def vector_lanes(dtype: str) -> int:
    """Lanes of one host SIMD register for `dtype`: loops are vectorised by this many elements.
    Kernels are built for the host CPU (the one `host_target()` describes)."""
    bits = int(re.sub(r"\D", "", dtype) or 32)
    return max(1, _vector_bits() // bits)


def let(value: tirx.Expr, body: Callable[[tirx.Var], tirx.Expr]) -> tirx.Expr:
    """`body(v)` with `v` bound to `value` once; safe inside vectorised loops (see module doc).

    An expression that contains a `let` must appear once in a tree (TIR rejects a var defined
    twice): to use such a value twice, bind it with another `let`."""
    var = tirx.Var("v", value.ty)
    return tirx.Let(var, value, body(var))


def heap_scratch(kernel: Kernel) -> list[tuple[str, int]]:
    """(buffer name, bytes) of every scratch buffer of `kernel` that TVM's CPU lowering places
    on the heap (`TVMBackendAllocWorkspace`) instead of the stack: the kernel run through TVM's
    default TIR pipeline for the host, as `tvm.compile` runs it."""
    import tvm

    tgt = host_target()
    target = tvm.target.Target(tgt).with_host(tvm.target.Target(tgt))
    mod = tvm.IRModule({kernel.name: kernel.func})
    pipeline, finalize_host, _ = tirx.get_default_tir_pipeline(target)
    with target:
        mod = finalize_host()(pipeline(tirx.transform.BindTarget(target)(mod)))
    text = mod.script()
    return [(name, int(nbytes)) for name, nbytes in re.findall(
        r"(\w+) = T\.decl_buffer\([^\n]*?data=T\.TVMBackendAllocWorkspace\(1, \w+, "
        r"T\.uint64\((\d+)\)", text)]


def kernel_name(*parts: object) -> str:
    """A C-identifier kernel name from the builder name and its parameters, so that equal
    parameters give equal names (callers may deduplicate kernels by name)."""
    text = "_".join(str(p) for p in parts if p is not None and p != "")
    text = text.replace("-", "m").replace(".", "p")
    return re.sub(r"[^0-9A-Za-z_]", "_", text)


PARALLEL_MIN_ELEMS = 16384  # a parallel loop moving fewer elements runs on the calling thread


def par_min(elems_per_iter: int | float) -> int:
    """`min_parallel` for `finish` when each iteration of a kernel's parallel loop touches about
    `elems_per_iter` elements: below PARALLEL_MIN_ELEMS in all, waking the thread pool costs
    more than the work (decode runs hundreds of such kernels per token)."""
    return max(2, int(PARALLEL_MIN_ELEMS // max(1.0, float(elems_per_iter))))


def _serial_when_small(func: tirx.PrimFunc, min_parallel: int) -> tirx.PrimFunc:
    """Every parallel loop of extent < min_parallel runs serially instead (a runtime branch:
    the loop body twice, definitions renamed by ConvertSSA): TVM's parallel launch wakes and
    joins every pool thread even for one iteration, which dominates a tiny kernel's time and
    stalls when the machine is busy."""
    import tvm
    import tvm_ffi

    def visit(node: tirx.For) -> tirx.Stmt:
        if node.kind != tirx.ForKind.PARALLEL:
            return node
        ext = node.extent
        if isinstance(ext, tirx.IntImm) and int(ext) >= min_parallel:
            return node
        serial = tirx.For(node.loop_var, node.min, ext, tirx.ForKind.SERIAL, node.body, None,
                          node.annotations)
        if isinstance(ext, tirx.IntImm):
            return serial
        # The branch reads its condition back from a one-element buffer: from `ext < 2` the
        # simplifier would conclude that a factor of ext is 0 in the serial copy and fold the
        # body's divisions by it into an error, although that copy then runs no iteration.
        flag = tirx.decl_buffer((1,), "bool", name="few_tasks")
        zero = tirx.const(0, "int32")
        return tirx.SeqStmt([
            tirx.AllocBuffer(flag),
            tirx.BufferStore(flag, ext < tirx.const(min_parallel, ext.ty), [zero]),
            tirx.IfThenElse(tirx.BufferLoad(flag, [zero]), serial, node)])

    func = tvm_ffi.structural_map(func, [(tirx.For, visit)])
    mod = tirx.transform.ConvertSSA()(tvm.IRModule({"f": func}))
    return mod["f"]


def finish(
    func: tirx.PrimFunc,
    name: str,
    drop: Sequence[str] = (),
    arg_transforms: Mapping[int, ArgTransform] | None = None,
    min_parallel: int = 1,
) -> Kernel:
    """Name the function, mark its buffers non-aliasing (lets LLVM keep accumulators in registers)
    and opaque to Relax fusion, and remove the parameters in `drop` (placeholders of optional
    operands the body never uses, since a TVMScript signature cannot vary). Parallel loops of
    fewer than `min_parallel` iterations run on the calling thread (`par_min` picks it from the
    work per iteration; the default 1 leaves every loop parallel: GEMMs, whose iterations are
    real work, keep it)."""
    if drop:
        # TVM 0.27 params are the buffers themselves (named as in the body), no buffer_map.
        params = [p for p in func.params if p.name not in drop]
        func = tirx.PrimFunc(params, func.body, func.ret_type, func.attrs)
    if min_parallel > 1:
        func = _serial_when_small(func, min_parallel)
    func = func.with_attr("global_symbol", name).with_attr("tirx.noalias", True)
    # Opaque to Relax, so that hand-scheduled kernels are never fused into generated ones; and
    # wrapped in an (empty) root block, because Relax's RewriteDataflowReshape aborts on a
    # called PrimFunc whose body is not a block realize.
    root = s_tir.SBlock([], [], [], "root", func.body)
    func = func.with_body(s_tir.SBlockRealize([], True, root))
    func = func.with_attr("op_pattern", OP_PATTERN_OPAQUE)
    return Kernel(func=func, name=name, arg_transforms=dict(arg_transforms or {}))
