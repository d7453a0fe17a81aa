"""Expert-parallel entry functions, built into the artifact next to `main`.

`moec.compile(..., ep=True)` (`moec compile --ep`) lowers the graph twice into one Relax module:
once as `main` (unchanged), and once cut at every MoE layer's expert computation, so that a
rank of an expert-parallel group (moec.distributed) can run the shared parts itself and the
expert GEMMs on rows that other ranks sent it:

- an *expert region* is `moe.align -> moe.grouped_matmul (gather) -> moe.grouped_matmul ...`
  whose last result and align's `slot_row` feed one `moe.combine`. Its inputs are the rows the
  first grouped GEMM gathers (`x`) and the router's expert ids (`ids`).
- `ep_seg_<i>` runs every other node that depends on at most `i` regions (ASAP placement): the
  dense parts, norms, routers and the combines. In it, a region's GEMM output is replaced by a
  parameter of its own row count: the rows that came back from the expert ranks, in the order
  the rank sent them; `slot_row` says where each (token, choice) slot's row is. The combine
  kernel is unchanged.
- `ep_experts_<i>` runs region i's grouped GEMM chain for ONE expert (kernels built with E=1 and
  top_k=1) on received rows: `(tile_expert i32[TL], sorted_ids i32[TL*block_m], x [R, K],
  weights of that expert...) -> [TL*block_m, N]`. A rank calls it once per local expert, so the
  same artifact serves any number of ranks, even or uneven shards.

The E=1 kernels read a weight slice `[e:e+1]` of the very tensor `main` takes (the packed layout
is per expert), so the artifact holds every weight once; each rank reads only its experts'
slices. `EpPlan` (JSON in the manifest's `meta["ep"]`) names the functions, the values that flow
between them and the weights each takes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from tvm import relax, tirx

from moec.codegen import kernels as K
from moec.codegen.lower import Lowered, _Lowerer
from moec.errors import CodegenError
from moec.ir.graph import Graph, Node, Value
from moec.ir.types import Sym, tvm_dtype

PLAN_VERSION = 1


@dataclass
class EpSegment:
    """`fn(*inputs, *weights) -> tuple(outputs)`; names are IR value / stored weight names."""

    fn: str
    inputs: list[str]
    weights: list[str]
    outputs: list[str]


@dataclass
class EpRegion:
    """One MoE layer's expert computation; `weights[j]` = stored names of GEMM j's weights,
    each sliced `[e:e+1]` on axis 0 for expert e."""

    fn: str
    loc: str
    num_experts: int
    top_k: int
    block_m: int
    x: str
    ids: str
    y: str
    slot_row: str
    out_features: int
    dtype: str
    weights: list[list[str]]


@dataclass
class EpPlan:
    steps: list[dict[str, Any]] = field(default_factory=list)  # {"segment": i} | {"region": i}
    segments: list[EpSegment] = field(default_factory=list)
    regions: list[EpRegion] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"version": PLAN_VERSION, "steps": self.steps,
                "segments": [asdict(s) for s in self.segments],
                "regions": [asdict(r) for r in self.regions],
                "inputs": self.inputs, "outputs": self.outputs}


@dataclass
class _Region:
    align: Node
    gemms: list[Node]
    combine: Node

    @property
    def nodes(self) -> list[Node]:
        return [self.align, *self.gemms]


_GEMMS = ("moe.grouped_matmul", "moe.grouped_matmul_q")  # fp32/fp16/bf16 or quantised weights


def _fail(node: Node, why: str) -> CodegenError:
    return CodegenError(f"expert parallelism: {node!r}: {why}; EP supports MoE layers in the "
                        f"default pipeline's form (moe.align -> moe.grouped_matmul(_q) chain -> "
                        f"moe.combine)")


def find_regions(graph: Graph) -> list[_Region]:
    """The expert regions of `graph`, in graph order."""
    regions = []
    for align in graph.find("moe.align"):
        sorted_ids, tile_expert, slot_row = align.results
        gemms = [n for n in sorted_ids.users() if n.op in _GEMMS]
        if len(gemms) != len(sorted_ids.users()) or {n for n in tile_expert.users()} != set(gemms):
            raise _fail(align, "its layout feeds ops other than moe.grouped_matmul")
        first = [g for g in gemms if g.attrs["gather"]]
        if len(first) != 1:
            raise _fail(align, "expected exactly one gathering moe.grouped_matmul")
        chain = [first[0]]
        while True:
            users = chain[-1].result.users()
            nxt = [u for u in users if u.op in _GEMMS]
            if not nxt:
                break
            if len(users) != 1 or nxt[0].operands[0] is not chain[-1].result:
                raise _fail(chain[-1], "an expert GEMM's result has several users")
            chain.append(nxt[0])
        if set(chain) != set(gemms):
            raise _fail(align, "its grouped GEMMs do not form one chain")
        users = chain[-1].result.users()
        if len(users) != 1 or users[0].op != "moe.combine":
            raise _fail(chain[-1], "the last expert GEMM must feed exactly one moe.combine")
        combine = users[0]
        if combine.operands[2] is not slot_row or set(slot_row.users()) != {combine}:
            raise _fail(combine, "it must read its rows through the region's slot_row")
        if align.attrs["identity_experts"]:
            raise _fail(align, "identity experts (ids after the FFN experts) are not sharded")
        e = align.attrs["num_experts"]
        for g in chain:
            for v in g.operands[1:-2]:
                if v.kind != "param" or v.shape[0] != e:
                    raise _fail(g, f"expert weights must be constants with {e} rows on axis 0")
        regions.append(_Region(align, chain, combine))
    regions.sort(key=lambda r: graph.nodes.index(r.align))
    return regions


class _EpLowerer(_Lowerer):
    """`_Lowerer` that also records which stored weight each expert GEMM operand became, then
    adds the EP functions to the same BlockBuilder (kernels shared with `main`)."""

    def __init__(self, graph: Graph, tiles: Mapping[tuple, tuple[int, int]] | None = None
                 ) -> None:
        super().__init__(graph, tiles=tiles)
        self.gemm_weights: dict[Node, dict[int, str]] = {}

    def args(self, node: Node, kern: K.Kernel) -> list[relax.Expr]:
        out = super().args(node, kern)
        if node.op in _GEMMS:
            names = {id(var): name for name, var in self.weight_vars.items()}
            self.gemm_weights[node] = {i: names[id(a)] for i, a in enumerate(out)
                                       if id(a) in names}
        return out

    # ------------------------------------------------------------- per-function state
    def _fresh_function_state(self) -> None:
        # Symbolic vars and relax Vars belong to one function each.
        self.syms = {name: tirx.Var(name, "int64") for name in self.g.dims}
        self.vals = {}
        self.weight_vars = {}

    def _plain_dims(self, v: Value) -> None:
        if any(not isinstance(d, (int, Sym)) for d in v.shape):
            raise CodegenError(f"expert parallelism: value %{v.name}: {v.type} crosses a cut "
                               f"between EP functions, and only plain symbolic dims can; "
                               f"compile from a [T, H] example (tokens flattened) for --ep")

    def segment(self, fn: str, nodes: list[Node], inputs: list[Value], outputs: list[Value],
                fresh_rows: set[Value]) -> EpSegment:
        self._fresh_function_state()
        params = []
        for v in inputs:
            if v in fresh_rows:
                shape = [tirx.Var(f"R_{v.name}", "int64"), *[self.dim(d) for d in v.shape[1:]]]
                sinfo = relax.TensorType(shape, tvm_dtype(v.dtype))
            else:
                self._plain_dims(v)
                sinfo = self.sinfo(v)
            var = relax.Var(v.name, sinfo)
            self.vals[v] = var
            params.append(var)
        for v in outputs:
            self._plain_dims(v)
        with self.bb.function(fn):
            with self.bb.dataflow():
                for node in nodes:
                    try:
                        self.lower_node(node)
                    except CodegenError:
                        raise
                    except Exception as e:
                        raise CodegenError(f"lowering {node!r} for EP failed: {e}") from e
                out = self.bb.emit_output(relax.Tuple([self.value(v) for v in outputs]))
            self.bb.emit_func_output(out, params=params + list(self.weight_vars.values()))
        return EpSegment(fn, [v.name for v in inputs], list(self.weight_vars),
                         [v.name for v in outputs])

    def experts(self, fn: str, region: _Region) -> EpRegion:
        """`fn(tile_expert, sorted_ids, x, *weights)`: the GEMM chain for one expert."""
        self._fresh_function_state()
        bm = region.align.attrs["block_m"]
        first = region.gemms[0]
        dt = tvm_dtype(first.operands[0].dtype)
        rows, tl = tirx.Var("R", "int64"), tirx.Var("TL", "int64")
        s = tl * bm
        x = relax.Var("x", relax.TensorType([rows, first.operands[0].shape[1]], dt))
        te = relax.Var("tile_expert", relax.TensorType([tl], "int32"))
        si = relax.Var("sorted_ids", relax.TensorType([s], "int32"))
        params, weights, cur = [te, si, x], [], x
        with self.bb.function(fn):
            with self.bb.dataflow():
                for g in region.gemms:
                    a = g.attrs
                    n, kk = g.operands[1].shape[1], g.operands[0].shape[1]
                    if g.op == "moe.grouped_matmul_q":
                        from moec.codegen.kernels.grouped_matmul_quant import (
                            grouped_matmul_quant,
                        )

                        key = ("ep.grouped_matmul_q_e1", dt, n, kk, bm, tuple(sorted(a.items())))
                        build = lambda a=a, n=n, kk=kk: grouped_matmul_quant(  # noqa: E731
                            1, n, kk, bm, 1, a["gather"], a["activation"], bits=a["bits"],
                            group_size=a["group_size"], dtype=dt, bias=a["bias"],
                            alpha=a["alpha"], limit=a["limit"], offset=a["offset"])
                    else:
                        wd = self.weight_dtype(dt, g.operands[1].type)  # half weights
                        # the tiles tuned for this layer's GEMM (keyed as in _Lowerer)
                        tiles = self.tiles.get((g.operands[1].shape[0], n, kk, bm, a["top_k"],
                                                a["gather"], a["activation"]))
                        extra = {**wd, **({"tiles": tiles} if tiles else {})}
                        key = ("ep.grouped_matmul_e1", dt, n, kk, bm, a["gather"],
                               a["activation"], a["bias"], a["alpha"], a["limit"], a["offset"],
                               tiles, *wd.values())
                        build = lambda a=a, n=n, kk=kk, x=extra: K.grouped_matmul(  # noqa: E731
                            1, n, kk, bm, 1, a["gather"], a["activation"], dt, bias=a["bias"],
                            alpha=a["alpha"], limit=a["limit"], offset=a["offset"], **x)
                    kern, gv = self.kernel(key, build)
                    names, args = [], [cur]
                    for i, v in enumerate(g.operands[1:-2], start=1):
                        name = self.gemm_weights[g][i]
                        stored = self.weights[name]
                        self._check_slice(g, kern, i, v, stored)
                        var = relax.Var(f"w{len(params)}", relax.TensorType(
                            (1, *stored.shape[1:]), tvm_dtype(v.dtype)))
                        params.append(var)
                        args.append(var)
                        names.append(name)
                    args += [si, te]
                    cur = self.bb.emit(relax.call_tir(gv, args, relax.TensorType([s, n], dt)))
                    weights.append(names)
                out = self.bb.emit_output(cur)
            self.bb.emit_func_output(out, params=params)
        x_val, ids_val = first.operands[0], region.align.operands[0]
        comb = region.combine
        locs = [n.loc for n in (region.align, *region.gemms, region.combine) if n.loc]
        locs.append("moe layer " + fn.removeprefix("ep_experts_"))
        return EpRegion(fn=fn, loc=locs[0],
                        num_experts=region.align.attrs["num_experts"], top_k=ids_val.shape[1],
                        block_m=bm, x=x_val.name, ids=ids_val.name,
                        y=region.gemms[-1].result.name, slot_row=comb.operands[2].name,
                        out_features=region.gemms[-1].operands[1].shape[1], dtype=dt,
                        weights=weights)

    def _check_slice(self, g: Node, kern: K.Kernel, i: int, v: Value, stored: np.ndarray) -> None:
        """The E=1 kernel must take exactly `stored[e:e+1]`: check it on expert 0."""
        fn = kern.arg_transforms.get(i)
        raw = self.g.param_array(v)[:1]
        want = fn(raw) if fn is not None else raw
        if want.shape != (1, *stored.shape[1:]) or not np.array_equal(want, stored[:1]):
            raise CodegenError(f"expert parallelism: {g!r}: operand {i} of the one-expert kernel "
                               f"{kern.name} is not a slice of the stored weight; the kernels "
                               f"pack weights per expert differently than assumed")


def _assign_levels(graph: Graph, regions: list[_Region]) -> dict[Node, int]:
    """Segment of each non-region node: the number of regions it (transitively) waits for."""
    in_region = {n: i for i, r in enumerate(regions) for n in r.nodes}
    level: dict[Value, int] = {}
    out: dict[Node, int] = {}
    for node in graph.nodes:
        lv = max((level.get(v, 0) for v in node.operands), default=0)
        if node in in_region:
            i = in_region[node]
            r = regions[i]
            if node is r.align or node is r.gemms[0]:
                for v in (r.align.operands[0], r.gemms[0].operands[0]):
                    if level.get(v, 0) > i:
                        raise _fail(node, "its input depends on a later MoE layer's experts")
            for res in node.results:
                level[res] = i + 1
            continue
        out[node] = lv
        for res in node.results:
            level[res] = lv
    return out


def lower_ep(graph: Graph, tiles: Mapping[tuple, tuple[int, int]] | None = None
             ) -> tuple[Lowered, EpPlan]:
    """Lower `graph` to a module with `main` and the EP functions, and describe them. `tiles`:
    tuned grouped-GEMM tiles (moec.codegen.tune), for `main` and the one-expert kernels alike.
    Built by `moec.codegen.build.build(..., ep=True)`."""
    regions = find_regions(graph)
    if not regions:
        raise CodegenError("expert parallelism: the model has no MoE layer in kernel form "
                           "(moe.align / moe.grouped_matmul / moe.combine) to shard")
    low = _EpLowerer(graph, tiles)
    lowered = low.run()
    levels = _assign_levels(graph, regions)
    plan = EpPlan(inputs=[v.name for v in graph.inputs], outputs=[v.name for v in graph.outputs])
    fresh_rows = {r.gemms[-1].result for r in regions}
    # The last step that reads each value: segment i is step i; region i reads after segment i.
    last_need: dict[Value, int] = {}
    for node, lv in levels.items():
        for v in node.operands:
            if v.kind != "param":
                last_need[v] = max(last_need.get(v, -1), lv)
    for i, r in enumerate(regions):
        for v in (r.align.operands[0], r.gemms[0].operands[0]):
            last_need[v] = max(last_need.get(v, -1), i + 1)
    for v in graph.outputs:
        last_need[v] = len(regions) + 1
    for i in range(len(regions) + 1):
        nodes = [n for n in graph.nodes if levels.get(n) == i]
        if nodes:
            produced = {res for n in nodes for res in n.results}
            inputs: list[Value] = []
            for n in nodes:
                for v in n.operands:
                    if v.kind != "param" and v not in produced and v not in inputs:
                        inputs.append(v)
            outputs = [res for n in nodes for res in n.results if last_need.get(res, -1) > i]
            seg = low.segment(f"ep_seg_{i}", nodes, inputs, outputs, fresh_rows)
            plan.steps.append({"segment": len(plan.segments)})
            plan.segments.append(seg)
        if i < len(regions):
            plan.steps.append({"region": i})
            plan.regions.append(low.experts(f"ep_experts_{i}", regions[i]))
    missing = {n for s in plan.segments for n in s.weights} - set(lowered.param_names)
    if missing:
        raise CodegenError(f"expert parallelism: EP functions use weights main does not: "
                           f"{sorted(missing)}")
    lowered.mod = low.bb.get()
    # every kernel of the module, the EP functions' one-expert kernels included
    lowered.kernels = [gv.name_hint for _, gv in low.kernel_cache.values()]
    return lowered, plan
