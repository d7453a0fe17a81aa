"""Complex tensors in an exported program, translated as (real, imaginary) pairs of core values,
and constant folding of ops whose inputs are all constants.

Complex numbers reach moec's graphs through the rotary embeddings that DeepSeek-V2 and Llama 4
write with complex multiplication:

    freqs_cis = torch.polar(torch.ones_like(freqs), freqs)          # cos + i sin
    x_ = torch.view_as_complex(x.reshape(..., -1, 2))                # pairs as complex numbers
    out = torch.view_as_real(x_ * freqs_cis).flatten(-2)             # rotate, back to pairs

moec's IR has no complex dtype, so a complex value is a `Complex(re, im)` of two real values of
the same shape, and the ops on it become real ops: polar -> (r cos, r sin), complex products ->
(ac - bd, ad + bc), view_as_complex -> the two halves of the last axis, view_as_real -> their
interleaving, and data movement (reshape, unsqueeze, expand, permute, slice, casts between
complex dtypes) applied to both parts. Any other op on a complex value raises UnsupportedError.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import fx

from moec.frontend.fx_util import op_name
from moec.ir import Value


class Complex:
    """A complex tensor as two real values of one shape."""

    __slots__ = ("re", "im")

    def __init__(self, re: Value, im: Value) -> None:
        self.re, self.im = re, im


class Ones:
    """`ones_like(x)` of an activation, kept symbolic: `polar(ones_like(f), f)` needs no
    tensor of ones; anything else materialises it as x * 0 + 1."""

    __slots__ = ("like",)

    def __init__(self, like: Value) -> None:
        self.like = like


def is_complex_node(n: fx.Node) -> bool:
    v = n.meta.get("val")
    return isinstance(v, torch.Tensor) and v.is_complex()


def _touches_complex(tr: Any, n: fx.Node) -> bool:
    if is_complex_node(n):
        return True
    return any(isinstance(a, fx.Node) and isinstance(tr.env.get(a), Complex) for a in n.args)


_STRUCTURAL = {"aten.view.default", "aten.reshape.default", "aten._unsafe_view.default",
               "aten.unsqueeze.default", "aten.squeeze.dim", "aten.squeeze.dims",
               "aten.expand.default", "aten.permute.default", "aten.transpose.int",
               "aten.slice.Tensor", "aten.clone.default", "aten.contiguous.default",
               "aten.alias.default", "aten.flatten.using_ints"}
_CASTS = {"aten.to.dtype_layout", "aten.to.dtype", "aten._to_copy.default", "aten.to.device"}


def translate_complex(tr: Any, n: fx.Node) -> Any | None:
    """The translation of `n` if it involves complex values, else None."""
    name = op_name(n)
    if name == "aten.ones_like.default" and isinstance(tr.env.get(n.args[0]), Value) \
            and not n.kwargs.get("dtype"):
        return Ones(tr.env[n.args[0]])
    if not _touches_complex(tr, n):
        return None
    if name == "aten.polar.default":
        mag, ang = tr.env.get(n.args[0]), tr.val(n.args[1])
        re, im = tr.emit("core.cos", [ang]), tr.emit("core.sin", [ang])
        if not isinstance(mag, Ones):
            m = tr.val(n.args[0])
            re, im = tr.emit("core.mul", [m, re]), tr.emit("core.mul", [m, im])
        return Complex(re, im)
    if name == "aten.view_as_complex.default":
        x = tr.val(n.args[0])
        shape = [-1 if not isinstance(d, int) else d for d in x.shape[:-1]]
        parts = []
        for i in (0, 1):
            s = tr.emit("core.slice", [x], {"axis": x.type.rank - 1, "start": i, "stop": i + 1,
                                             "step": 1})
            parts.append(tr.emit("core.reshape", [s], {"shape": shape}))
        return Complex(*parts)
    if name == "aten.view_as_real.default":
        c = tr.env[n.args[0]]
        shape = [-1 if not isinstance(d, int) else d for d in c.re.shape] + [1]
        re = tr.emit("core.reshape", [c.re], {"shape": shape})
        im = tr.emit("core.reshape", [c.im], {"shape": shape})
        return tr.emit("core.concat", [re, im], {"axis": len(shape) - 1})
    if name == "aten.mul.Tensor":
        return _mul(tr, n)
    if name in _CASTS:
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor) and v.dtype != torch.complex64:
            raise tr.unsupported(f"{name} to {v.dtype} of a complex tensor")
        return tr.env[n.args[0]]
    if name in _STRUCTURAL:
        return _both(tr, n)
    if name == "aten._assert_tensor_metadata.default":
        return None
    raise tr.unsupported(f"no moec translation for op {name} on complex tensors (moec "
                         f"translates complex values for rotary embeddings: polar, "
                         f"view_as_complex/real, products, reshapes)")


def _both(tr: Any, n: fx.Node) -> Complex:
    """A data-movement op applied to the real and the imaginary part."""
    src = n.args[0]
    c = tr.env[src]
    outs = []
    tr.in_complex = True
    try:
        for part in (c.re, c.im):
            tr.env[src] = part
            outs.append(tr._call(n))
    finally:
        tr.env[src] = c
        tr.in_complex = False
    return Complex(*outs)


def _mul(tr: Any, n: fx.Node) -> Complex:
    a, b = (tr.env.get(x, x) if isinstance(x, fx.Node) else x for x in n.args[:2])
    if isinstance(a, Complex) and isinstance(b, Complex):
        re = tr.emit("core.sub", [tr.emit("core.mul", [a.re, b.re]),
                                  tr.emit("core.mul", [a.im, b.im])])
        im = tr.emit("core.add", [tr.emit("core.mul", [a.re, b.im]),
                                  tr.emit("core.mul", [a.im, b.re])])
        return Complex(re, im)
    c, s = (a, b) if isinstance(a, Complex) else (b, a)
    if isinstance(s, (int, float)) and not isinstance(s, bool):
        if s == 1:
            return c
        return Complex(tr.emit("core.scale", [c.re], {"value": float(s)}),
                       tr.emit("core.scale", [c.im], {"value": float(s)}))
    if isinstance(s, complex):
        raise tr.unsupported("a product with a complex Python scalar")
    sv = tr.val(s)
    return Complex(tr.emit("core.mul", [c.re, sv]), tr.emit("core.mul", [c.im, sv]))


def materialize_ones(tr: Any, o: Ones) -> Value:
    zero = tr.emit("core.scale", [o.like], {"value": 0.0})
    return tr.emit("core.add", [zero, tr.scalar(1.0, o.like.dtype)])


# --------------------------------------------------------------------------- constant folding

_NO_FOLD = ("empty", "rand", "normal", "uniform", "bernoulli", "dropout")


def fold_constant(tr: Any, n: fx.Node, const_type: type) -> Any | None:
    """Evaluate `n` at compile time when every tensor it reads is a constant and its result
    has a static shape (`arange(0, 8, 2)` in a rotary init, arithmetic on buffers); returns
    the constant(s), or None when the node cannot be folded."""
    name = op_name(n)
    if any(k in name for k in _NO_FOLD) or not callable(n.target):
        return None
    val = n.meta.get("val")
    vals = val if isinstance(val, (tuple, list)) else (val,)
    if not all(isinstance(v, torch.Tensor) and all(isinstance(d, int) for d in v.shape)
               for v in vals):
        return None
    ok = True

    def arg(a: Any) -> Any:
        nonlocal ok
        if isinstance(a, fx.Node):
            v = tr.env.get(a)
            if isinstance(v, const_type):
                return _as_torch(v.array)
            if isinstance(v, (int, float, bool)):
                return v
            ok = False
            return None
        if isinstance(a, (list, tuple)):
            return type(a)(arg(x) for x in a)
        return a

    args = [arg(a) for a in n.args]
    kwargs = {k: arg(v) for k, v in n.kwargs.items()}
    if not ok:
        return None
    with torch.no_grad():
        out = n.target(*args, **kwargs)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    if not all(isinstance(o, torch.Tensor) for o in outs):
        return None
    from moec.frontend.aten_translate import _to_numpy

    tr.nconst += 1
    made = [const_type(f"const.{n.name}.{i}", _to_numpy(o)) for i, o in enumerate(outs)]
    return tuple(made) if isinstance(out, (tuple, list)) else made[0]


def _as_torch(a: np.ndarray) -> torch.Tensor:
    if a.dtype.kind == "V":  # bfloat16 through ml_dtypes
        return torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))
