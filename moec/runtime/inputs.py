"""Checking a call's inputs against the signature, and turning them into TVM tensors safely.

Why so careful: the TVM VM checks argument shapes itself, but its messages are misleading (a
wrong static dim is reported as a "strides ... compact array" mismatch), and the kernels assume
64-byte-aligned, compact buffers: a plain numpy array is usually only 16- or 32-byte aligned, and
vectorised code reading it can segfault (TVM_NOTES.md §5). So every input is checked here first,
and anything that is not exactly right is copied into an aligned, contiguous buffer of the
expected dtype. torch is never imported here: a torch tensor is recognised through
`sys.modules`, since if torch is not imported, no argument can be a torch tensor.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from functools import lru_cache
from types import ModuleType
from typing import Any

import numpy as np

from moec.errors import ArtifactError, InputError
from moec.runtime.dimexpr import parse_dim_expr
from moec.runtime.manifest import Signature, TensorSpec

ALIGNMENT = 64
"""Byte alignment TVM's generated code assumes for every tensor it is handed."""


def torch_module() -> ModuleType | None:
    """torch if this process already imported it, else None (never imports it)."""
    return sys.modules.get("torch")


def is_torch_tensor(x: Any) -> bool:
    torch = torch_module()
    return torch is not None and isinstance(x, torch.Tensor)


@lru_cache(maxsize=64)
def numpy_dtype(name: str) -> np.dtype:
    """numpy dtype for a manifest dtype name; bfloat16 and float8 come from ml_dtypes."""
    try:
        return np.dtype(name)
    except TypeError:
        import ml_dtypes  # noqa: PLC0415  (a TVM dependency; only needed for these dtypes)

        try:
            return np.dtype(getattr(ml_dtypes, name))
        except AttributeError:
            raise InputError(f"dtype {name!r} has no numpy equivalent") from None


def _category(dtype_name: str) -> str:
    if dtype_name.startswith(("float", "bfloat")):
        return "float"
    if dtype_name.startswith(("int", "uint")):
        return "int"
    return dtype_name  # "bool", "complex64", ...: only an exact match is accepted


def _dtype_name(x: Any) -> str:
    return str(x.dtype).removeprefix("torch.") if is_torch_tensor(x) else x.dtype.name


def _has_dtype(x: Any, name: str) -> bool:
    # Comparing dtype objects is much cheaper than building names; this runs on every call.
    if isinstance(x, np.ndarray):
        return x.dtype == numpy_dtype(name)
    return str(x.dtype) == "torch." + name


def describe(x: Any) -> str:
    """`a torch float64 tensor of shape (5, 64) on cpu`: how error messages show what was passed."""
    if is_torch_tensor(x) and x.is_nested:
        return f"a nested torch {_dtype_name(x)} tensor on {x.device}"
    if is_torch_tensor(x):
        return f"a torch {_dtype_name(x)} tensor of shape {tuple(x.shape)} on {x.device}"
    if isinstance(x, np.ndarray):
        return f"a numpy {x.dtype.name} array of shape {x.shape}"
    return f"a {type(x).__name__}"


def _limit_hint(name: str) -> str:
    return (
        f"; the limit on {name} is fixed when compiling: raise it with max_tokens= "
        f"(moec.compile) or --max-tokens (moec compile)"
    )


def bind_inputs(signature: Signature, inputs: Sequence[Any], named: dict[str, Any]
                ) -> tuple[Any, ...]:
    """The inputs of `model(*inputs, **named)` in signature order: keywords are matched to
    input names (`model(x=a)`), after the positional ones. InputError for an unknown name, a
    name given twice, or a gap."""
    if not named:
        return tuple(inputs)
    names = [s.name for s in signature.inputs]
    for n in named:
        if n not in names:
            raise InputError(f"the model has no input {n!r}; its inputs are "
                             f"{', '.join(names) or 'none'}")
        if names.index(n) < len(inputs):
            raise InputError(f"input {n!r} is given twice (by position and by name)")
    out = list(inputs)
    for n in names[len(inputs):]:
        if n not in named:
            missing = [m for m in names[len(inputs):] if m not in named]
            raise InputError(f"missing input(s) {', '.join(map(repr, missing))}: the model "
                             f"takes {', '.join(names)}")
        out.append(named[n])
    return tuple(out)


def check_inputs(signature: Signature, inputs: Sequence[Any]) -> dict[str, int]:
    """Validate inputs against the signature and return the symbolic dim values they bind.

    Raises InputError naming the input, what was given and what was expected."""
    specs = signature.inputs
    if len(inputs) != len(specs):
        expected = ", ".join(str(s) for s in specs) or "nothing"
        raise InputError(
            f"the model takes {len(specs)} input(s) ({expected}) but {len(inputs)} were given"
        )
    bound: dict[str, tuple[int, str, int]] = {}  # dim -> (value, input name, axis)
    exprs: list[tuple[str, int, TensorSpec, int, tuple[int, ...]]] = []  # checked once bound
    for spec, x in zip(specs, inputs, strict=True):
        if isinstance(x, np.generic):
            x = np.asarray(x)
        if not isinstance(x, np.ndarray) and not is_torch_tensor(x):
            raise InputError(
                f"input {spec.name!r} is {describe(x)}; pass a numpy array or a torch tensor "
                f"({spec.type_str()})"
            )
        if isinstance(x, np.ma.MaskedArray) and np.ma.is_masked(x):
            # the kernels would read the values under the mask as if they were not masked
            raise InputError(
                f"input {spec.name!r} is a masked numpy array with masked elements, and the "
                f"model cannot honour a mask; pass np.ma.filled(x, fill_value) or x.data "
                f"({spec.type_str()})"
            )
        if is_torch_tensor(x) and (x.is_nested or str(x.layout) != "torch.strided"):
            layout = "nested" if x.is_nested else str(x.layout).removeprefix("torch.")
            raise InputError(
                f"input {spec.name!r} is a {layout} torch tensor; pass a dense one "
                f"(.to_dense()) ({spec.type_str()})"
            )
        shape = tuple(int(d) for d in x.shape)
        if len(shape) != len(spec.shape):
            lead = spec.shape[0] if spec.shape else None
            hint = (
                f"; an input without its leading {lead} (one sequence) is taken as {lead}=1 "
                f"when every input with {lead} leaves it out"
                if isinstance(lead, str) and len(spec.shape) >= 3 else ""
            )
            raise InputError(
                f"input {spec.name!r} is {describe(x)} (rank {len(shape)}) but the model "
                f"expects rank {len(spec.shape)}: {spec.type_str()}{hint}"
            )
        for axis, (got, want) in enumerate(zip(shape, spec.shape, strict=True)):
            if isinstance(want, int):
                if got != want:
                    raise InputError(
                        f"input {spec.name!r} is {describe(x)} but the model expects "
                        f"{spec.type_str()}: dim {axis} is {got}, expected {want}"
                    )
            elif want not in signature.dims:  # an expression of dims, e.g. "B*S"
                exprs.append((want, got, spec, axis, shape))
            elif want in bound and bound[want][0] != got:
                other_value, other, other_axis = bound[want]
                raise InputError(
                    f"input {spec.name!r} has {want}={got} (dim {axis} of shape {shape}) but "
                    f"input {other!r} has {want}={other_value} (its dim {other_axis}); "
                    f"they must agree ({spec.type_str()})"
                )
            else:
                bound[want] = (got, spec.name, axis)
        if _has_dtype(x, spec.dtype):
            continue
        given, want_dtype = _dtype_name(x), spec.dtype
        convertible = _category(want_dtype) in ("float", "int")
        if _category(given) != _category(want_dtype) or not convertible:
            raise InputError(
                f"input {spec.name!r} has dtype {given} but the model expects {want_dtype} "
                f"({spec.type_str()}); only float->float and int->int are converted "
                f"automatically, cast it explicitly"
            )
    for name, (value, who, axis) in bound.items():
        dim = signature.dims[name]
        if value < dim.min:
            raise InputError(
                f"input {who!r} has {name}={value} (dim {axis}) but this model needs "
                f"{name} >= {dim.min}"
            )
        if dim.max is not None and value > dim.max:
            raise InputError(
                f"input {who!r} has {name}={value} (dim {axis}) but this model was compiled for "
                f"at most {name}={dim.max}" + _limit_hint(name)
            )
    env = {name: v[0] for name, v in bound.items()}
    for want, got, spec, axis, shape in exprs:
        expr = parse_dim_expr(want)
        missing = sorted(expr.names - set(env))
        if missing:
            raise InputError(
                f"input {spec.name!r} has dim {axis} = {want}, but no input gives "
                f"{missing[0]} on its own: this model cannot be called ({spec.type_str()})"
            )
        value = expr.evaluate(env)
        if value != got:
            given = ", ".join(f"{n}={env[n]}" for n in sorted(expr.names))
            raise InputError(
                f"input {spec.name!r} has dim {axis} = {got} (shape {shape}) but the model "
                f"expects {want} = {value} with {given} ({spec.type_str()})"
            )
    for lim in signature.limits:
        if not parse_dim_expr(lim.expr).names <= env.keys():
            continue  # no input gives these dims
        value = parse_dim_expr(lim.expr).evaluate(env)
        if value > lim.max:
            given = ", ".join(f"{n}={env[n]}" for n in sorted(parse_dim_expr(lim.expr).names))
            raise InputError(
                f"the inputs have {lim.expr} = {value} ({given}) but this model was compiled "
                f"for at most {lim.expr} = {lim.max} tokens" + _limit_hint(lim.expr)
            )
    return env


def batch_left_out(signature: Signature, inputs: Sequence[Any]) -> str | None:
    """The leading dim (`B`) that a call leaves out, else None: every input whose signature
    shape starts with that dynamic dim (and has rank 3 or more) is given without it, as one
    sequence (`[S, H]` for `[B, S, H]`), the eager block's reading of it. The call then runs
    with that dim 1 (`unbatch_outputs` drops it from the outputs again)."""
    if len(inputs) != len(signature.inputs):
        return None
    lead: str | None = None
    for spec, x in zip(signature.inputs, inputs, strict=True):
        ndim = getattr(x, "ndim", None)
        first = spec.shape[0] if spec.shape else None
        if ndim is None or not isinstance(first, str) or first not in signature.dims:
            continue
        if len(spec.shape) >= 3 and ndim == len(spec.shape) - 1:
            if lead not in (None, first):
                return None
            lead = first
    if lead is None or signature.dims[lead].min > 1:
        return None
    for spec, x in zip(signature.inputs, inputs, strict=True):
        uses = [i for i, d in enumerate(spec.shape) if isinstance(d, str) and (
            d == lead or lead in parse_dim_expr(d).names)]
        if uses and (uses != [0] or getattr(x, "ndim", None) != len(spec.shape) - 1):
            return None  # the dim appears elsewhere, or this input gives it: no guessing
    return lead


def add_batch(x: Any) -> Any:
    """x as a batch of one, a view: [S, H] -> [1, S, H]."""
    return x.unsqueeze(0) if is_torch_tensor(x) else np.asarray(x)[np.newaxis]


def unbatch_outputs(signature: Signature, lead: str, outs: Sequence[Any]) -> list[Any]:
    """Drop the left-out batch dim (size 1) from the outputs whose shape starts with it."""
    return [o[0] if spec.shape and spec.shape[0] == lead else o
            for spec, o in zip(signature.outputs, outs, strict=True)]


def check_ranges(signature: Signature, inputs: Sequence[Any], ranges: Any) -> None:
    """Refuse integer inputs outside the values the model takes: `ranges` (the manifest's
    `meta.input_ranges`, recorded at compile time) maps an input name to `[lo, hi)`. Token ids
    index an embedding table whose kernel would clamp an id outside it silently (the logits of
    the last row for 600 in a vocabulary of 512), so they are refused here, as transformers
    refuses them."""
    if not ranges:
        return
    if not isinstance(ranges, Mapping):
        raise ArtifactError(f"the manifest's meta.input_ranges is {type(ranges).__name__}, not "
                            f"a mapping: the artifact was edited or damaged, recompile the model")
    for spec, x in zip(signature.inputs, inputs, strict=True):
        r = ranges.get(spec.name)
        if r is None or _category(spec.dtype) != "int":
            continue
        if not (isinstance(r, list) and len(r) == 2 and all(type(v) is int for v in r)):
            raise ArtifactError(f"the manifest's meta.input_ranges[{spec.name!r}] is {r!r}, "
                                f"not [lo, hi): the artifact was edited or damaged, recompile it")
        if is_torch_tensor(x):
            if not x.numel():
                continue
            lo, hi = int(x.min()), int(x.max())
        else:
            x = np.asarray(x)
            if not x.size:
                continue
            lo, hi = int(x.min()), int(x.max())
        if lo < r[0] or hi >= r[1]:
            bad = lo if lo < r[0] else hi
            raise InputError(
                f"input {spec.name!r} holds {bad}, outside [{r[0]}, {r[1]}): its values index "
                f"a table of {r[1] - r[0]} rows (for token ids: the vocabulary), and ids "
                f"outside it are refused, not clamped ({spec.type_str()})"
            )


def _check_int_range(spec: TensorSpec, lo: int, hi: int, target: np.dtype) -> None:
    info = np.iinfo(target)
    if lo < info.min or hi > info.max:
        raise InputError(
            f"input {spec.name!r} holds values in [{lo}, {hi}], which do not fit the model's "
            f"{spec.dtype} ({spec.type_str()})"
        )


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised C-contiguous numpy array whose data starts on a 64-byte boundary."""
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + ALIGNMENT, dtype=np.uint8)
    start = (-raw.ctypes.data) % ALIGNMENT
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def on_cpu(device: Any) -> bool:
    """Whether a TVM device is the host CPU."""
    return device.dlpack_device_type() == 1  # DLPack's kDLCPU


def _is_aligned(ptr: int) -> bool:
    return ptr % ALIGNMENT == 0


def numpy_to_tvm(spec: TensorSpec, x: np.ndarray, tvm: ModuleType, device: Any) -> Any:
    """A TVM tensor for a checked numpy input: zero-copy when already right, else one copy."""
    want = numpy_dtype(spec.dtype)
    if _category(spec.dtype) == "int" and x.dtype != want and x.size:
        _check_int_range(spec, int(x.min()), int(x.max()), want)
    ok = (
        x.dtype == want
        and x.flags.c_contiguous
        # DLPack cannot export read-only arrays (e.g. np.frombuffer over bytes).
        and x.flags.writeable
        and _is_aligned(x.ctypes.data)
    )
    if not ok:
        # One pass does the cast, the compaction and the realignment.
        fresh = aligned_empty(x.shape, want)
        np.copyto(fresh, x, casting="unsafe")
        x = fresh
    if x.dtype.kind == "V":  # bfloat16 / float8 (ml_dtypes): numpy's DLPack takes plain dtypes
        from moec.runtime.weights import to_tvm as array_to_tvm  # noqa: PLC0415

        return array_to_tvm(x, device)  # zero-copy through the bits on a CPU
    if on_cpu(device):
        return tvm.runtime.from_dlpack(x)
    return tvm.runtime.tensor(x, device)


def torch_to_tvm(spec: TensorSpec, x: Any, tvm: ModuleType, device: Any) -> Any:
    """A TVM tensor for a checked torch input on the model's device: zero-copy via DLPack when
    it has the right dtype and is contiguous and aligned; otherwise one copy that is."""
    torch = torch_module()
    assert torch is not None
    # DLPack refuses tensors that require grad; detach() is free and shares the storage.
    t = x.detach()
    want = getattr(torch, spec.dtype)
    if _category(spec.dtype) == "int" and t.dtype != want and t.numel():
        _check_int_range(spec, int(t.min()), int(t.max()), numpy_dtype(spec.dtype))
    # A negative view (`_neg_view()`, what conj-like ops produce lazily) stores -x and only
    # flags the negation; DLPack exports the raw data, so it must be resolved by copying.
    if (t.dtype != want or not t.is_contiguous() or not _is_aligned(t.data_ptr())
            or t.is_neg()):
        # torch's allocator returns 64-byte-aligned memory, so a fresh tensor is aligned.
        fresh = torch.empty(tuple(t.shape), dtype=want, device=t.device)
        fresh.copy_(t)
        t = fresh
    return tvm.runtime.from_dlpack(t)


def to_tvm(spec: TensorSpec, x: Any, tvm: ModuleType, device: Any) -> Any:
    """Convert one input that `check_inputs` accepted."""
    from_torch = is_torch_tensor(x)
    if from_torch:
        model_dev = "cpu" if on_cpu(device) else "cuda"
        if x.device.type != model_dev:
            raise InputError(
                f"input {spec.name!r} is on {x.device} but the model runs on {model_dev}; "
                f"move it with .to({model_dev!r})"
            )
    shape = tuple(int(d) for d in x.shape)
    if 0 in shape:
        # Nothing to copy, and numpy gives empty arrays arbitrary (unaligned) data pointers.
        return tvm.runtime.empty(shape, spec.dtype, device)
    if from_torch:
        return torch_to_tvm(spec, x, tvm, device)
    return numpy_to_tvm(spec, np.asarray(x), tvm, device)
