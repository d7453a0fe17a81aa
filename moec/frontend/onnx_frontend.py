"""ONNX model -> moec IR: standard ops and ONNX Runtime's `com.microsoft` `MoE` contrib op.

    from moec.frontend.onnx_frontend import from_onnx
    graph = from_onnx("model.onnx", max_tokens=4096)      # or an onnx.ModelProto

Dim 0 of every floating-point graph input is the token count `T` (dynamic, 0..max_tokens); the
other dims of every input must be static. Initializers become parameters under their own names.
A node whose inputs are all constants (initializers, `Constant` nodes, folded nodes) is folded
with onnx's reference evaluator, so shape arithmetic on weights never reaches the IR.

The `MoE` op (ONNX Runtime's contrib schema: `input [T, H]`, `router_probs [T, E]` (logits),
`fc1 [E, f*I, H]`, `fc2 [E, H, I]`, optional `fc3 [E, I, H]` and biases; attributes `k`,
`activation_type`, `normalize_routing_weights`, `swiglu_fusion`, `activation_alpha/beta`,
`swiglu_limit`, `use_sparse_mixer`) becomes the unfused moe form: `core.softmax -> core.topk
[-> core.sum, core.div] -> moe.experts`, with fused gate/up weights split (interleaved or halves)
into moec's `w_gate`/`w_up [E, I, H]`. Sparse-mixer routing becomes `moe.router` with
`order=sparsemixer` over the given logits (an identity router weight). A 3-D `[B, S, H]` input is
flattened around the experts. `QMoE` (integer 8/4/2-bit experts, symmetric or with zero points,
per-row or block-wise scales) is dequantised at compile time exactly as ONNX Runtime defines it,
`(q - zero_point) * scale`, into fp32 expert weights, and where moec's quantised kernels read
the same values (8-bit symmetric, 4-bit) their exact parts go to `Graph.quant_forms`, which
quantize-experts (appended by `moec.compile`) puts on `moe.grouped_matmul_q`; 2-bit and 8-bit
with zero points stay fp32 experts. Nothing is approximated. MoE attributes and inputs moec
does not implement (e.g. `num_shared_experts`, `router_weights`) are refused by name, never
ignored. The full table is docs/frontend.md (the form checks: moec/frontend/onnx_moe.py).

Every node whose op moec cannot translate is collected first; one `UnsupportedError` lists them
all (op type and node names), so a model needs one run to see everything that is missing.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from moec.errors import UnsupportedError
from moec.frontend.onnx_dense_moe import find_dense_moe, node_key
from moec.frontend.onnx_moe import MOE_INPUTS as _MOE_INPUTS
from moec.frontend.onnx_moe import QMOE_INPUTS as _QMOE_INPUTS
from moec.frontend.onnx_moe import Skip as _Skip
from moec.frontend.onnx_moe import check_layout as _check_layout
from moec.frontend.onnx_moe import dequantize as _dequantize
from moec.frontend.onnx_moe import exact_form as _exact_form
from moec.frontend.onnx_moe import moe_form_problems as _moe_form_problems
from moec.ir import Graph
from moec.ir.builder import IRBuilder
from moec.ir.graph import Value
from moec.ir.types import FLOAT_DTYPES

__all__ = ["SUPPORTED_OPS", "from_onnx"]

# ONNX TensorProto element types -> moec dtypes
_ONNX_DTYPES = {1: "f32", 10: "f16", 16: "bf16", 11: "f64", 6: "i32", 7: "i64", 3: "i8",
                2: "u8", 9: "bool"}
_UNARY = {"Relu": "core.relu", "Sigmoid": "core.sigmoid", "Tanh": "core.tanh", "Exp": "core.exp",
          "Neg": "core.neg", "Sqrt": "core.sqrt", "Sin": "core.sin", "Cos": "core.cos"}
_BINARY = {"Add": "core.add", "Sub": "core.sub", "Mul": "core.mul", "Div": "core.div",
           "Max": "core.maximum", "Min": "core.minimum"}
_MOE_DOMAIN = "com.microsoft"


def _load(model: Any) -> Any:
    import onnx

    if isinstance(model, (str, Path)):
        return onnx.load(str(model))
    if isinstance(model, onnx.ModelProto):
        return model
    raise UnsupportedError(f"from_onnx takes a path or an onnx.ModelProto, got {type(model)}")


def _attrs(node: Any) -> dict[str, Any]:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _where(node: Any) -> str:
    return f"'{node.name}'" if node.name else f"(unnamed, output '{node.output[0]}')"


class _Translator:
    def __init__(self, model: Any, max_tokens: int) -> None:
        import onnx.numpy_helper as nh

        self.model = model
        self.g = model.graph
        self.opset = {o.domain or "": o.version for o in model.opset_import}
        self.b = IRBuilder()
        self.T = self.b.dim("T", 0, max_tokens)
        self.consts: dict[str, np.ndarray] = {i.name: nh.to_array(i) for i in self.g.initializer}
        self.env: dict[str, Value] = {}
        self.params: dict[str, Value] = {}
        self.pnames: set[str] = set()
        self.node: Any = None

        self.dense = {m.output: m for m in find_dense_moe(self.g, self.consts)}
        self.replaced = set().union(*(m.nodes for m in self.dense.values()))

    # ------------------------------------------------------------------ helpers
    def pname(self, name: str) -> str:
        base = re.sub(r"[^A-Za-z0-9_.]", "_", name).strip("._") or "const"
        if not re.match(r"[A-Za-z_]", base):
            base = "p_" + base
        out, i = base, 1
        while out in self.pnames:
            out, i = f"{base}.{i}", i + 1
        self.pnames.add(out)
        return out

    def val(self, name: str) -> Value:
        if name in self.env:
            return self.env[name]
        if name in self.consts:
            if name not in self.params:
                self.params[name] = self.b.param(self.pname(name), self.consts[name])
            return self.params[name]
        raise UnsupportedError(f"ONNX value '{name}' is used before it is defined")

    def new_param(self, suffix: str, data: np.ndarray) -> Value:
        base = self.node.name or self.node.output[0]
        return self.b.param(self.pname(f"{base}.{suffix}"), data)

    def emit(self, op: str, operands: list[Value], attrs: dict[str, Any] | None = None) -> Any:
        loc = self.node.name or None if self.node is not None else None
        return self.b.op(op, operands, attrs, loc=loc)

    def const_input(self, i: int, what: str) -> np.ndarray | None:
        n = self.node
        if len(n.input) <= i or not n.input[i]:
            return None
        if n.input[i] not in self.consts:
            raise _Skip(f"{what} must be a constant")
        return self.consts[n.input[i]]

    def is_const(self, name: str) -> bool:
        return not name or name in self.consts

    # ------------------------------------------------------------------ driver
    def inputs(self) -> None:
        for vi in self.g.input:
            if vi.name in self.consts:
                continue
            tt = vi.type.tensor_type
            dtype = _ONNX_DTYPES.get(tt.elem_type)
            if dtype is None:
                raise UnsupportedError(f"input '{vi.name}': element type {tt.elem_type} has no "
                                       "moec dtype")
            dims: list[Any] = []
            for i, d in enumerate(tt.shape.dim):
                if i == 0 and dtype in FLOAT_DTYPES:
                    dims.append(self.T)
                elif d.HasField("dim_value"):
                    dims.append(int(d.dim_value))
                else:
                    raise UnsupportedError(
                        f"input '{vi.name}': dim {i} is dynamic ({d.dim_param or '?'}); only dim "
                        "0 of float inputs (the token dim) may be dynamic; export with static "
                        "sizes for the others")
            self.env[vi.name] = self.b.input(self.pname(vi.name), dims, dtype)

    def check(self) -> None:
        """Collect every node moec cannot translate (by op type), then raise once."""
        missing: dict[str, list[str]] = {}
        const = set(self.consts)
        for n in self.g.node:
            key = f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
            if n.op_type == "Constant" or (n.domain in ("", "ai.onnx")
                                           and all(not i or i in const for i in n.input)):
                const.update(n.output)
                continue
            if node_key(n) in self.replaced:
                continue
            if key not in _HANDLERS:
                missing.setdefault(key, []).append(_where(n))
            elif n.domain == _MOE_DOMAIN and n.op_type in ("MoE", "QMoE"):
                inputs = {i.name for i in self.g.input}
                for problem in _moe_form_problems(n, set(self.consts), inputs):
                    missing.setdefault(f"{key} ({problem})", []).append(_where(n))
        if missing:
            raise UnsupportedError(_missing_message(missing))

    def run(self) -> Graph:
        self.check()
        self.inputs()
        skipped: dict[str, list[str]] = {}
        for n in self.g.node:
            self.node = n
            key = f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
            if n.op_type == "Constant" or (n.domain in ("", "ai.onnx")
                                           and all(self.is_const(i) for i in n.input)):
                self.fold(n)
                continue
            if node_key(n) in self.replaced:
                if n.output[0] in self.dense:
                    self.env[n.output[0]] = self._dense_moe(self.dense[n.output[0]])
                continue
            try:
                out = _HANDLERS[key](self, n)
            except _Skip as e:
                skipped.setdefault(f"{key} ({e})", []).append(_where(n))
                continue
            outs = out if isinstance(out, tuple) else (out,)
            for name, v in zip(n.output, outs, strict=False):
                if name:
                    self.env[name] = v
        self.node = None
        if skipped:
            raise UnsupportedError(_missing_message(skipped))
        for o in self.g.output:
            self.b.output(self.val(o.name))
        return self.b.graph

    def fold(self, n: Any) -> None:
        from onnx.reference import ReferenceEvaluator

        if n.op_type == "Constant":
            import onnx

            for a in n.attribute:
                if a.name == "value":
                    self.consts[n.output[0]] = onnx.numpy_helper.to_array(a.t)
                    return
                self.consts[n.output[0]] = np.asarray(onnx.helper.get_attribute_value(a))
            return
        import onnx

        ins = [i for i in n.input if i]
        g = onnx.helper.make_graph(
            [n], "fold", [onnx.helper.make_tensor_value_info(i, 0, None) for i in ins],
            [onnx.helper.make_tensor_value_info(o, 0, None) for o in n.output if o])
        m = onnx.helper.make_model(g, opset_imports=self.model.opset_import)
        res = ReferenceEvaluator(m).run(None, {i: self.consts[i] for i in ins})
        for o, r in zip([o for o in n.output if o], res, strict=True):
            self.consts[o] = np.asarray(r)

    # ------------------------------------------------------------------ standard ops
    def _identity(self, n: Any) -> Value:
        return self.val(n.input[0])

    def _unary(self, n: Any) -> Value:
        return self.emit(_UNARY[n.op_type], [self.val(n.input[0])])

    def _binary(self, n: Any) -> Value:
        if len(n.input) != 2:
            raise _Skip(f"{len(n.input)} operands")
        return self.emit(_BINARY[n.op_type], [self.val(n.input[0]), self.val(n.input[1])])

    def _reciprocal(self, n: Any) -> Value:
        x = self.val(n.input[0])
        one = self.new_param("one", np.array(1, dtype=np.dtype(_np(x.dtype))))
        return self.emit("core.div", [one, x])

    def _gelu(self, n: Any) -> Value:
        approx = _attrs(n).get("approximate", b"none")
        approx = approx.decode() if isinstance(approx, bytes) else approx
        return self.emit("core.gelu", [self.val(n.input[0])], {"approximate": approx})

    def _matmul(self, n: Any) -> Value:
        a = self.val(n.input[0])
        if n.input[1] in self.consts:
            w = self.consts[n.input[1]]
            if w.ndim != 2:
                raise _Skip("constant B must be 2-D")
            # x @ W as core.linear(x, W^T): the router form fuse-gating folds into moe.router
            return self.emit("core.linear", [a, self.new_param("weight", np.ascontiguousarray(
                w.T))])
        b = self.val(n.input[1])
        if b.type.rank != 2:
            raise _Skip("B must be 2-D")
        return self.emit("core.matmul", [a, b])

    def _gemm(self, n: Any) -> Value:
        at = _attrs(n)
        if at.get("transA", 0):
            raise _Skip("transA=1")
        w = self.const_input(1, "B")
        c = self.const_input(2, "C")
        w = w if at.get("transB", 0) else w.T
        w = np.ascontiguousarray(w * np.asarray(at.get("alpha", 1.0), w.dtype))
        ops = [self.val(n.input[0]), self.new_param("weight", w)]
        if c is not None:
            c = np.broadcast_to(c * np.asarray(at.get("beta", 1.0), c.dtype), (w.shape[0],))
            ops.append(self.new_param("bias", np.ascontiguousarray(c)))
        return self.emit("core.linear", ops)

    def _softmax(self, n: Any) -> Value:
        axis = _attrs(n).get("axis", -1 if self.opset.get("", 13) >= 13 else 1)
        x = self.val(n.input[0])
        if axis % x.type.rank != x.type.rank - 1 and self.opset.get("", 13) < 13:
            raise _Skip("opset < 13 softmax over more than the last axis")
        return self.emit("core.softmax", [x], {"axis": axis})

    def _topk(self, n: Any) -> tuple[Value, Value]:
        at = _attrs(n)
        x = self.val(n.input[0])
        if at.get("axis", -1) % x.type.rank != x.type.rank - 1 or not at.get("largest", 1):
            raise _Skip("only the largest values along the last axis")
        k = self.const_input(1, "K") if len(n.input) > 1 else np.array(at["k"])
        vals, ids = self.emit("core.topk", [x], {"k": int(np.asarray(k).reshape(-1)[0])})
        return vals, self.emit("core.cast", [ids], {"dtype": "i64"})

    def _reduce(self, n: Any) -> Value:
        at = _attrs(n)
        axes = at.get("axes")
        if len(n.input) > 1 and n.input[1]:
            axes = self.const_input(1, "axes")
        x = self.val(n.input[0])
        if axes is None or len(np.asarray(axes).reshape(-1)) != 1:
            raise _Skip("reduction over exactly one axis")
        op = "core.sum" if n.op_type == "ReduceSum" else "core.mean"
        return self.emit(op, [x], {"axis": int(np.asarray(axes).reshape(-1)[0]),
                                   "keepdim": bool(at.get("keepdims", 1))})

    def _reshape(self, n: Any) -> Value:
        x = self.val(n.input[0])
        shape = [int(d) for d in self.const_input(1, "shape")]
        if _attrs(n).get("allowzero", 0) and 0 in shape:
            raise _Skip("allowzero=1 with a 0 in the shape")
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
        sym = [i for i, d in enumerate(dims) if not isinstance(d, int)]
        if len(sym) > 1 or (sym and -1 in dims):
            raise _Skip("a target shape with more than one dynamic dim")
        return self.emit("core.reshape", [x], {"shape": [-1 if i in sym else d
                                                         for i, d in enumerate(dims)]})

    def _transpose(self, n: Any) -> Value:
        x = self.val(n.input[0])
        perm = _attrs(n).get("perm", list(range(x.type.rank))[::-1])
        return self.emit("core.permute_dims", [x], {"perm": [int(p) for p in perm]})

    def _cast(self, n: Any) -> Value:
        to = _ONNX_DTYPES.get(_attrs(n)["to"])
        if to is None:
            raise _Skip(f"cast to element type {_attrs(n)['to']}")
        return self.emit("core.cast", [self.val(n.input[0])], {"dtype": to})

    def _norm(self, n: Any) -> Value:
        at = _attrs(n)
        x = self.val(n.input[0])
        if at.get("axis", -1) % x.type.rank != x.type.rank - 1:
            raise _Skip("normalisation over more than the last axis")
        if len([o for o in n.output if o]) > 1:
            raise _Skip("mean / inv-std-dev outputs")
        w = self.val(n.input[1])
        eps = float(at.get("epsilon", 1e-5))
        if n.op_type == "LayerNormalization":
            if len(n.input) > 2 and n.input[2]:
                bias = self.val(n.input[2])
            else:
                bias = self.new_param("bias", np.zeros(w.shape, _np(w.dtype)))
            return self.emit("core.layernorm", [x, w, bias], {"eps": eps})
        return self.emit("core.rmsnorm", [x, w], {"eps": eps})

    # ------------------------------------------------------------------ com.microsoft MoE
    def _moe(self, n: Any) -> Value:
        fc1, b1, fc2, b2, fc3, b3 = (self.const_input(i, _MOE_INPUTS[i]) for i in range(2, 8))
        return self._moe_experts(n, _attrs(n), fc1, b1, fc2, b2, fc3, b3)

    def _qmoe(self, n: Any) -> Value:
        """QMoE: the integer-quantised experts are dequantised here, exactly as ONNX Runtime
        defines it (`(q - zero_point) * scale`), into fp32 expert weights; see `_dequantize`."""
        at = _attrs(n)
        bits = int(at.get("expert_weight_bits", 4))
        block = int(at.get("block_size", 0) or 0)
        const = {i: self.const_input(i, _QMOE_INPUTS[i]) for i in range(2, 14)}
        ws, forms = [], {}
        for fc, (wi, si, zi) in (("fc1", (2, 3, 11)), ("fc2", (5, 6, 12)), ("fc3", (8, 9, 13))):
            q = const[wi]
            if q is None:
                ws.append(None)
                continue
            if const[si] is None:
                raise _Skip(f"{_QMOE_INPUTS[si]} missing")
            fc_bits = int(at.get(f"{fc}_expert_weight_bits", bits))
            ws.append(_dequantize(q, const[si], const[zi], fc_bits, block, fc))
            forms[fc] = _exact_form(q, const[si], const[zi], fc_bits, block)
        return self._moe_experts(n, at, ws[0], const[4], ws[1], const[7], ws[2], const[10],
                                 forms)

    def _moe_experts(self, n: Any, at: dict[str, Any], fc1: np.ndarray, b1: np.ndarray | None,
                     fc2: np.ndarray, b2: np.ndarray | None, fc3: np.ndarray | None,
                     b3: np.ndarray | None, forms: dict[str, Any] | None = None) -> Value:
        """moe.experts for ORT's MoE form; `forms`: fc name -> its exact quantised form (or
        None), recorded in `graph.quant_forms` for the expert weights split from it."""
        act = at.get("activation_type", b"relu")
        act = act.decode() if isinstance(act, bytes) else act
        k = int(at.get("k", 1))
        fusion = int(at.get("swiglu_fusion", 0))
        alpha = float(at.get("activation_alpha", 1.0))
        beta = float(at.get("activation_beta", 0.0))
        limit = at.get("swiglu_limit")
        x, logits = self.val(n.input[0]), self.val(n.input[1])
        H, E = x.shape[-1], logits.shape[-1]
        if x.type.rank not in (2, 3) or logits.type.rank not in (2, 3):
            raise _Skip(f"input {x.type} / router_probs {logits.type}: want [T, H] or "
                        "[B, S, H] and [T, E]")
        _check_layout(n, fc1, fc2, fc3, b1, b2, b3, H, E, act == "swiglu" and fusion in (1, 2))
        attrs: dict[str, Any] = {}
        if act == "swiglu":
            if fusion == 0:
                if fc3 is None:
                    raise _Skip("swiglu_fusion=0 without fc3_experts_weights")
                wg, wu, bg, bu = fc1, fc3, b1, b3
                src = {"w_gate": ("fc1", slice(None)), "w_up": ("fc3", slice(None))}
            elif fusion == 1:  # rows [g0, u0, g1, u1, ...]
                wg, wu = fc1[:, 0::2], fc1[:, 1::2]
                bg, bu = (None, None) if b1 is None else (b1[:, 0::2], b1[:, 1::2])
                src = {"w_gate": ("fc1", slice(0, None, 2)), "w_up": ("fc1", slice(1, None, 2))}
            elif fusion == 2:  # rows [g | u]
                half = fc1.shape[1] // 2
                wg, wu = fc1[:, :half], fc1[:, half:]
                bg, bu = (None, None) if b1 is None else (b1[:, :half], b1[:, half:])
                src = {"w_gate": ("fc1", slice(None, half)), "w_up": ("fc1", slice(half, None))}
            else:
                raise _Skip(f"swiglu_fusion={fusion}")
            if limit is None and alpha == 1.0 and beta == 0.0:
                attrs["activation"] = "silu"
            elif limit is None or beta == 1.0:
                # g * sigmoid(alpha g) * (u + beta) is clamped_swiglu (u + 1) with the up bias
                # shifted by beta - 1; no limit is a limit no float32 reaches past
                if beta != 1.0:
                    bu = (np.zeros(wu.shape[:2], wu.dtype) if bu is None else bu) + np.asarray(
                        beta - 1.0, wu.dtype)
                lim = float(np.finfo(np.float32).max) if limit is None else float(limit)
                attrs.update(activation="clamped_swiglu", alpha=alpha, limit=lim)
            else:  # g' sigmoid(alpha g') (clamp(u) + beta): the clamped form with offset beta
                attrs.update(activation="clamped_swiglu", alpha=alpha, limit=float(limit),
                             offset=beta)
            gated = True
        elif act in ("relu", "gelu", "silu", "identity"):
            # ONNX Runtime's CPU MoE computes gelu with the tanh approximation; activation_alpha
            # and activation_beta only affect swiglu
            attrs["activation"] = {"gelu": "gelu_tanh", "identity": "none"}.get(act, act)
            src = {"w_gate": ("fc1", slice(None)), "w_up": ("fc3", slice(None))}
            if fc3 is None:
                wg, wu, bg, bu, gated = None, fc1, None, b1, False
                src = {"w_up": ("fc1", slice(None))}
            elif act == "identity":
                raise _Skip("fc3_experts_weights with activation_type=identity")
            else:  # Mixtral / Phi layout: act(fc1 x) * (fc3 x)
                wg, wu, bg, bu, gated = fc1, fc3, b1, b3, True
        else:
            raise _Skip(f"activation_type={act}")
        inter = wu.shape[1]
        bias = any(b is not None for b in (bg, bu, b2))
        x2 = x if x.type.rank == 2 else self.emit("core.reshape", [x], {"shape": [-1, H]})
        if logits.type.rank == 3:
            logits = self.emit("core.reshape", [logits], {"shape": [-1, E]})
        if str(x2.shape[0]) != str(logits.shape[0]):
            raise _Skip(f"router_probs has {logits.shape[0]} rows for {x2.shape[0]} tokens (a "
                        "3-D input wants router_probs computed from it in the graph: moec takes "
                        "dim 0 of every graph input as the same token count)")
        weights, ids = self._moe_routing(logits, E, k, at)
        ws = [wg, wu, fc2] if gated else [wu, fc2]
        names = ["w_gate", "w_up", "w_down"] if gated else ["w_up", "w_down"]
        if bias:
            dt = fc2.dtype
            zero_i = np.zeros((E, inter), dt)
            ws += ([zero_i if bg is None else bg] if gated else [])
            ws += [zero_i if bu is None else bu, np.zeros((E, H), dt) if b2 is None else b2]
            names += (["b_gate"] if gated else []) + ["b_up", "b_down"]
        operands = [self.new_param(nm, np.ascontiguousarray(w)) for nm, w in zip(names, ws,
                                                                               strict=True)]
        src["w_down"] = ("fc2", slice(None))
        for v, nm in zip(operands, names, strict=False):
            fc, rows = src.get(nm, (None, None))
            form = (forms or {}).get(fc)
            if form is not None:  # the rows of the quantised tensor this weight holds
                bits, group, parts = form
                self.b.graph.quant_forms[v.name] = (bits, group, tuple(
                    np.ascontiguousarray(p[:, rows]) for p in parts))
        attrs.update(gated=gated, bias=bias)
        y = self.emit("moe.experts", [x2, weights, ids, *operands], attrs)
        if x.type.rank == 3:
            y = self.emit("core.reshape", [y], {"shape": [-1, x.shape[1], H]})
        return y

    def _dense_moe(self, m: Any) -> Value:
        """moe.experts for a dense-combine MoE (moec/frontend/onnx_dense_moe.py)."""
        x, weights, ids = self.val(m.x), self.val(m.weights), self.val(m.ids)
        if x.type.rank != 2:
            raise UnsupportedError(f"dense MoE at '{m.output}': x must be [T, H], got {x.type}")
        if ids.dtype != "i32":
            ids = self.emit("core.cast", [ids], {"dtype": "i32"})
        ws = [self.b.param(self.pname(f"{m.output}.{nm}"), w) for nm, w in
              (("w_gate", m.w_gate), ("w_up", m.w_up), ("w_down", m.w_down))]
        return self.emit("moe.experts", [x, weights, ids, *ws],
                         {"activation": "silu", "gated": True, "bias": False})

    def _moe_routing(self, logits: Value, E: int, k: int, at: dict[str, Any]
                     ) -> tuple[Value, Value]:
        if at.get("use_sparse_mixer", 0):
            # moe.router over the given logits: an identity router weight keeps them exact
            eye = self.new_param("router_identity", np.eye(E, dtype=_np(logits.dtype)))
            return self.emit("moe.router", [logits, eye], {"k": k, "scoring": "softmax",
                                                           "order": "sparsemixer"})
        scores = self.emit("core.softmax", [logits], {"axis": -1})
        weights, ids = self.emit("core.topk", [scores], {"k": k})
        if at.get("normalize_routing_weights", 0):
            den = self.emit("core.sum", [weights], {"axis": -1, "keepdim": True})
            weights = self.emit("core.div", [weights, den])
        return weights, ids


def _np(dtype: str) -> np.dtype:
    from moec.ir.types import numpy_dtype

    return numpy_dtype(dtype)


def _missing_message(missing: dict[str, list[str]]) -> str:
    lines = [f"  {op}: node{'s' if len(ns) > 1 else ''} {', '.join(ns[:8])}"
             + (f" and {len(ns) - 8} more" if len(ns) > 8 else "") for op, ns in missing.items()]
    return ("the ONNX model uses ops (or op forms) moec cannot translate:\n" + "\n".join(lines)
            + f"\nsupported ops: {', '.join(SUPPORTED_OPS)}; nodes whose inputs are all "
            "constants are folded whatever their op")


_HANDLERS: dict[str, Callable[[_Translator, Any], Any]] = {
    "Identity": _Translator._identity,
    **{op: _Translator._unary for op in _UNARY},
    **{op: _Translator._binary for op in _BINARY},
    "Reciprocal": _Translator._reciprocal,
    "Gelu": _Translator._gelu,
    "MatMul": _Translator._matmul,
    "Gemm": _Translator._gemm,
    "Softmax": _Translator._softmax,
    "TopK": _Translator._topk,
    "ReduceSum": _Translator._reduce,
    "ReduceMean": _Translator._reduce,
    "Reshape": _Translator._reshape,
    "Transpose": _Translator._transpose,
    "Cast": _Translator._cast,
    "LayerNormalization": _Translator._norm,
    "SimplifiedLayerNormalization": _Translator._norm,
    "RMSNormalization": _Translator._norm,
    f"{_MOE_DOMAIN}::MoE": _Translator._moe,
    f"{_MOE_DOMAIN}::QMoE": _Translator._qmoe,
}
SUPPORTED_OPS = tuple(_HANDLERS)


def from_onnx(model: str | Path | Any, *, max_tokens: int = 4096) -> Graph:
    """Translate an ONNX model (a path or an `onnx.ModelProto`) to a moec IR graph.

    Dim 0 of each float input is the token dim `T` (dynamic, 0..max_tokens). Raises
    `moec.errors.UnsupportedError` listing every unsupported op type with its node names."""
    return _Translator(_load(model), max_tokens).run()
