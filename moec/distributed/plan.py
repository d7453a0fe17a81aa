"""The expert-parallel plan an artifact carries (`meta["ep"]`, written by moec.codegen.ep), and
how experts are sharded over ranks. Pure Python: no torch, no TVM."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from moec.errors import ArtifactError

PLAN_VERSION = 1


@dataclass(frozen=True)
class Segment:
    """`fn(*inputs, *weights) -> tuple(outputs)`: shared computation, run by every rank."""

    fn: str
    inputs: tuple[str, ...]
    weights: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class Region:
    """One MoE layer's expert computation. `fn(tile_expert, sorted_ids, x, *weights)` runs the
    GEMM chain of ONE expert; `weights[j]` are the stored weight names of GEMM j, each sliced
    `[e:e+1]` on axis 0 for expert e."""

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
    weights: tuple[tuple[str, ...], ...]

    @property
    def flat_weights(self) -> tuple[str, ...]:
        return tuple(w for ws in self.weights for w in ws)


@dataclass(frozen=True)
class Plan:
    steps: tuple[tuple[str, int], ...]  # ("segment", i) | ("region", i), in run order
    segments: tuple[Segment, ...]
    regions: tuple[Region, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def parse_plan(meta: Mapping[str, Any], where: str) -> Plan:
    """The plan in an artifact's manifest meta; ArtifactError when it has none or a bad one."""
    data = meta.get("ep")
    if data is None:
        raise ArtifactError(f"{where} was compiled without expert-parallel support; recompile it "
                            f"with `moec compile --ep` (moec.compile(..., ep=True))")
    try:
        if data["version"] != PLAN_VERSION:
            raise ArtifactError(f"{where}: expert-parallel plan version {data['version']} is not "
                                f"supported by this moec (it reads version {PLAN_VERSION})")
        segments = tuple(Segment(s["fn"], tuple(s["inputs"]), tuple(s["weights"]),
                                 tuple(s["outputs"])) for s in data["segments"])
        regions = tuple(Region(**{**r, "weights": tuple(tuple(w) for w in r["weights"])})
                        for r in data["regions"])
        steps = tuple((k, int(v)) for st in data["steps"] for k, v in st.items())
        plan = Plan(steps, segments, regions, tuple(data["inputs"]), tuple(data["outputs"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{where}: malformed expert-parallel plan in manifest meta: "
                            f"{type(e).__name__}: {e}") from None
    for kind, i in plan.steps:
        if kind not in ("segment", "region") or not 0 <= i < len(getattr(plan, kind + "s")):
            raise ArtifactError(f"{where}: malformed expert-parallel plan: bad step {kind} {i}")
    return plan


def shard_bounds(num_experts: int, world: int) -> list[int]:
    """Contiguous expert ranges: rank r owns experts `[b[r], b[r+1])`. When `world` does not
    divide `num_experts`, the first `num_experts % world` ranks own one expert more; with more
    ranks than experts the last ranks own none (they still run the shared parts and take part
    in every exchange)."""
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    base, extra = divmod(num_experts, world)
    bounds = [0]
    for r in range(world):
        bounds.append(bounds[-1] + base + (1 if r < extra else 0))
    return bounds
