"""Lower a pipeline-processed IR graph to a Relax module that calls moec's TVM kernels.

Each node becomes a `relax.call_tir` of a kernel from `moec.codegen.kernels` (scheduled for the
target), except `core.reshape`, which stays a Relax reshape (a view, no kernel). The Relax
function `main` takes the graph inputs, then the weights, and returns a tuple of the outputs;
memory planning and dynamic shapes come from Relax. Weights that a kernel wants in another layout
(packed GEMM panels) are transformed here, once, at compile time.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tvm
from tvm import relax, tirx

from moec.codegen import kernels as K
from moec.errors import CodegenError, UnsupportedError
from moec.ir.graph import Graph, Node, Value
from moec.ir.types import BinExpr, DimLike, Sym, tvm_dtype

_UNARY = {"core.silu", "core.gelu", "core.relu", "core.sigmoid", "core.tanh", "core.exp",
          "core.neg", "core.sqrt", "core.rsqrt", "core.scale", "core.clamp", "core.cast"}
_BINARY = {"core.add", "core.sub", "core.mul", "core.div", "core.maximum", "core.minimum"}
_NN_OPS = {"core.embedding", "core.arange", "core.cos", "core.sin", "core.permute_dims",
           "core.slice", "core.concat", "core.broadcast_to", "core.attention",
           "core.cache_write", "core.paged_attention", "core.rope",
           "core.linear_heads"}  # lower_nn.py
# last-axis row ops, lowered on CUDA through a [rows, n] view when x has rank > 2
_ROW_OPS = ("core.softmax", "core.sum", "core.mean", "core.rmsnorm", "core.layernorm")
_NEEDS_PASS = {"moe.experts": "reorder-dispatch and tile-expert-gemm",
               "moe.expert_ffn": "tile-expert-gemm", "moe.select": "fuse-gating"}


@dataclass
class Lowered:
    """A Relax module plus the weights `main` takes after the inputs, in order (None for a
    graph parameter declared without data: the caller supplies it at run time)."""

    mod: tvm.IRModule
    param_names: list[str]
    params: dict[str, np.ndarray | None]
    kernels: list[str] = field(default_factory=list)
    # layer -> {"num_experts", "k", "params": weights holding that layer's routed experts}
    experts: dict[int, dict[str, Any]] = field(default_factory=dict)


def _shape_key(shape: tuple[DimLike, ...]) -> tuple[int | str, ...]:
    """Kernel builders take ints and names; every symbolic expression gets a stable name."""
    out: list[int | str] = []
    for d in shape:
        if isinstance(d, int):
            out.append(d)
        elif isinstance(d, Sym):
            out.append(d.name)
        else:
            out.append("d_" + hashlib.sha1(str(d).encode()).hexdigest()[:8])
    return tuple(out)


class _Lowerer:
    def __init__(self, graph: Graph, library: Any = None,
                 tiles: Mapping[tuple, tuple[int, int]] | None = None) -> None:
        # the kernel library: moec.codegen.kernels (CPU) or moec.codegen.cuda (same builders)
        self.K = library if library is not None else K
        self.cuda = self.K is not K
        # tuned (MR, NR) of CPU grouped GEMMs by (E, N, K, block_m, top_k, gather, activation)
        self.tiles = dict(tiles or {})
        self.g = graph
        self.bb = relax.BlockBuilder()
        self.syms = {name: tirx.Var(name, "int64") for name in graph.dims}
        self.vals: dict[Value, relax.Expr] = {}
        self.kernel_cache: dict[tuple, tuple[K.Kernel, relax.GlobalVar]] = {}
        self.weight_vars: dict[str, relax.Var] = {}
        self.weights: dict[str, np.ndarray | None] = {}
        # the function being lowered is the decode entry point of a generation step (every
        # sequence has one query token): core.paged_attention takes its decode kernel
        self.decode = False
        # ... or an offload entry point: moe.expert_fetch calls the runtime's expert cache
        self.offload = False
        self.expert_weights: dict[int, dict[str, Any]] = {}  # layer -> its routed experts

    # ---------------------------------------------------------------- helpers
    def dim(self, d: DimLike) -> tirx.PrimExpr | int:
        if isinstance(d, int):
            return d
        if isinstance(d, Sym):
            return self.syms[d.name]
        assert isinstance(d, BinExpr)
        a, b = self.dim(d.lhs), self.dim(d.rhs)
        return {"+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b,
                "//": lambda: tirx.floordiv(a, b)}[d.op]()

    def sinfo(self, v: Value) -> relax.TensorType:
        return relax.TensorType([self.dim(d) for d in v.shape], tvm_dtype(v.dtype))

    def kernel(self, key: tuple, build: Callable[[], K.Kernel]) -> tuple[K.Kernel, relax.GlobalVar]:
        if key not in self.kernel_cache:
            kern = build()
            name = f"{kern.name}_{len(self.kernel_cache)}"
            gv = self.bb.add_func(kern.func.with_attr("global_symbol", name), name)
            self.kernel_cache[key] = (kern, gv)
        return self.kernel_cache[key]

    def weight(self, name: str, data: np.ndarray | None, declared: Value | None = None
               ) -> relax.Var:
        """The Relax parameter of a weight. A graph parameter declared without data (text IR,
        or a shape-only graph whose weights are supplied at run time) becomes a parameter of
        its declared type; `Lowered.params` then holds None for it."""
        if name not in self.weight_vars:
            from moec.ir.types import dtype_of_numpy

            if data is None and name in self.weights and self.weights[name] is not None:
                data = self.weights[name]  # lowered already for another function
            if data is None:
                assert declared is not None
                self.weights[name] = None
                sinfo = relax.TensorType([self.dim(d) for d in declared.shape],
                                         tvm_dtype(declared.dtype))
            else:
                self.weights[name] = np.ascontiguousarray(data)
                sinfo = relax.TensorType(data.shape, tvm_dtype(dtype_of_numpy(data.dtype)))
            self.weight_vars[name] = relax.Var(name, sinfo)
        return self.weight_vars[name]

    def args(self, node: Node, kern: K.Kernel) -> list[relax.Expr]:
        out = []
        for i, v in enumerate(node.operands):
            fn = kern.arg_transforms.get(i)
            if fn is None:
                out.append(self.value(v))
                continue
            if v.kind != "param" and getattr(fn, "casts_to", None):
                # a transform that only casts (the CUDA router's biases to float32) applies to
                # a computed operand too, in the graph (DeepSeek-V3 casts its correction bias)
                val = self.value(v)
                out.append(val if tvm_dtype(v.dtype) == fn.casts_to
                           else self.bb.emit(relax.op.astype(val, fn.casts_to)))
                continue
            if v.kind != "param":
                raise CodegenError(f"{node!r}: operand {i} must be a constant weight for kernel "
                                   f"{kern.name} (it is packed at compile time)")
            if self.g.param_data.get(v.name) is None:
                raise CodegenError(f"{node!r}: weight @{v.name} has no data, but kernel "
                                   f"{kern.name} packs it at compile time; give the graph its "
                                   f"data")
            wname = f"{v.name}@{kern.name}.{i}"
            done = self.weights.get(wname)  # packed already for another function
            out.append(self.weight(wname, done if done is not None
                                   else fn(self.g.param_array(v))))
        return out

    def value(self, v: Value) -> relax.Expr:
        if v.kind == "param":
            return self.weight(v.name, self.g.param_data.get(v.name), v)
        return self.vals[v]

    def call(self, node: Node, key: tuple, build: Callable[[], K.Kernel]) -> K.Kernel:
        kern, gv = self.kernel(key, build)
        outs = [self.sinfo(r) for r in node.results]
        res = self.bb.emit(relax.call_tir(gv, self.args(node, kern),
                                          outs[0] if len(outs) == 1 else outs))
        if len(node.results) == 1:
            self.vals[node.results[0]] = res
        else:
            for i, r in enumerate(node.results):
                self.vals[r] = self.bb.emit(relax.TupleGetItem(res, i))
        return kern

    def lower_fetch(self, n: Node) -> None:
        """moe.expert_fetch: nothing in a fully resident function; in an offload function a
        call of the runtime's expert cache (moec.runtime.expert_cache), which returns the ids
        once the experts they name are resident."""
        ids, x = n.operands
        if not self.offload:
            self.vals[n.result] = self.value(ids)
            return
        self.vals[n.result] = self.bb.emit(relax.call_pure_packed(
            "moec.expert_fetch", relax.prim_value(tirx.IntImm("int64", n.attrs["layer"])),
            self.value(ids), self.value(x), ty_args=self.sinfo(n.result)))

    def note_experts(self, n: Node, kern: K.Kernel) -> None:
        """Record the weights of an expert GEMM whose experts a moe.expert_fetch names (the
        expert cache loads them expert by expert: leading dim = the layer's experts)."""
        align = next((v.producer for v in n.operands if v.producer is not None
                      and v.producer.op == "moe.align"), None)
        fetch = align.operands[0].producer if align is not None else None
        if fetch is None or fetch.op != "moe.expert_fetch":
            return
        e = fetch.attrs["num_experts"]
        entry = self.expert_weights.setdefault(fetch.attrs["layer"], {
            "num_experts": e, "k": fetch.operands[0].shape[1], "params": []})
        for i, v in enumerate(n.operands):
            if v.kind != "param" or v.type.rank < 2 or v.type.shape[0] != e:
                continue
            name = f"{v.name}@{kern.name}.{i}" if i in kern.arg_transforms else v.name
            if name not in entry["params"]:
                entry["params"].append(name)

    # ---------------------------------------------------------------- per op
    def lower_node(self, n: Node) -> None:
        a, op = n.attrs, n.op
        ins = [v.type for v in n.operands]
        dt = tvm_dtype(n.operands[0].dtype)
        s0 = _shape_key(ins[0].shape)
        if op in _NEEDS_PASS:
            raise CodegenError(f"{n!r}: {op} has no kernel; run {_NEEDS_PASS[op]} first "
                               f"(the default pipeline does)")
        if op == "core.reshape":
            self.vals[n.result] = self.bb.emit(relax.op.reshape(
                self.value(n.operands[0]), [self.dim(d) for d in n.result.shape]))
        elif op in _UNARY:
            name = op.split(".")[1]
            extra: dict[str, Any] = dict(a)
            if op == "core.cast":
                extra = {"to": tvm_dtype(a["dtype"])}
            self.call(n, (op, s0, dt, tuple(sorted(extra.items()))),
                      lambda: self.K.elementwise_unary(name, s0, dt, **extra))
        elif op in _BINARY:
            s1 = _shape_key(ins[1].shape)
            self.call(n, (op, s0, s1, dt),
                      lambda: self.K.elementwise_binary(op.split(".")[1], s0, s1, dt))
        elif op in _ROW_OPS and self.cuda and ins[0].rank > 2 and (
                op in ("core.rmsnorm", "core.layernorm") or a["axis"] in (-1, ins[0].rank - 1)):
            from moec.codegen.lower_nn import lower_rows_2d

            red = op.split(".")[1]
            build = {"core.softmax": lambda s2: self.K.softmax(s2, -1, dt),
                     "core.rmsnorm": lambda s2: self.K.rmsnorm(s2, a["eps"], dt),
                     "core.layernorm": lambda s2: self.K.layernorm(s2, a["eps"], dt)}.get(
                op, lambda s2: self.K.reduce(red, s2, -1, True, dt))
            lower_rows_2d(self, n, (op, dt, tuple(sorted(a.items()))), build)
        elif op == "core.softmax":
            self.call(n, (op, s0, dt, a["axis"]), lambda: self.K.softmax(s0, a["axis"], dt))
        elif op in ("core.sum", "core.mean"):
            self.call(n, (op, s0, dt, a["axis"], a["keepdim"]),
                      lambda: self.K.reduce(op.split(".")[1], s0, a["axis"], a["keepdim"], dt))
        elif op == "core.rmsnorm":
            self.call(n, (op, s0, dt, a["eps"]), lambda: self.K.rmsnorm(s0, a["eps"], dt))
        elif op == "core.layernorm":
            self.call(n, (op, s0, dt, a["eps"]), lambda: self.K.layernorm(s0, a["eps"], dt))
        elif op == "core.topk":
            self.call(n, (op, s0, dt, a["k"]), lambda: self.K.topk(s0, a["k"], dt))
        elif op in ("core.linear", "core.linear_q"):
            self.lower_linear(n, dt)
        elif op == "moe.grouped_matmul_q":
            self.lower_quant(n, a, ins, dt)
        elif op in _NN_OPS:
            from moec.codegen.lower_nn import lower_nn

            lower_nn(self, n, dt)
        elif op == "moe.router":
            kk = {key: v for key, v in a.items() if key != "capacity"}
            # the CUDA router reads the weight in its own dtype (Switch keeps it in float32
            # while x is half)
            w_dt = {"w_dtype": tvm_dtype(ins[1].dtype)} if self.cuda else {}
            build = lambda: self.K.router(  # noqa: E731
                H=ins[0].shape[-1], E=ins[1].shape[0], k=a["k"], scoring=a["scoring"],
                order=a["order"], norm_topk=a["norm_topk"], scale=a["scale"],
                has_bias=a["select_bias"], logit_bias=a["logit_bias"], n_groups=a["n_groups"],
                topk_groups=a["topk_groups"], group_score=a["group_score"], dtype=dt,
                **({"jitter_eps": a["jitter_eps"]} if a["order"] == "sparsemixer" else {}),
                **w_dt)
            key = (op, dt, len(ins), tuple(sorted(kk.items())), tuple(w_dt.items()))
            if a["capacity"] == 0 and ins[0].rank == 2:
                self.call(n, (*key, s0), build)
            else:
                self.lower_router_capacity(n, key, build, ins[1].shape[0])
        elif op == "moe.align":
            k = ins[0].shape[1]
            ident = {"identity": True} if a["identity_experts"] else {}
            self.call(n, (op, k, a["num_experts"], a["block_m"], *ident),
                      lambda: self.K.align(a["num_experts"], k, a["block_m"], **ident))
        elif op == "moe.grouped_matmul":
            w = ins[1]
            e, nn, kk2 = w.shape
            tiles = None if self.cuda else self.tiles.get(
                (e, nn, kk2, a["block_m"], a["top_k"], a["gather"], a["activation"]))
            extra = {"tiles": tiles} if tiles else {}
            extra.update(self.weight_dtype(dt, w))
            kern = self.call(n, (op, dt, e, nn, kk2, a["block_m"], a["top_k"], a["gather"],
                                 a["activation"], a["bias"], a["alpha"], a["limit"], a["offset"],
                                 tiles, extra.get("w_dtype")),
                             lambda: self.K.grouped_matmul(
                                 e, nn, kk2, a["block_m"], a["top_k"], a["gather"],
                                 a["activation"], dt, bias=a["bias"], alpha=a["alpha"],
                                 limit=a["limit"], offset=a["offset"], **extra))
            self.note_experts(n, kern)
        elif op == "moe.expert_fetch":
            self.lower_fetch(n)
        elif op == "moe.combine":
            h, k = ins[0].shape[1], ins[1].shape[1]
            ident = {"identity": True} if len(ins) == 4 else {}  # adds w * x for identity slots
            self.call(n, (op, dt, h, k, *ident), lambda: self.K.combine(h, k, dt, **ident))
        elif op == "moe.permute":  # left by weight_on=input: the weight scales the sorted rows
            h, k = ins[0].shape[1], a["top_k"]
            self.call(n, (op, dt, h, k), lambda: self.K.permute(h, k, dt))
        elif op == "moe.unpermute":  # its weighted sum is fused into moe.combine when possible
            h, k = ins[0].shape[1], ins[1].shape[1]
            self.call(n, (op, dt, h, k), lambda: self.K.unpermute(h, k, dt))
        else:
            raise CodegenError(f"{n!r}: no {'CUDA' if self.cuda else 'CPU'} kernel for {op}")

    def lower_router_capacity(self, n: Node, key: tuple, build: Callable[[], K.Kernel],
                              num_experts: int) -> None:
        """The router kernel on the tokens, then the capacity kernel on its weights (token
        dropping needs a pass over all slots in order, which the token-parallel router cannot
        make). A router on sequences, x [B, S, H], routes the B*S tokens and drops per
        sequence (the batched capacity kernel on a [B, S, k] view)."""
        x = n.operands[0].type
        lead = [self.dim(d) for d in x.shape[:-1]]
        tokens, seqs = lead[0], lead[0]
        for i, d in enumerate(lead[1:]):
            tokens = tokens * d
            seqs = seqs * d if i < len(lead) - 2 else seqs
        k, cap = n.attrs["k"], n.attrs["capacity"]
        flat = [relax.TensorType([tokens, k], "float32"), relax.TensorType([tokens, k], "int32")]
        kern, gv = self.kernel((*key, "tokens"), build)
        args = self.args(n, kern)
        if x.rank > 2:
            args[0] = self.bb.emit(relax.op.reshape(args[0], [tokens, self.dim(x.shape[-1])]))
        res = self.bb.emit(relax.call_tir(gv, args, flat))
        weights = self.bb.emit(relax.TupleGetItem(res, 0))
        ids = self.bb.emit(relax.TupleGetItem(res, 1))
        if cap > 0:
            batched = x.rank > 2
            shape = [seqs, lead[-1], k] if batched else [tokens, k]  # [sequences, S, k]
            if batched:
                weights = self.bb.emit(relax.op.reshape(weights, shape))
                ids = self.bb.emit(relax.op.reshape(ids, shape))
            _, cgv = self.kernel(("moe.capacity", num_experts, k, cap, batched),
                                 lambda: self.K.capacity(num_experts, k, cap, batched=batched))
            weights = self.bb.emit(relax.call_tir(cgv, [weights, ids],
                                                  relax.TensorType(shape, "float32")))
        for r, v in zip(n.results, (weights, ids), strict=True):
            want = self.sinfo(r)
            if x.rank > 3 or x.rank == 3 and cap == 0:  # the result's shape, [..., S, k]
                v = self.bb.emit(relax.op.reshape(v, want.shape))
            self.vals[r] = v

    def lower_quant(self, n: Node, a: Any, ins: list, dt: str) -> None:
        e, nn = ins[1].shape[0], ins[1].shape[1]
        kk2 = ins[0].shape[1]
        key = tuple(sorted(a.items()))
        kern = self.call(n, (n.op, dt, e, nn, kk2, key), lambda: self.K.grouped_matmul_quant(
            e, nn, kk2, a["block_m"], a["top_k"], a["gather"], a["activation"],
            bits=a["bits"], group_size=a["group_size"], dtype=dt, bias=a["bias"],
            alpha=a["alpha"], limit=a["limit"], offset=a["offset"]))
        self.note_experts(n, kern)

    def lower_linear(self, n: Node, dt: str) -> None:
        x, w = n.operands[0].type, n.operands[1].type
        if n.op == "core.linear_q" and self.cuda:
            raise UnsupportedError("core.linear_q (int8 dense linears, quantize-linears) has "
                                   "CPU kernels only; compile for CUDA without quantize_dense")
        if x.rank != 2:  # [..., K]: through a [rows, K] view (Relax reshapes are free)
            from moec.codegen.lower_nn import lower_linear_nd

            lower_linear_nd(self, n, dt)
            return
        m, kk = _shape_key(x.shape)
        nn = w.shape[0]
        bias = len(n.operands) == (4 if n.op == "core.linear_q" else 3)
        wd = self.weight_dtype(dt, w)
        self.call(n, ("core.linear", m, kk, nn, dt, bias, *wd.values()),
                  lambda: self.K.linear(m, kk, nn, dt, bias, **wd))

    @staticmethod
    def weight_dtype(dt: str, w: Any) -> dict[str, str]:
        """`{"w_dtype": ...}` for a GEMM whose weights are stored in another dtype than its
        activations (half weights widened by the kernel; see widen-activations), else {}."""
        wdt = tvm_dtype(w.dtype)
        return {} if wdt == dt else {"w_dtype": wdt}

    # ---------------------------------------------------------------- whole graph
    def function(self, fname: str, decode: bool = False, offload: bool = False) -> list[str]:
        """Lower the graph into the Relax function `fname` (inputs, then weights); returns the
        weight names in parameter order."""
        self.decode, self.offload = decode, offload
        self.vals, self.weight_vars = {}, {}
        self.syms = {name: tirx.Var(name, "int64") for name in self.g.dims}
        inputs = [relax.Var(v.name, self.sinfo(v)) for v in self.g.inputs]
        self.vals.update(zip(self.g.inputs, inputs, strict=True))
        with self.bb.function(fname):
            with self.bb.dataflow():
                for node in self.g.nodes:
                    try:
                        self.lower_node(node)
                    except CodegenError:
                        raise
                    except Exception as e:
                        raise CodegenError(f"lowering {node!r} failed: {e}") from e
                outs = self.bb.emit_output(relax.Tuple([self.value(v) for v in self.g.outputs]))
            params = inputs + list(self.weight_vars.values())
            self.bb.emit_func_output(outs, params=params)
        return list(self.weight_vars)

    def run(self, functions: tuple[tuple, ...] = (("main", False),)) -> Lowered:
        names: list[str] | None = None
        for fname, *flags in functions:
            got = self.function(fname, *flags)
            if names is not None and got != names:
                raise CodegenError(f"internal: function {fname} takes other weights than "
                                   f"{functions[0][0]}")
            names = got
        mod = self.bb.get()
        assert names is not None
        return Lowered(mod, names, {n: self.weights[n] for n in names},
                       [gv.name_hint for _, gv in self.kernel_cache.values()],
                       dict(sorted(self.expert_weights.items())))


def lower(graph: Graph, library: Any = None,
          tiles: Mapping[tuple, tuple[int, int]] | None = None,
          functions: tuple[tuple, ...] = (("main", False),)) -> Lowered:
    """Lower a graph whose ops all have kernels (run the pipeline first) to a Relax module.
    `tiles`: tuned micro-kernel tiles of CPU grouped GEMMs (moec.codegen.tune).
    `functions`: (name, decode[, offload]) of each Relax function to make from the graph, all
    taking the same inputs and weights; `decode` lowers core.paged_attention with its decode
    kernel (a generation step where every sequence has one new token), `offload` lowers
    moe.expert_fetch to a call of the runtime's expert cache."""
    return _Lowerer(graph, library, tiles).run(functions)
