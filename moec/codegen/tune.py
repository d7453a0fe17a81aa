"""Tuning of the expert GEMMs by measurement, and the tuning database `moec compile` reads.

What is tuned, per MoE layer shape and CPU: the tile height `block_m` of the aligned layout (one
value for the whole layer: moe.align and both grouped GEMMs share it) and the micro-kernel tile
(MR rows x NR columns) of each of the two grouped GEMMs. Each candidate is compiled on its own
and timed on synthetic routings (uniform, fresh per repetition) at a few token counts; a layer's
score for a `block_m` is the geometric mean over the token counts of (time / best time at that
count), so decode and prefill weigh the same. Times are the fastest of a few calls (4x as many
at up to 64 tokens): on a shared machine other load only adds time. All the candidates of one
GEMM, whatever their NR, are called in turn within each repetition, on the same routing, so
that a slow spell of the machine slows them all instead of deciding the winner (timed one after
another, candidates here differed by 1.5x run to run).

The database is JSON, `{"format": 1, "entries": {"<mcpu>|<layer key>": entry}}`; `moec compile`
merges the entries shipped in moec/tuning/*.json with the per-user cache
(`$MOEC_TUNING_DB`, else `~/.cache/moec/tuning.json`, which `moec tune` writes). A layer without
an entry gets the built-in defaults (block_m 32, `grouped_tiles`). The entries a compile used go
into the artifact's manifest.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moec.errors import InputError
from moec.ir.graph import Graph, Node
from moec.runtime.inputs import numpy_dtype

FORMAT = 1
DEFAULT_BLOCK_M = 32
BLOCK_MS = (16, 32, 64)
SMALL_TOKENS, SMALL_REPS = 64, 4  # calls at up to 64 tokens take milliseconds: 4x the reps
# costs little and narrows the spread of their fastest-of times
SHIPPED = Path(__file__).resolve().parent.parent / "tuning"


@dataclass(frozen=True)
class LayerShape:
    """What the tuning of one MoE layer depends on (a `moe.experts` node)."""

    experts: int
    hidden: int
    intermediate: int
    top_k: int
    activation: str  # grouped GEMM activation of the first GEMM, e.g. silu_mul
    bias: bool
    dtype: str

    @property
    def key(self) -> str:
        return (f"E{self.experts}_H{self.hidden}_I{self.intermediate}_k{self.top_k}_"
                f"{self.activation}{'_bias' if self.bias else ''}_{self.dtype}")

    @property
    def compute_dtype(self) -> str:
        """The dtype the CPU kernels compute in: float32 for half layers, whose weights stay
        half (widen-activations)."""
        return "float32" if self.dtype in ("float16", "bfloat16") else self.dtype

    @property
    def w_dtype(self) -> str | None:
        """The GEMM weights' dtype when it differs from the compute dtype."""
        return self.dtype if self.dtype != self.compute_dtype else None

    def gemms(self) -> list[tuple[int, int, bool, str]]:
        """(N, K, gather, activation) of the layer's two grouped GEMMs."""
        return [(self.intermediate, self.hidden, True, self.activation),
                (self.hidden, self.intermediate, False, "none")]


def layer_shape(node: Node) -> LayerShape:
    """The LayerShape of a `moe.experts` node (before the pipeline)."""
    from moec.ir.types import tvm_dtype

    a = node.attrs
    x, _, ids = node.operands[:3]
    w_up = node.operands[4] if a["gated"] else node.operands[3]
    act = a["activation"] + ("_mul" if a["gated"] else "")
    return LayerShape(experts=w_up.shape[0], hidden=x.shape[1], intermediate=w_up.shape[1],
                      top_k=ids.shape[1], activation=act, bias=bool(a["bias"]),
                      dtype=tvm_dtype(x.dtype))


def cpu_name() -> str:
    from tvm.target import codegen

    return str(codegen.llvm_get_system_cpu())


# ------------------------------------------------------------------------------ database
def user_db_path() -> Path:
    env = os.environ.get("MOEC_TUNING_DB")
    return Path(env) if env else Path.home() / ".cache" / "moec" / "tuning.json"


def read_db(path: Path) -> dict[str, Any]:
    """The entries of one database file; a missing file has none. A damaged one is an error
    that names the file (delete it or fix it), never silently ignored."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
            raise ValueError(f"want format {FORMAT} with an `entries` object")
    except (ValueError, AttributeError) as e:
        raise InputError(f"tuning database {path} is not readable ({e}); delete it or run "
                         f"`moec tune` again") from None
    return data["entries"]


def load_db(extra: Path | None = None) -> dict[str, Any]:
    """Shipped entries, then the user's cache, then `extra` (later ones win)."""
    entries: dict[str, Any] = {}
    for f in sorted(SHIPPED.glob("*.json")) if SHIPPED.is_dir() else []:
        entries.update(read_db(f))
    entries.update(read_db(user_db_path()))
    if extra is not None:
        if not extra.exists():
            raise InputError(f"tuning database {extra} does not exist")
        entries.update(read_db(extra))
    return entries


def write_db(path: Path, new: dict[str, Any]) -> None:
    """Merge `new` into the database at `path`, atomically (temp file + rename)."""
    entries = read_db(path)
    entries.update(new)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tuning-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump({"format": FORMAT, "entries": dict(sorted(entries.items()))}, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


@dataclass(frozen=True)
class Choice:
    """What the compiler does for one layer: block_m and the (MR, NR) of its two GEMMs
    (None: the built-in default)."""

    block_m: int = DEFAULT_BLOCK_M
    tiles: tuple[tuple[int, int] | None, tuple[int, int] | None] = (None, None)
    source: str = "default"


def choose(shape: LayerShape, entries: dict[str, Any]) -> Choice:
    """The tuned choice for `shape` on this CPU, or the defaults. An entry whose tiles this
    CPU's vector registers cannot take (tiles measured with AVX2 on a host with AVX-512, whose
    tiles are twice as wide, e.g. an entry copied from another machine of the same CPU name)
    gives the defaults with a warning, rather than a compile that fails."""
    from moec.codegen.kernels.grouped_matmul import check_tiles
    from moec.errors import CodegenError

    key = f"{cpu_name()}|{shape.key}"
    e = entries.get(key)
    if e is None:
        return Choice()
    tiles = tuple(tuple(t) if t else None for t in e["tiles"])
    for t in tiles:
        try:
            if t:
                check_tiles("tuning entry", shape.compute_dtype, t)
        except CodegenError as err:
            warnings.warn(f"moec: the tuning entry {key} does not fit this CPU ({err}); using "
                          f"the default block_m and tiles for this layer. `moec tune` on this "
                          f"machine measures new ones", RuntimeWarning, stacklevel=2)
            return Choice()
    return Choice(int(e["block_m"]), tiles, "tuned")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ measuring
def random_layout(t: int, e: int, k: int, bm: int, rng: np.random.Generator
             ) -> tuple[np.ndarray, np.ndarray]:
    """sorted_ids, tile_expert of a uniform random routing (docs/ops.md's align layout)."""
    return layout_of(np.argsort(rng.random((t, e)), axis=1)[:, :k], e, bm)


def layout_of(ids: np.ndarray, e: int, bm: int) -> tuple[np.ndarray, np.ndarray]:
    """sorted_ids, tile_expert of the routing `ids` [T, k] (docs/ops.md's align layout)."""
    t, k = ids.shape
    ids = ids.reshape(-1)
    tl = t * k // bm + e
    sorted_ids = np.full(tl * bm, t * k, np.int32)
    tile_expert = np.full(tl, -1, np.int32)
    r = ti = 0
    for ex in range(e):
        slots = np.nonzero(ids == ex)[0]
        sorted_ids[r:r + len(slots)] = slots
        n_tiles = -(-len(slots) // bm)
        tile_expert[ti:ti + n_tiles] = ex
        r, ti = r + n_tiles * bm, ti + n_tiles
    return sorted_ids, tile_expert


def tile_candidates(dtype: str, gated: bool) -> list[tuple[int, int]]:
    """(MR, NR) micro-kernels that fit the SIMD register file (16 registers with AVX2, 32 with
    AVX-512; accumulators MR * NR / lanes, doubled when gated)."""
    from moec.codegen.kernels.base import vector_lanes

    vl = vector_lanes(dtype)
    regs = 32 if vl * 4 >= 64 else 16
    out = []
    for mr in (4, 6, 8):
        for nv in (1, 2):  # 3 vectors per row measured 4-6x slower here (Zen 3)
            acc = mr * nv * (2 if gated else 1)
            if acc + nv + 1 <= regs:
                out.append((mr, nv * vl))
    return out


def flush_bytes() -> int:
    """Bytes to write between timed calls to evict the last-level cache: twice the largest
    cache that Linux lists, at least 64 MiB."""
    l3 = 0
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = f.read_text().strip().upper()
            l3 = max(l3, int(text.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}.get(text[-1], 0))
        except (OSError, ValueError):
            continue
    return max(64 << 20, 2 * l3)


class _Bench:
    """One of a layer's grouped GEMMs (0: gate/up, 1: down) with its weights packed, timed for
    any block_m, (MR, NR) and token count (the packing is one-vector panels whatever the tile:
    one copy serves every candidate). The weights' values do not change the time (a constant,
    no denormals): one allocation instead of random data keeps the memory to one copy of the
    GEMM's weights."""

    def __init__(self, shape: LayerShape, which: int) -> None:
        import tvm

        from moec.codegen.kernels import grouped_matmul

        self.shape, self.which = shape, which
        n, k, gather, act = shape.gemms()[which]
        probe = grouped_matmul(shape.experts, n, k, 16, shape.top_k, gather, act,
                               shape.compute_dtype, bias=shape.bias, w_dtype=shape.w_dtype)
        packed = []
        for _ in range(2 if act.endswith("_mul") else 1):  # distinct memory: decode streams both
            w = np.full((shape.experts, n, k), 0.01, numpy_dtype(shape.dtype))
            packed.append(tvm.runtime.tensor(probe.arg_transforms[1](w), tvm.cpu()))
            del w
        bias = [tvm.runtime.tensor(np.zeros((shape.experts, n), shape.compute_dtype), tvm.cpu())
                for _ in range(len(packed) if shape.bias else 0)]
        self.weights = packed + bias

    def times(self, cands: Sequence[tuple[int, tuple[int, int]]], tokens: int, reps: int,
              seed: int = 0) -> list[float]:
        """Seconds per candidate (block_m, (MR, NR)): the fastest of `reps` calls (other load
        on the machine only ever adds time). The candidates are called in turn within each
        repetition, on the same fresh uniform routing, so that a slow spell of the machine
        slows all of them rather than deciding the winner; the last-level cache is flushed
        before each call, else every candidate after the first would find the experts it
        reads in the cache (Mixtral-like down at 1 token: 0.64 ms instead of 0.88)."""
        import tvm

        from moec.codegen.kernels import grouped_matmul
        from moec.codegen.target import host_target

        shape = self.shape
        n, k, gather, act = shape.gemms()[self.which]
        e, tk = shape.experts, shape.top_k
        dev = tvm.cpu()
        fns = []
        for block_m, tiles in cands:
            kern = grouped_matmul(e, n, k, block_m, tk, gather, act, shape.compute_dtype,
                                  bias=shape.bias, tiles=tiles, w_dtype=shape.w_dtype)
            fns.append(tvm.compile(tvm.IRModule({kern.name: kern.func}),
                                   target=host_target())[kern.name])
        rng = np.random.default_rng(seed)
        np_dt = numpy_dtype(shape.compute_dtype)
        x_rows = {bm: tokens if gather else (tokens * tk // bm + e) * bm for bm, _ in cands}
        xs = {r: tvm.runtime.tensor(rng.standard_normal((r, k)).astype(np_dt), dev)
              for r in set(x_rows.values())}
        best = [math.inf] * len(cands)
        flush = np.ones(flush_bytes() // 4, np.float32)
        for rep in range(reps + 1):  # the first round warms up
            ids = np.argsort(rng.random((tokens, e)), axis=1)[:, :tk]
            layouts = {bm: [tvm.runtime.tensor(a, dev) for a in layout_of(ids, e, bm)]
                       for bm in {bm for bm, _ in cands}}
            for c, ((bm, _), fn) in enumerate(zip(cands, fns, strict=True)):
                si, te = layouts[bm]
                out = tvm.runtime.empty((si.shape[0], n), shape.compute_dtype, dev)
                flush += 1.0  # evict the weights the previous candidate read (same routing)
                t0 = time.perf_counter()
                fn(xs[x_rows[bm]], *self.weights, si, te, out)
                if rep:
                    best[c] = min(best[c], time.perf_counter() - t0)
        return best


def tune_layer(shape: LayerShape, tokens: Sequence[int] = (1, 64, 512), reps: int = 3,
               block_ms: Sequence[int] = BLOCK_MS,
               progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The database entry of `shape`: the best block_m and tiles, with what was measured."""
    import gc

    from moec.codegen.kernels.grouped_matmul import grouped_tiles

    say = progress or (lambda _m: None)
    # best[(block_m, which)] = (score, tiles, {tokens: seconds})
    best: dict[tuple[int, int], tuple[float, tuple[int, int], dict[int, float]]] = {}
    seen: dict[tuple[int, int, tuple[int, int]], dict[int, float]] = {}
    for which, (_, _, _, act) in enumerate(shape.gemms()):
        gated = act.endswith("_mul")
        group = sorted({(bm, t) for bm in block_ms
                        for t in {grouped_tiles(shape.compute_dtype, bm, gated),
                                  *tile_candidates(shape.compute_dtype, gated)} if t[0] <= bm})
        bench = _Bench(shape, which)
        timed = {t: bench.times(group, t, reps * (SMALL_REPS if t <= SMALL_TOKENS else 1))
                 for t in tokens}
        for i, (bm, tiles) in enumerate(group):
            ts = {t: timed[t][i] for t in tokens}
            seen[(bm, which, tiles)] = ts
            score = sum(math.log(ts[t]) for t in tokens)
            say(f"block_m {bm} gemm {which} tiles {tiles}: "
                + ", ".join(f"T={t} {1e3 * v:.2f} ms" for t, v in ts.items()))
            if (bm, which) not in best or score < best[(bm, which)][0]:
                best[(bm, which)] = (score, tiles, ts)
        del bench
        gc.collect()
    per_bm = {bm: {t: sum(best[(bm, w)][2][t] for w in range(2)) for t in tokens}
              for bm in block_ms}
    best_at = {t: min(v[t] for v in per_bm.values()) for t in tokens}

    def score(bm: int) -> float:
        return sum(math.log(per_bm[bm][t] / best_at[t]) for t in tokens) / len(tokens)

    bm = min(per_bm, key=score)
    default = None  # what the compiler does without an entry, if it was among the candidates
    keys = [(DEFAULT_BLOCK_M, w, grouped_tiles(shape.compute_dtype, DEFAULT_BLOCK_M,
                                               g[3].endswith("_mul")))
            for w, g in enumerate(shape.gemms())]
    if all(k in seen for k in keys):
        default = {str(t): round(1e3 * sum(seen[k][t] for k in keys), 4) for t in tokens}
    return {"block_m": bm, "tiles": [list(best[(bm, w)][1]) for w in range(2)],
            "measured_ms": {str(t): round(1e3 * per_bm[bm][t], 4) for t in tokens},
            "default_ms": default,
            "tokens": list(tokens), "threads": os.environ.get("TVM_NUM_THREADS"),
            "when": time.strftime("%Y-%m-%d")}


def layers_of(graph: Graph) -> list[LayerShape]:
    """The distinct MoE layer shapes of a graph straight from the frontend."""
    seen: dict[str, LayerShape] = {}
    for node in graph.find("moe.experts"):
        s = layer_shape(node)
        seen.setdefault(s.key, s)
    return list(seen.values())
