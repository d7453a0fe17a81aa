"""prune-experts: drop rarely used experts, measured by a `moec profile` JSON.

For every `moe.router` whose weight parameter has a layer in the profile (keyed by that
parameter's name), the experts whose load (share of the layer's routed slots, `load` in the
profile) is below `threshold` are removed: the router weight rows (and its logit/selection bias
entries) are sliced, so that the router's scoring (softmax over the kept experts) and its top-k
see only the kept experts: the routing weights renormalise over the rest. Downstream, every op
that indexes experts (moe.align's `num_experts`, and the expert weights, biases and quantised
scales of moe.experts / moe.expert_ffn / moe.grouped_matmul(_q)) is rebuilt on the kept experts;
expert ids are renumbered 0..E'-1 in kept order. At least `top_k` experts are always kept.
The pass says on stderr which experts it removed from each layer, or why it removed none.

Run anywhere after fuse-gating (before or after the default pipeline; before quantize-experts is
cheapest). Requires: routers with parameter weights and plain (ungrouped) selection; the
profile was measured on the same model. Ensures: the pruned layers have E' < E experts.
"""

from __future__ import annotations

import json
import math
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from moec.errors import PassError
from moec.ir.graph import Graph, Node, Value
from moec.ir.types import same_type
from moec.passes.base import Pass, PassContext, register_pass
from moec.passes.rewriter import Rewriter, eliminate_dead_code

# ops whose parameter operands with a leading dim of E are per-expert data to slice
_EXPERT_OPS = {"moe.experts", "moe.expert_ffn", "moe.grouped_matmul", "moe.grouped_matmul_q"}
_IDS_OPS = {"moe.align", "moe.experts", "moe.combine", "moe.unpermute"}  # read expert ids


MAX_PROFILE_BYTES = 64 << 20
"""A profile is a few kB per MoE layer; anything bigger is not one (and is never read whole)."""


def load_profile(path: str | Path) -> dict[str, dict]:
    """The profile's layers by router weight name. PassError for a file that is missing, not a
    regular file (`/dev/zero`, a FIFO: never read), larger than MAX_PROFILE_BYTES, not JSON, or
    not shaped like `moec profile`'s output."""
    where = f"prune-experts: profile {path}"
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused just below.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise PassError(f"{where} is not a regular file; give the JSON file that "
                                f"`moec profile` wrote")
            raw = f.read(MAX_PROFILE_BYTES + 1)
    except OSError as e:
        raise PassError(f"{where} cannot be read: {e.strerror or e}") from None
    if len(raw) > MAX_PROFILE_BYTES:
        raise PassError(f"{where} is larger than {MAX_PROFILE_BYTES >> 20} MiB; not a profile")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError included
        raise PassError(f"{where} is not JSON ({type(e).__name__}: {str(e)[:200]})") from None
    layers = data.get("layers") if isinstance(data, dict) else None
    if not isinstance(layers, list):
        raise PassError(f"{where} has no \"layers\" list; it is not a `moec profile` JSON")
    out: dict[str, dict] = {}
    for i, layer in enumerate(layers):
        ok = (isinstance(layer, dict) and isinstance(layer.get("router"), str)
              and isinstance(layer.get("load"), list) and layer["load"]
              and all(type(v) in (int, float) and math.isfinite(v) and v >= 0
                      for v in layer["load"]))
        if not ok:
            raise PassError(f"{where}: layers[{i}] is not a layer of `moec profile` (wants "
                            f"\"router\": a weight name and \"load\": a list of non-negative "
                            f"numbers, one per expert), got {str(layer)[:200]}")
        out[layer["router"]] = layer
    return out


def kept_experts(layer: dict, threshold: float, top_k: int) -> list[int]:
    """Experts at or above `threshold` load; the most loaded ones if fewer than top_k remain."""
    load = layer["load"]
    keep = [e for e, v in enumerate(load) if v >= threshold]
    if len(keep) < top_k:
        keep = sorted(sorted(range(len(load)), key=lambda e: -load[e])[:top_k])
    return keep


class _Pruner:
    def __init__(self, graph: Graph, rw: Rewriter, keep: list[int], num_experts: int) -> None:
        self.g, self.rw, self.keep, self.e = graph, rw, keep, num_experts
        self.sliced: dict[str, Value] = {}

    def slice(self, v: Value) -> Value:
        if v.kind != "param" or not v.shape or v.shape[0] != self.e:
            return v
        if v.name not in self.sliced:
            data = self.g.param_array(v)[self.keep]
            self.sliced[v.name] = self.rw.add_param(f"{v.name}.pruned", data)
        return self.sliced[v.name]

    def run(self, router: Node) -> None:
        rw = self.rw
        new = rw.create("moe.router", [router.operands[0], *map(self.slice, router.operands[1:])],
                        router.attrs, loc=router.loc, before=router)
        rw.replace_all_uses(router.results[0], new.results[0])  # same meaning: just renormalised
        live = {router.results[1]: new.results[1]}  # values whose meaning or type changed
        for n in list(self.g.nodes):
            if n.graph is not self.g or not any(v in live for v in n.operands):
                continue
            ops = [live.get(v, v) for v in n.operands]
            if n.op in _EXPERT_OPS:
                ops = [self.slice(v) for v in ops]
            attrs = dict(n.attrs)
            if n.attrs.get("identity_experts"):
                raise PassError(f"prune-experts: {n!r} has identity experts (ids after the FFN "
                                "experts); pruning them is not supported")
            if n.op == "moe.align":
                attrs["num_experts"] = len(self.keep)
            elif n.op not in _EXPERT_OPS | _IDS_OPS:
                raise PassError(f"prune-experts: {n!r} reads expert ids or tiles; don't know how "
                                f"to rebuild it for pruned experts")
            m = rw.create(n.op, ops, attrs, loc=n.loc, before=n)
            for old, nv in zip(n.results, m.results, strict=True):
                if n.op in ("moe.align",) or not same_type(old.type, nv.type):
                    live[old] = nv
                else:
                    rw.replace_all_uses(old, nv)
        for old, nv in live.items():
            if old in self.g.outputs and same_type(old.type, nv.type):
                rw.replace_all_uses(old, nv)


@register_pass
@dataclass(frozen=True)
class PruneExperts(Pass):
    """Drop experts whose profiled load is under `threshold`; the router renormalises over the rest.

    Run after fuse-gating. Requires: `profile=` a `moec profile` JSON of this model.
    Ensures: pruned layers' routers, expert weights and moe.align see only the kept experts."""

    name: ClassVar[str] = "prune-experts"
    profile: str = ""
    threshold: float = 0.01

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        if not self.profile:
            raise PassError("prune-experts needs profile=PATH (a `moec profile` JSON)")
        layers = load_profile(self.profile)
        rw = Rewriter(graph)
        pruned: dict[str, list[int]] = {}
        seen: dict[str, float] = {}  # profiled routers of this graph -> their lowest load
        for router in graph.find("moe.router"):
            w = router.operands[1]
            layer = layers.get(w.name) if w.kind == "param" else None
            if layer is None or router.attrs["n_groups"] > 1:
                continue
            e = w.shape[0]
            if len(layer["load"]) != e:
                raise PassError(f"prune-experts: profile layer {w.name} has {len(layer['load'])} "
                                f"experts, the model {e}")
            seen[w.name] = min(layer["load"])
            keep = kept_experts(layer, self.threshold, router.attrs["k"])
            if len(keep) == e:
                continue
            _Pruner(graph, rw, keep, e).run(router)
            pruned[w.name] = keep
            gone = [i for i in range(e) if i not in keep]
            _report(f"{w.name}: removed {len(gone)} of {e} experts ({_ids(gone)}: load under "
                    f"{self.threshold}), kept {len(keep)}")
        eliminate_dead_code(graph, rw)
        rw.remove_unused_params()
        ctx.stats["prune-experts.kept"] = pruned
        if not pruned:
            _report(self._why_nothing(graph, layers, seen))
        return rw.changes > 0

    def _why_nothing(self, graph: Graph, layers: dict[str, dict], seen: dict[str, float]) -> str:
        if seen:
            name = min(seen, key=seen.__getitem__)
            return (f"removed no expert: every expert of the {len(seen)} profiled layer(s) has "
                    f"a load of at least {self.threshold} (the lowest: {seen[name]:.4f}, in "
                    f"{name}); raise threshold= to prune")
        routers = [r.operands[1].name for r in graph.find("moe.router")]
        return (f"removed no expert: no router of this model ({_names(routers)}) is in the "
                f"profile {self.profile} ({_names(list(layers))}, grouped routers excepted); "
                f"was it measured on this model?")


def _report(message: str) -> None:
    """What the pass did, on stderr: pruning is lossy, so it never happens silently."""
    print(f"prune-experts: {message}", file=sys.stderr, flush=True)


def _ids(ids: list[int], most: int = 16) -> str:
    return ", ".join(map(str, ids[:most])) + (", ..." if len(ids) > most else "")


def _names(names: list[str], most: int = 3) -> str:
    return (", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most
                                       else "")) or "none"
