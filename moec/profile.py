"""`moec profile`: per-layer expert load of an MoE model on sample inputs -> JSON + PNG heat map.

The model runs in the reference interpreter (`moec.ir.interpret`) with an observer that sees
every `moe.router`'s outputs (routing weights `[T, k]`, expert ids `[T, k]`); from those, per
layer (one router = one layer, named by its router weight parameter):

- `tokens_per_expert[e]`: slots routed to expert e (a token counts once per choice),
- `load[e]`: that count over all routed slots (`tokens * k`; sums to 1),
- `weight_mass[e]`: the sum of the routing weights given to e, and `weight_share[e]` its share,
- `coactivation[a][b]`: tokens that chose both a and b (a != b) in their top-k.

What can be profiled: a torch module (traced by the frontend, run through the default pipeline
so that routing is one moe.router per layer), an IR Graph, or a compiled artifact folder: its
`model.ir` (the final IR) is run on its `weights.safetensors`, whose packed GEMM panels
(`name@kernel.i`, `[..., ceil(N/NR), K, NR]`) are unpacked back to `[..., N, K]`. The artifact's
kernels are not run: routing decisions of the reference and the kernels agree except on exact
ties. prune-experts reads the JSON (`--passes default,+prune-experts{profile=p.json}`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moec.errors import InputError, MoecError
from moec.ir.graph import Graph, Node
from moec.ir.interpreter import interpret


class _Layer:
    def __init__(self, name: str, e: int, k: int) -> None:
        self.name, self.e, self.k = name, e, k
        self.tokens = 0
        self.counts = np.zeros(e, np.int64)
        self.mass = np.zeros(e, np.float64)
        self.coact = np.zeros((e, e), np.int64)

    def add(self, weights: np.ndarray, ids: np.ndarray) -> None:
        ids = ids.reshape(-1, ids.shape[-1])  # a capacity router on [B, S, H] gives [B, S, k]
        self.tokens += ids.shape[0]
        np.add.at(self.counts, ids.ravel(), 1)
        np.add.at(self.mass, ids.ravel(), weights.ravel().astype(np.float64))
        onehot = np.zeros((ids.shape[0], self.e), np.int64)
        np.put_along_axis(onehot, ids.astype(np.int64), 1, axis=1)
        co = onehot.T @ onehot
        np.fill_diagonal(co, 0)
        self.coact += co

    def to_json(self) -> dict[str, Any]:
        slots = max(1, self.tokens * self.k)
        mass = max(self.mass.sum(), 1e-30)
        return {"router": self.name, "num_experts": self.e, "top_k": self.k,
                "tokens": self.tokens, "tokens_per_expert": self.counts.tolist(),
                "load": (self.counts / slots).tolist(),
                "weight_mass": self.mass.tolist(), "weight_share": (self.mass / mass).tolist(),
                "coactivation": self.coact.tolist()}


def _router_name(node: Node) -> str:
    w = node.operands[1]
    return w.name if w.kind == "param" else node.results[1].ref


def profile_graph(graph: Graph, samples: Sequence[Sequence[np.ndarray]]) -> dict[str, Any]:
    """Run `graph` on each sample (a list of input arrays) and return the profile dict."""
    layers: dict[Node, _Layer] = {}

    def observe(node: Node, outs: list[np.ndarray]) -> None:
        if node.op != "moe.router":
            return
        if node not in layers:
            layers[node] = _Layer(_router_name(node), node.operands[1].shape[0], node.attrs["k"])
        layers[node].add(outs[0], outs[1])

    for sample in samples:
        interpret(graph, list(sample), observer=observe)
    if not graph.find("moe.router"):
        raise MoecError("profile: the model has no moe.router (run fuse-gating first?)")
    order = {n: i for i, n in enumerate(graph.nodes)}
    return {"layers": [layers[n].to_json() for n in sorted(layers, key=order.__getitem__)],
            "samples": len(samples)}


def graph_of_artifact(path: str | Path) -> Graph:
    """An artifact's final IR with its weights (packed GEMM panels unpacked)."""
    import safetensors.numpy

    from moec.ir.parser import parse

    root = Path(path)
    try:
        graph = parse((root / "model.ir").read_text())
        stored = safetensors.numpy.load_file(str(root / "weights.safetensors"))
    except OSError as e:
        raise MoecError(f"profile: {root} is not a readable artifact folder: {e}") from e
    packed = {name.split("@")[0]: a for name, a in stored.items() if "@" in name}
    for name, v in graph.params.items():
        a = stored.get(name)
        if a is None and name in packed:
            p = packed[name]  # [..., NB, K, NR] -> [..., N, K]
            a = np.swapaxes(p, -1, -2).reshape(*p.shape[:-3], -1, p.shape[-2])
            a = a[..., :v.shape[-2], :]
        if a is None:
            raise MoecError(f"profile: weight {name} is not in {root}/weights.safetensors")
        graph.param_data[name] = np.ascontiguousarray(a)
    return graph


def model_graph(model: Any, samples: Sequence[Sequence[Any]], max_tokens: int = 4096) -> Graph:
    """A torch module, a Graph or an artifact folder -> an IR graph with moe.router layers."""
    if isinstance(model, (str, Path)) and (Path(model) / "model.ir").exists():
        return graph_of_artifact(model)
    from moec.compiler import to_graph
    from moec.passes import PassManager, parse_pipeline

    example = tuple(samples[0]) if samples else ()
    if not isinstance(model, Graph):  # torch.export wants tensors
        import torch

        example = tuple(torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray)
                        else a for a in example)
    graph = to_graph(model, example, max_tokens)
    PassManager(parse_pipeline("default")).run(graph)
    return graph


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def profile(model: Any, samples: Sequence[Sequence[Any]], out: str | Path | None = None,
            png: str | Path | None = None, max_tokens: int = 4096) -> dict[str, Any]:
    """Profile expert load of `model` (torch module, Graph or artifact folder) on `samples`
    (each a tuple of model inputs); write the JSON to `out` and the heat map to `png`."""
    graph = model_graph(model, samples, max_tokens)
    data = profile_graph(graph, [[_numpy(a) for a in s] for s in samples])
    if out is not None:
        Path(out).write_text(json.dumps(data, indent=1) + "\n")
    if png is not None:
        heat_map(data, png)
    return data


def matplotlib_figure(what: str) -> Any:
    """matplotlib's `Figure` class; InputError naming the extra to install when it is absent
    (matplotlib is optional: `pip install 'moec[plot]'`)."""
    try:
        from matplotlib.figure import Figure  # noqa: PLC0415
    except ImportError:
        raise InputError(f"{what} draws with matplotlib, which is not installed: "
                         f"pip install 'moec[plot]' (or matplotlib)") from None
    return Figure


def heat_map(data: dict[str, Any], path: str | Path) -> None:
    """PNG: one row per layer, one column per expert, colour = load (share of routed slots)."""
    Figure = matplotlib_figure("moec profile --png")
    layers = data["layers"]
    e = max((la["num_experts"] for la in layers), default=1)
    grid = np.full((max(1, len(layers)), e), np.nan)
    for i, la in enumerate(layers):
        grid[i, :la["num_experts"]] = la["load"]
    # A Figure of its own, not pyplot: no backend switch (matplotlib.use), no global figures.
    fig = Figure(figsize=(min(2 + 0.4 * e, 20), 1.5 + 0.4 * len(layers)))
    ax = fig.subplots()
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer (router)")
    ax.set_yticks(range(len(layers)), [la["router"] for la in layers], fontsize=7)
    ax.set_title(f"expert load (share of routed slots), {data.get('samples', 0)} samples")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
