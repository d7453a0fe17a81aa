"""Translate a `torch.export` ExportedProgram (ATen ops, one `moec::moe_router` and one
`moec::moe_experts` call per recognised MoE block) into a moec IR graph.

- Parameters, buffers and lifted constants become graph parameters named by their module path;
  user inputs become graph inputs (dim 0 of floating-point inputs is the token dim `T`).
- ATen ops map to core ops (table `_HANDLERS`); the eager RMSNorm idiom
  `w * (x * rsqrt(mean(x^2, -1, keepdim) + eps))` (with optional casts) becomes `core.rmsnorm`;
  a transposed parameter feeding `mm`/`matmul`/`addmm` folds into `core.linear`.
- Each `moec::moe_block` call becomes the unfused moe form: `core.linear` (router) ->
  `core.softmax|sigmoid` -> `core.topk` [-> `core.sum` + `core.div`] -> `moe.experts`
  (or linear -> topk -> softmax for top-k-then-softmax routing).
- Every node's `loc` is the module path it came from. An op with no translation raises
  `UnsupportedError` naming the op, the module path and the source line.
- Only nodes that reach an output are translated, so dead code does not need a translation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import sympy
import torch
from torch import fx
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind
from torch.utils._sympy.functions import FloorDiv

from moec.errors import IRError, UnsupportedError
from moec.frontend.complex_translate import (
    Ones,
    fold_constant,
    materialize_ones,
    translate_complex,
)
from moec.frontend.fx_util import CASTS, describe, find_rmsnorms, live_nodes, module_path, op_name
from moec.ir import Graph, IRBuilder, Value
from moec.ir.types import DimLike, same_dim, same_shape

_DTYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16",
           torch.float64: "f64", torch.int32: "i32", torch.int64: "i64", torch.bool: "bool"}
_IDENTITY = {"aten.clone.default", "aten.contiguous.default", "aten.alias.default",
             "aten.detach.default", "aten.lift_fresh_copy.default"}
_RESHAPES = {"aten.view.default", "aten.reshape.default", "aten._unsafe_view.default",
             "aten.flatten.using_ints", "aten.unflatten.int", "aten.squeeze.dim",
             "aten.squeeze.dims", "aten.squeeze.default", "aten.unsqueeze.default",
             "aten.view_as.default", "aten.reshape_as.default"}
_UNARY = {"silu": "silu", "relu": "relu", "sigmoid": "sigmoid", "tanh": "tanh", "exp": "exp",
          "neg": "neg", "sqrt": "sqrt", "rsqrt": "rsqrt"}
_BINARY = {"add": "add", "sub": "sub", "mul": "mul", "div": "div", "maximum": "maximum",
           "minimum": "minimum"}


# ops on constants that keep their own translation (a transposed weight folds into core.linear)
_KEEP_CONST = {"aten.t", "aten.transpose", "aten.permute", "aten.numpy_T", "getitem"}


class _Const:
    """A parameter-like constant, added to the graph when first used; `base` is set when this is
    the transpose of a 2-D constant (so `mm(x, w.t())` can fold into `core.linear(x, w)`)."""

    __slots__ = ("name", "array", "base")

    def __init__(self, name: str, array: np.ndarray, base: _Const | None = None) -> None:
        self.name, self.array, self.base = name, array, base


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.float().numpy().astype(ml_dtypes.bfloat16)
    if t.dtype not in _DTYPES:
        raise UnsupportedError(f"tensor dtype {t.dtype} has no moec dtype")
    # a private copy (the user may change the module afterwards), made by torch: its copy is
    # several times faster than numpy's on fresh memory (2.4 GB of Qwen3 experts: 0.3 s vs 2.6 s)
    return t.clone(memory_format=torch.contiguous_format).numpy()


class _Translator:
    def __init__(self, ep: ExportedProgram, max_tokens: int,
                 input_dims: dict[str, dict[int, str]] | None = None,
                 dims: dict[str, tuple[int, int]] | None = None) -> None:
        self.ep = ep
        self.b = IRBuilder()
        self.T = self.b.dim("T", 0, max_tokens)
        # named symbolic dims beyond T: input name -> {axis: dim name}, bounds by name
        self.input_dims = input_dims or {}
        self.named = {name: self.b.dim(name, lo, hi) for name, (lo, hi) in (dims or {}).items()
                      if name != "T"}
        self.named["T"] = self.T
        self.env: dict[fx.Node, Any] = {}
        self.params: dict[str, Value] = {}
        self.syms: dict[sympy.Symbol, DimLike] = {}
        self.node: fx.Node | None = None
        self.nconst = 0
        self.in_complex = False  # translating one part of a complex op (complex_translate)

    # ------------------------------------------------------------------ helpers
    @property
    def loc(self) -> str | None:
        return module_path(self.node)[0] or None if self.node is not None else None

    def unsupported(self, what: str) -> UnsupportedError:
        assert self.node is not None
        return UnsupportedError(f"{what} {describe(self.node)}")

    def emit(self, op: str, operands: list[Value], attrs: dict[str, Any] | None = None,
             loc: str | None = None) -> Any:
        return self.b.op(op, operands, attrs, loc=loc or self.loc)

    def dim(self, d: Any) -> DimLike:
        if isinstance(d, int):
            return d
        return self._sympy(d.node.expr)

    def _sympy(self, e: sympy.Expr) -> DimLike:
        if e.is_Integer:
            return int(e)
        if e.is_Symbol:
            if e not in self.syms:
                raise self.unsupported(
                    f"symbolic size {e}, which is no dynamic dim of an input (a size the model "
                    f"computes from the data cannot be compiled)")
            return self.syms[e]
        parts = [self._sympy(a) for a in e.args]
        if isinstance(e, sympy.Add):
            out = parts[0]
            for p in parts[1:]:
                out = out + p
            return out
        if isinstance(e, sympy.Mul):
            out = parts[0]
            for p in parts[1:]:
                out = out * p
            return out
        if isinstance(e, FloorDiv):
            return parts[0] // parts[1]
        raise self.unsupported(f"symbolic size expression {e}")

    def meta(self, node: fx.Node) -> tuple[tuple[DimLike, ...], str]:
        val = node.meta["val"]
        if val.dtype == torch.complex64:  # the real and imaginary parts' type
            return tuple(self.dim(d) for d in val.shape), "f32"
        if val.dtype not in _DTYPES:
            raise self.unsupported(f"tensor of dtype {val.dtype} (from {op_name(node)})")
        return tuple(self.dim(d) for d in val.shape), _DTYPES[val.dtype]

    def const(self, c: _Const) -> Value:
        if c.name not in self.params:
            self.params[c.name] = self.b.param(c.name, c.array)
        return self.params[c.name]

    def scalar(self, value: float, dtype: str) -> Value:
        from moec.ir.types import numpy_dtype

        self.nconst += 1
        return self.const(_Const(f"const.{self.nconst - 1}",
                                 np.array(value, dtype=numpy_dtype(dtype))))

    def val(self, a: Any, dtype: str | None = None) -> Value:
        """An operand as a Value, cast to `dtype` when given."""
        if isinstance(a, fx.Node):
            a = self.env[a]
        if isinstance(a, _Const):
            a = self.const(a)
        elif isinstance(a, Ones):
            a = materialize_ones(self, a)
        elif isinstance(a, (bool, int, float)):
            return self.scalar(a, dtype or "f32")
        if not isinstance(a, Value):
            raise self.unsupported(f"operand {a!r} of {op_name(self.node)}")
        if dtype is not None and a.dtype != dtype:
            return self.emit("core.cast", [a], {"dtype": dtype})
        return a

    def arg(self, i: int, name: str, default: Any = None) -> Any:
        assert self.node is not None
        if i < len(self.node.args):
            return self.node.args[i]
        return self.node.kwargs.get(name, default)

    # ------------------------------------------------------------------ driver
    def run(self) -> Graph:
        graph = self.ep.graph
        self._placeholders(graph)
        live = live_nodes(graph)
        finals, interior = find_rmsnorms(graph, self._is_norm_weight)
        for n in graph.nodes:
            if n.op != "call_function" or n not in live or n in interior:
                continue
            self.node = n
            try:
                if n in finals:
                    out = self._rmsnorm_fused(*finals[n])
                else:
                    out = self._call(n)
            except IRError as e:
                raise self.unsupported(f"cannot translate {op_name(n)} ({e})") from e
            self._check(n, out)
            self.env[n] = out
        out_node = next(n for n in graph.nodes if n.op == "output")
        self.node = out_node
        outs = out_node.args[0]
        self.b.output(*[self.val(o) for o in (outs if isinstance(outs, (list, tuple))
                                              else [outs])])
        return self.b.graph

    def _is_norm_weight(self, n: fx.Node) -> bool:
        c = self.env.get(n)
        return isinstance(c, _Const) and c.array.ndim == 1

    def _placeholders(self, graph: fx.Graph) -> None:
        sig = self.ep.graph_signature
        specs = {s.arg.name: s for s in sig.input_specs}
        nodes = [n for n in graph.nodes if n.op == "placeholder"]
        for n in nodes:  # bind the token symbol(s) first
            s = specs[n.name]
            val = n.meta.get("val")
            if s.kind != InputKind.USER_INPUT or not isinstance(val, torch.Tensor):
                continue
            named = self.input_dims.get(n.name)
            if named is not None:  # the caller names each dynamic axis
                for axis, dim_name in named.items():
                    d = val.shape[axis]
                    if isinstance(d, torch.SymInt) and d.node.expr.is_Symbol:
                        self.syms[d.node.expr] = self.named[dim_name]
            # dim 0 of a float input (or of integer token ids) is T
            elif val.dim() > 0 and isinstance(val.shape[0], torch.SymInt):
                self.syms[val.shape[0].node.expr] = self.T
        for n in nodes:
            self.node = n
            s = specs[n.name]
            if s.kind in (InputKind.PARAMETER, InputKind.BUFFER):
                t = self.ep.state_dict[s.target] if s.target in self.ep.state_dict \
                    else self.ep.constants[s.target]
                self.env[n] = _Const(s.target, _to_numpy(t))
            elif s.kind == InputKind.CONSTANT_TENSOR:
                self.env[n] = _Const(s.target, _to_numpy(self.ep.constants[s.target]))
            elif s.kind == InputKind.USER_INPUT:
                if isinstance(n.meta.get("val"), torch.Tensor):
                    shape, dtype = self.meta(n)
                    self.env[n] = self.b.input(n.name, shape, dtype)
                else:
                    self.env[n] = n.meta.get("val")
            else:
                raise UnsupportedError(f"exported input {n.name} of kind {s.kind.name}")
        self.node = None

    def _check(self, n: fx.Node, out: Any) -> None:
        """The translation must give torch's shapes and dtypes: catches silent mistakes."""
        val = n.meta.get("val")
        outs, vals = (out, val) if isinstance(out, tuple) else ((out,), (val,))
        for o, v in zip(outs, vals, strict=False):
            if not isinstance(o, Value) or not isinstance(v, torch.Tensor):
                continue
            shape, dtype = self.meta_of(v)
            if o.dtype != dtype or not same_shape(o.shape, shape):
                raise self.unsupported(f"internal: {op_name(n)} translated to {o.type}, torch "
                                       f"has {dtype}{list(shape)}")

    def meta_of(self, v: torch.Tensor) -> tuple[tuple[DimLike, ...], str]:
        return tuple(self.dim(d) for d in v.shape), _DTYPES.get(v.dtype, str(v.dtype))

    def _call(self, n: fx.Node) -> Any:
        val = n.meta.get("val")
        if isinstance(val, (torch.SymInt, int)) and not isinstance(val, bool):
            return self.dim(val)
        if not self.in_complex:  # complex rotary math: (re, im) pairs of real values
            c = translate_complex(self, n)
            if c is not None:
                return c
        name = op_name(n)
        packet = name.rsplit(".", 1)[0]
        op = packet.split(".", 1)[-1]
        if packet not in _KEEP_CONST and name not in _IDENTITY and self._only_consts(n):
            folded = fold_constant(self, n, _Const)  # computed now, a constant of the graph
            if folded is not None:
                return folded
        if name in CASTS:
            return self.val(n.args[0], self.meta(n)[1])
        if name in _IDENTITY or (name == "aten.dropout.default" and not self.arg(2, "train")):
            return self.env[n.args[0]]
        if name in _RESHAPES or name == "aten.expand.default":
            return self._reshape(n)
        if packet.startswith("aten.") and op in _UNARY:
            return self.emit(f"core.{_UNARY[op]}", [self.val(n.args[0])])
        if packet.startswith("aten.") and op in _BINARY:
            return self._binary(n, _BINARY[op])
        handler = _HANDLERS.get(name) or _HANDLERS.get(packet)
        if handler is None:
            folded = fold_constant(self, n, _Const)  # every input a constant: compute it now
            if folded is not None:
                return folded
            raise self.unsupported(f"no moec translation for op {name}")
        return handler(self, n)

    def _only_consts(self, n: fx.Node) -> bool:
        """Whether every node `n` reads is a constant (nothing computed from inputs)."""
        def reads(a: Any) -> list[fx.Node]:
            if isinstance(a, fx.Node):
                return [a]
            if isinstance(a, (list, tuple)):
                return [x for b in a for x in reads(b)]
            return []

        nodes = reads(list(n.args)) + reads(list(n.kwargs.values()))
        return all(isinstance(self.env.get(a), (_Const, int, float, bool)) for a in nodes)

    # ------------------------------------------------------------------ op handlers
    def _binary(self, n: fx.Node, op: str) -> Value:
        a, b = n.args[0], n.args[1]
        dtype = self.meta(n)[1]
        alpha = n.kwargs.get("alpha", 1)
        if n.kwargs.get("rounding_mode") is not None:
            raise self.unsupported(f"{op_name(n)} with rounding_mode")
        if alpha != 1:
            b = b * alpha if isinstance(b, (int, float)) else self.emit(
                "core.scale", [self.val(b, dtype)], {"value": float(alpha)})
        if op in ("add", "sub") and isinstance(b, (int, float)) and b == 0:
            return self.val(a, dtype)
        if op == "mul":
            for t, s in ((a, b), (b, a)):
                if isinstance(s, (int, float)) and not isinstance(s, bool):
                    return self.emit("core.scale", [self.val(t, dtype)], {"value": float(s)})
        return self.emit(f"core.{op}", [self.val(a, dtype), self.val(b, dtype)])

    def _rsub(self, n: fx.Node) -> Value:
        dtype = self.meta(n)[1]
        return self.emit("core.sub", [self.val(n.args[1], dtype), self.val(n.args[0], dtype)])

    def _reciprocal(self, n: fx.Node) -> Value:
        x = self.val(n.args[0])
        return self.emit("core.div", [self.scalar(1.0, x.dtype), x])

    def _pow(self, n: fx.Node) -> Value:
        x, e = self.val(n.args[0]), n.args[1]
        if not isinstance(e, (int, float)):
            raise self.unsupported("pow with a tensor exponent")
        if e == 1:
            return x
        if e == 2:
            return self.emit("core.mul", [x, x])
        if e == 3:
            return self.emit("core.mul", [self.emit("core.mul", [x, x]), x])
        if e == 0.5:
            return self.emit("core.sqrt", [x])
        if e == -0.5:
            return self.emit("core.rsqrt", [x])
        if e == -1:
            return self.emit("core.div", [self.scalar(1.0, x.dtype), x])
        raise self.unsupported(f"pow with exponent {e} (moec has no core.pow)")

    def _gelu(self, n: fx.Node) -> Value:
        return self.emit("core.gelu", [self.val(n.args[0])],
                         {"approximate": n.kwargs.get("approximate", "none")})

    def _softmax(self, n: fx.Node) -> Value:
        dtype = self.meta(n)[1]
        x = self.val(n.args[0], dtype)
        return self.emit("core.softmax", [x], {"axis": int(n.args[1])})

    def _reduce(self, n: fx.Node) -> Value:
        op = "core.mean" if "mean" in op_name(n) else "core.sum"
        dims, keep = self.arg(1, "dim"), bool(self.arg(2, "keepdim", False))
        dims = [dims] if isinstance(dims, int) else dims
        if not dims or len(dims) != 1:
            raise self.unsupported(f"{op_name(n)} over dims {dims} (one axis only)")
        x = self.val(n.args[0], self.meta(n)[1])
        return self.emit(op, [x], {"axis": int(dims[0]), "keepdim": keep})

    def _linear(self, n: fx.Node) -> Value:
        ops = [self.val(n.args[0]), self.val(n.args[1])]
        b = self.arg(2, "bias")
        if b is not None:
            ops.append(self.val(b))
        return self.emit("core.linear", ops)

    def _matmul(self, n: fx.Node) -> Value:
        a, b = self.env[n.args[0]], self.env[n.args[1]]
        if isinstance(b, _Const) and b.base is not None:
            return self.emit("core.linear", [self.val(a), self.const(b.base)])
        bv = self.val(b)
        if bv.type.rank != 2:
            raise self.unsupported(f"{op_name(n)} with a rank-{bv.type.rank} right operand "
                                   "(core.matmul takes [K, N])")
        return self.emit("core.matmul", [self.val(a), bv])

    def _addmm(self, n: fx.Node) -> Value:
        bias, a, b = (self.env[x] for x in n.args[:3])
        if self.arg(3, "beta", 1) != 1 or self.arg(4, "alpha", 1) != 1:
            raise self.unsupported("addmm with beta/alpha != 1")
        if isinstance(b, _Const) and b.base is not None and isinstance(bias, _Const) \
                and bias.array.ndim == 1:
            return self.emit("core.linear", [self.val(a), self.const(b.base), self.const(bias)])
        mm = self.emit("core.matmul", [self.val(a), self.val(b)])
        return self.emit("core.add", [mm, self.val(bias, mm.dtype)])

    def _transpose(self, n: fx.Node) -> _Const | Value:
        c = self.env[n.args[0]]
        nd = c.array.ndim if isinstance(c, _Const) else self.val(c).type.rank
        name = op_name(n)
        if name.startswith("aten.permute"):
            perm = [int(p) % nd for p in n.args[1]]
        else:
            d0, d1 = (0, 1) if name.startswith("aten.t.") or nd < 2 else (
                int(n.args[1]) % nd, int(n.args[2]) % nd)
            perm = list(range(nd))
            if nd >= 2:
                perm[d0], perm[d1] = perm[d1], perm[d0]
        if not isinstance(c, _Const):  # an activation: a materialised core.permute_dims
            x = self.val(c)
            return x if perm == sorted(perm) else self.emit("core.permute_dims", [x],
                                                            {"perm": perm})
        arr = np.ascontiguousarray(c.array.transpose(perm))
        base = c if nd == 2 and perm == [1, 0] else None
        return _Const(f"{c.name}.T" if base else f"{c.name}.permuted", arr, base)

    def _reshape(self, n: fx.Node) -> Value:
        x = self.val(n.args[0])
        shape, _ = self.meta(n)
        if same_shape(shape, x.shape):
            return x
        if op_name(n) == "aten.expand.default":
            if x.type.rank != len(shape):
                raise self.unsupported("expand that adds dims")
            return self.emit("core.broadcast_to", [x], {"shape": [
                -1 if same_dim(d, e) else d for d, e in zip(shape, x.shape, strict=True)]})
        sym = [i for i, d in enumerate(shape) if not isinstance(d, int)]
        if len(sym) > 1:  # -1 stands for one dim only: name them (["B", "S", 64])
            target = [d if isinstance(d, int) else str(d) for d in shape]
        else:
            target = [-1 if i in sym else d for i, d in enumerate(shape)]
        return self.emit("core.reshape", [x], {"shape": target})

    def _clamp(self, n: fx.Node) -> Value:
        name = op_name(n)
        lo = self.arg(1, "min") if "clamp_max" not in name else None
        hi = self.arg(2, "max") if name.startswith("aten.clamp.") else (
            self.arg(1, "max") if "clamp_max" in name else None)
        for b in (lo, hi):
            if b is not None and not isinstance(b, (int, float)):
                raise self.unsupported(f"{name} with tensor bounds")
        return self.emit("core.clamp", [self.val(n.args[0])],
                         {"min": None if lo is None else float(lo),
                          "max": None if hi is None else float(hi)})

    def _norm_params(self, x: Value, w: Any, b: Any, need_bias: bool) -> list[Value]:
        h = x.shape[-1]
        if not isinstance(h, int):
            raise self.unsupported("normalisation over a symbolic dim")
        from moec.ir.types import numpy_dtype

        dt = numpy_dtype(x.dtype)
        loc = self.loc or "root"
        ops = [self.val(w, x.dtype) if w is not None
               else self.const(_Const(f"{loc}.norm_ones", np.ones(h, dt)))]
        if need_bias:
            ops.append(self.val(b, x.dtype) if b is not None
                       else self.const(_Const(f"{loc}.norm_zeros", np.zeros(h, dt))))
        return ops

    def _layer_norm(self, n: fx.Node) -> Any:
        x = self.val(n.args[0])
        if len(n.args[1]) != 1:
            raise self.unsupported("layer_norm over more than the last dim")
        eps = self.arg(4, "eps", 1e-5)
        ps = self._norm_params(x, self.arg(2, "weight"), self.arg(3, "bias"), True)
        y = self.emit("core.layernorm", [x, *ps], {"eps": float(eps)})
        return (y, None, None) if "native" in op_name(n) else y

    def _rms_norm(self, n: fx.Node) -> Value:
        x = self.val(n.args[0])
        if len(n.args[1]) != 1:
            raise self.unsupported("rms_norm over more than the last dim")
        eps = self.arg(3, "eps")
        if eps is None:
            eps = torch.finfo(n.args[0].meta["val"].dtype).eps
        ps = self._norm_params(x, self.arg(2, "weight"), None, False)
        return self.emit("core.rmsnorm", [x, *ps], {"eps": float(eps)})

    def _rmsnorm_fused(self, x: fx.Node, w: fx.Node, eps: float) -> Value:
        xv = self.val(x)
        y = self.emit("core.rmsnorm", [xv, self.val(w, xv.dtype)], {"eps": float(eps)})
        dtype = self.meta(self.node)[1]
        return y if y.dtype == dtype else self.emit("core.cast", [y], {"dtype": dtype})

    def _topk(self, n: fx.Node) -> tuple[Value, Value]:
        x = self.val(n.args[0])
        dim, largest = self.arg(2, "dim", -1), self.arg(3, "largest", True)
        if dim not in (-1, x.type.rank - 1) or not largest:
            raise self.unsupported("topk other than the largest along the last dim")
        vals, ids = self.emit("core.topk", [x], {"k": int(n.args[1])})
        return vals, self.emit("core.cast", [ids], {"dtype": "i64"})

    def _getitem(self, n: fx.Node) -> Any:
        src = self.env[n.args[0]]
        item = src[n.args[1]]
        if item is None:
            raise self.unsupported(f"result {n.args[1]} of {op_name(n.args[0])}")
        return item

    def _custom_args(self, n: fx.Node) -> dict[str, Any]:
        schema = n.target._schema
        return {arg.name: (n.args[i] if i < len(n.args) else n.kwargs.get(arg.name))
                for i, arg in enumerate(schema.arguments)}

    def _moe_router(self, n: fx.Node) -> tuple[Value, Value]:
        """moec::moe_router -> the unfused router (core ops, moe.select for a selection bias or
        grouped top-k), or moe.router itself for what has no unfused form (sparsemixer,
        capacity). fuse-gating fuses the unfused form back into moe.router."""
        a = self._custom_args(n)
        x = self.val(a["x"])
        rw = self.env[a["weight"]]
        loc = rw.name.rsplit(".", 1)[0] if isinstance(rw, _Const) else self.loc
        k, scoring, order = int(a["k"]), a["scoring"], a["order"]
        lb = self.val(a["logit_bias"]) if a["logit_bias"] is not None else None
        sb = self.val(a["select_bias"], "f32") if a["select_bias"] is not None else None
        groups = {"n_groups": int(a["n_groups"]), "topk_groups": int(a["topk_groups"]),
                  "group_score": a["group_score"]}
        if order == "sparsemixer" or int(a["capacity"]) > 0:
            attrs = {"k": k, "scoring": scoring, "order": order, "norm_topk": bool(a["norm_topk"]),
                     "scale": float(a["scale"]), "capacity": int(a["capacity"]),
                     "jitter_eps": float(a["jitter_eps"]), "logit_bias": lb is not None,
                     "select_bias": sb is not None, **groups}
            ops = [x, self.val(rw)] + [b for b in (lb, sb) if b is not None]
            w, ids = self.emit("moe.router", ops, attrs, loc=loc)
            return w, ids
        logits = self.emit("core.linear", [x, self.val(rw)] + ([lb] if lb is not None else []),
                           loc=loc)
        if logits.dtype != "f32":
            logits = self.emit("core.cast", [logits], {"dtype": "f32"})

        def score(v: Value) -> Value:
            if scoring == "softmax":
                return self.emit("core.softmax", [v], {"axis": -1})
            if scoring == "sqrt_softplus":
                return self.emit("core.sqrt", [self.emit("core.softplus", [v])])
            return self.emit("core.sigmoid", [v])

        if order == "score_topk":
            scores = score(logits)
            if sb is not None or groups["n_groups"] > 1:
                weights, ids = self.emit("moe.select", [scores] + ([sb] if sb is not None else []),
                                         {"k": k, "select_bias": sb is not None, **groups})
            else:
                weights, ids = self.emit("core.topk", [scores], {"k": k})
            if a["norm_topk"]:
                # plain w / sum(w) also for sigmoid (moe.router adds 1e-20 to that sum; sigmoid
                # scores are positive, so the two agree) keeps the pattern fuse-gating matches
                den = self.emit("core.sum", [weights], {"axis": -1, "keepdim": True})
                weights = self.emit("core.div", [weights, den])
        else:
            vals, ids = self.emit("core.topk", [logits], {"k": k})
            weights = score(vals)
        if float(a["scale"]) != 1.0:
            weights = self.emit("core.scale", [weights], {"value": float(a["scale"])})
        return weights, ids

    def _moe_experts(self, n: fx.Node) -> Value:
        a = self._custom_args(n)
        x = self.val(a["x"])
        gated = a["w_gate"] is not None
        names = ("w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down")
        operands = [self.val(a[w]) for w in names if a[w] is not None]
        attrs: dict[str, Any] = {"activation": a["activation"], "gated": gated,
                                 "bias": a["b_up"] is not None}
        if a["activation"] == "clamped_swiglu":
            attrs.update(alpha=float(a["alpha"]), limit=float(a["limit"]),
                         offset=1.0 if a["offset"] is None else float(a["offset"]))
        if a["weight_on"] != "output":
            attrs["weight_on"] = a["weight_on"]
        if a.get("identity_experts"):  # None when export leaves the default out
            attrs["identity_experts"] = int(a["identity_experts"])
        return self.emit("moe.experts", [x, self.val(a["weights"]), self.val(a["ids"]),
                                         *operands], attrs)


_HANDLERS: dict[str, Callable[[_Translator, fx.Node], Any]] = {
    "aten.rsub": _Translator._rsub,
    "aten.reciprocal": _Translator._reciprocal,
    "aten.pow.Tensor_Scalar": _Translator._pow,
    "aten.gelu": _Translator._gelu,
    "aten.softmax": _Translator._softmax,
    "aten._softmax": _Translator._softmax,
    "aten.mean.dim": _Translator._reduce,
    "aten.sum.dim_IntList": _Translator._reduce,
    "aten.linear": _Translator._linear,
    "aten.matmul": _Translator._matmul,
    "aten.mm": _Translator._matmul,
    "aten.addmm": _Translator._addmm,
    "aten.t": _Translator._transpose,
    "aten.transpose": _Translator._transpose,
    "aten.permute": _Translator._transpose,
    "aten.numpy_T": _Translator._transpose,
    "aten.clamp": _Translator._clamp,
    "aten.clamp_min": _Translator._clamp,
    "aten.clamp_max": _Translator._clamp,
    "aten.layer_norm": _Translator._layer_norm,
    "aten.native_layer_norm": _Translator._layer_norm,
    "aten.rms_norm": _Translator._rms_norm,
    "aten.topk": _Translator._topk,
    "getitem": _Translator._getitem,
    "moec.moe_router": _Translator._moe_router,
    "moec.moe_experts": _Translator._moe_experts,
}


from moec.frontend.nn_translate import NN_HANDLERS  # noqa: E402  (whole-model ops)

_HANDLERS.update(NN_HANDLERS)


def translate_exported(ep: ExportedProgram, *, max_tokens: int = 4096,
                       input_dims: dict[str, dict[int, str]] | None = None,
                       dims: dict[str, tuple[int, int]] | None = None) -> Graph:
    """Translate an exported program (see the module docstring) into an IR graph.

    `input_dims` names the symbolic axes of user inputs (`{"block_table": {0: "B", 1: "MB"}}`)
    and `dims` gives each name's bounds; inputs it does not list keep the default (dim 0 of
    every tensor input is the token dim `T`, 0..max_tokens)."""
    return _Translator(ep, max_tokens, input_dims, dims).run()
