"""`moec.compile`: model -> IR -> passes -> TVM kernels -> Artifact.

    art = moec.compile(model, (x,), max_tokens=4096)     # torch.nn.Module and example inputs
    art.save("model.moec")
    m = moec.load("model.moec"); y = m(x)
"""

from __future__ import annotations

import math
import re
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from moec import env
from moec.errors import CodegenError, InputError
from moec.ir.graph import Graph, Node
from moec.ir.printer import print_graph
from moec.ir.types import FLOAT_DTYPES, Sym
from moec.passes.base import Pass
from moec.passes.manager import (
    DumpIR,
    Instrument,
    PassManager,
    PassTiming,
    parse_pipeline,
    stats_json,
)
from moec.passes.reorder_dispatch import ReorderDispatch


def parse_target(target: str) -> dict[str, Any]:
    """"cpu" (LLVM for this host's CPU), "cuda" (= "cuda:sm_90"), "cuda:sm_80", "cuda:sm_90"."""
    if target in ("cpu", "llvm"):
        return {"kind": "llvm"}
    if target == "cuda":
        return {"kind": "cuda", "arch": "sm_90"}
    m = re.fullmatch(r"cuda:(sm_\d+a?)", target)
    if m:
        return {"kind": "cuda", "arch": m.group(1)}
    raise CodegenError(f"unknown target {target!r}; use 'cpu', 'cuda', 'cuda:sm_80' or "
                       f"'cuda:sm_90'")


def to_graph(model: Any, example_inputs: Sequence[Any], max_tokens: int,
             dynamic_dims: Mapping[int | str, Any] | None = None) -> Graph:
    if dynamic_dims is not None and (isinstance(model, (Graph, str, Path)) or model is None):
        raise InputError("dynamic_dims applies to torch modules (their example inputs); an IR "
                         "graph, ONNX file or checkpoint folder declares its dims itself")
    if isinstance(model, Graph):
        return model
    if isinstance(model, (str, Path)) and str(model).endswith(".onnx"):  # an ONNX model file
        from moec.frontend.onnx_frontend import from_onnx

        return from_onnx(model, max_tokens=max_tokens)
    if isinstance(model, (str, Path)):  # a Hugging Face checkpoint folder: ids [T] -> logits
        from moec.frontend.hf_model import from_checkpoint

        return from_checkpoint(model, max_tokens=max_tokens)
    if model is None or not callable(model):
        raise InputError(f"model must be a torch.nn.Module, a moec IR Graph, an .onnx file or a "
                         f"checkpoint folder, got {type(model).__name__}")
    if example_inputs is None or isinstance(example_inputs, (str, bytes)):
        raise InputError("example_inputs must be a sequence with one example tensor per model "
                         "input, e.g. (x,)")
    try:
        examples = tuple(example_inputs)
    except TypeError:
        examples = (example_inputs,)  # a single tensor
    from moec.frontend import from_torch

    return from_torch(model, examples, max_tokens=max_tokens, dynamic_dims=dynamic_dims)


def token_limits(graph: Graph, max_tokens: int) -> list[dict[str, Any]]:
    """`max_tokens` bounds the token count of each floating-point input with several dynamic
    leading dims: `B*S <= max_tokens` for `[B, S, H]` (each of B and S alone is bounded by its
    dim range)."""
    out: list[dict[str, Any]] = []
    for v in graph.inputs:
        syms = [d for d in v.shape[:-1] if isinstance(d, Sym)]
        if v.dtype in FLOAT_DTYPES and len(syms) > 1:
            expr = str(math.prod(syms))
            if all(lim["expr"] != expr for lim in out):
                out.append({"expr": expr, "max": max_tokens})
    return out


def compile(model: Any, example_inputs: Sequence[Any] = (), *, target: str = "cpu",
            pipeline: str = "default", passes: str | Sequence[str | Pass] | None = None,
            max_tokens: int = 4096, dump_ir: str | Path | None = None,
            time_passes: bool = False, instruments: Sequence[Instrument] = (),
            progress: bool = False, ep: bool = False,
            quantize: str | None = None, quantize_dense: bool = False,
            tuning: bool | str | Path = True,
            generate: bool | None = None, block_size: int = 16,
            dynamic_dims: Mapping[int | str, Any] | None = None) -> Artifact:  # noqa: F821
    """Compile an MoE model to an Artifact.

    model: a torch.nn.Module (traced with torch.export; MoE blocks recognised and lifted into
    moe.* ops), a Hugging Face checkpoint folder (config.json + safetensors; the whole causal LM,
    token ids [T] -> logits [T, vocab], no example inputs needed), a path ending in .onnx
    (moec.frontend.onnx_frontend.from_onnx) or an already-built IR Graph.
    example_inputs: one example per model input. Every leading dim of a floating-point input
    is dynamic (all but the last): `[T, H]` gives T, `[B, S, H]` B and S, each in
    0..max_tokens, and max_tokens also bounds the token count B*S (in the signature's limits).
    The artifact takes inputs of the example's rank; one whose signature is `[B, S, H]` also
    takes `[S, H]`, as one sequence (B=1, dropped from the outputs again).
    dynamic_dims: replaces that guess for the inputs it names, by position or argument name,
    as {axis: dim name} or {axis: (name, min, max)}: `{0: {0: "B", 1: "S"}}`,
    `{"x": {1: ("S", 1, 512)}}`, `{"table": None}` (all static); same name, same dim.
    pipeline: a named pipeline ("default"); passes: a pass list that replaces it, as a string
    ("default,+my-pass{opt=1}") or a list of names and Pass objects.
    dump_ir: folder for the IR before and after each pass; time_passes: print pass timings.
    quantize: "int8" or "int4" appends quantize-experts (weight-only expert weights; int8 per
    output channel, int4 in groups of 128 along K with zero points; "int8-g32" / "int4-g64"
    choose the group size): weights.safetensors holds them quantised.
    quantize_dense: also quantise the dense linears (attention projections, shared experts,
    the LM head; not the routers) to int8 per output channel (quantize-linears, after the
    pipeline): with quantize="int8", what llama.cpp's q8_0 stores. CPU targets only.
    ep: also build the expert-parallel entry functions (moec.codegen.ep), so that the artifact
    can run sharded over ranks: `moec.load(path, ep_group=...)`, `moec run --ep N`.
    tuning: True uses the tuning database (entries shipped with moec and the per-user cache
    that `moec tune` writes) for the expert GEMMs' block_m and tiles on CPU targets; a path adds
    that database file; False uses the built-in defaults. See moec.codegen.tune.
    generate: for a checkpoint folder (or a transformers causal LM module without example
    inputs): True (the default there) compiles the generation step over a paged KV cache
    (moec.frontend.hf_generate; entry points `main` and `decode`, used by `model.generate`
    and `moec generate`), with the tokenizer files of the folder; False compiles the plain
    forward of one sequence (ids [T] -> logits [T, vocab]). max_tokens is then the most
    tokens one step runs (longer prompts are prefilled in chunks). block_size: tokens per KV
    cache block. With ep=True the default is the plain forward (generation is not expert-
    parallel yet).
    """
    from moec.codegen.build import build
    from moec.passes.widen_activations import WidenActivations, has_half_compute
    from moec.runtime.artifact import Artifact

    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise InputError(f"max_tokens must be an int, got {max_tokens!r} "
                         f"({type(max_tokens).__name__})")
    if max_tokens < 1:
        raise InputError(f"max_tokens must be >= 1, got {max_tokens}")
    tgt = parse_target(target)
    # the options are checked before tracing, which can take minutes
    pass_list = parse_pipeline(passes if passes is not None else pipeline)
    if quantize is not None:
        from moec.passes.quantize_experts import QuantizeExperts, parse_mode

        bits, group_size = parse_mode(quantize)
        quantize_pass = QuantizeExperts(bits=bits, group_size=group_size)
    if quantize_dense and tgt.get("kind") != "llvm":
        raise InputError(f"quantize_dense (int8 dense linears) has CPU kernels only; the target "
                         f"is {target!r}: compile for it without quantize_dense")
    t0 = time.perf_counter()
    step = _progress(progress)
    step("tracing")
    gen_meta, extra_files = None, {}
    limits: list[dict[str, Any]] = []
    if ep and generate is None:
        generate = False  # expert-parallel artifacts are the plain forward (no EP generation)
    if _generates(model, example_inputs, generate):
        if ep:
            raise InputError("generation artifacts cannot be built expert-parallel yet "
                             "(ep=True with generate=True); leave generate out for the plain "
                             "forward")
        if dynamic_dims is not None:
            raise InputError("dynamic_dims applies to a torch module's forward, not to a "
                             "generation artifact (compile with generate=False)")
        graph, gen_meta, extra_files = _step_graph(model, max_tokens, block_size, tgt)
    else:
        graph = to_graph(model, example_inputs, max_tokens, dynamic_dims)
        if not isinstance(model, (Graph, str, Path)):
            limits = token_limits(graph, max_tokens)
    tuning_db = None if tgt.get("kind") != "llvm" or tuning is False else \
        _tuning_entries(pass_list, None if tuning is True else Path(tuning))
    if quantize is not None:
        pass_list.append(quantize_pass)
    elif graph.quant_forms:  # weights read quantised (ONNX QMoE): their own exact parts
        from moec.passes.quantize_experts import QuantizeExperts

        pass_list.append(QuantizeExperts(only_exact=True))
    if gen_meta is not None:
        from moec.passes.offload_experts import OffloadExperts

        pass_list.append(OffloadExperts())  # the expert cache's hook (identity when resident)
    if tgt.get("kind") == "llvm" and not any(isinstance(p, WidenActivations) for p in pass_list) \
            and has_half_compute(graph):
        # the CPU kernels compute in float32 and widen half GEMM weights as they read them
        pass_list.append(WidenActivations())
    if quantize_dense:
        from moec.passes.quantize_linears import QuantizeLinears

        pass_list.append(QuantizeLinears())  # after widen-activations: float32 activations
    ins = list(instruments)
    timing = PassTiming(stream=sys.stderr) if time_passes else None
    if timing:
        ins.append(timing)
    if dump_ir:
        ins.append(DumpIR(dump_ir))
    ranges = {} if gen_meta is not None else index_ranges(graph)  # (steps check their ids)
    missing = [n for n in graph.params if graph.param_data.get(n) is None]
    if missing:  # text IR parses to shape-only parameters
        raise InputError(f"parameter(s) {', '.join('@' + n for n in missing[:5])} have no data: "
                         f"an artifact holds every weight's values; set graph.param_data[name] "
                         f"for each parameter first")
    step("passes")
    pm = PassManager(pass_list, ins)
    pm.run(graph)
    tiles, tuned = _apply_tuning(graph, tuning_db) if tuning_db else ({}, {})
    step("kernels")
    functions = (("main", False), ("decode", True), ("main_offload", False, True),
                 ("decode_offload", True, True)) if gen_meta else (("main", False),)
    built = build(graph, tgt, tiles=tiles, functions=functions, ep=ep)
    ep_plan = built.ep_plan
    if gen_meta is not None and built.experts:
        from moec.codegen.offload import offload_meta, router_file
        from moec.runtime.expert_cache import ROUTERS

        gen_meta = {**gen_meta, "offload": offload_meta(built.experts, graph)}
        extra_files = {**extra_files, ROUTERS: router_file(graph)}
    art = Artifact(
        executable=built.executable,
        weights=built.weights,
        ir_text=print_graph(graph),
        target=built.target_info,
        signature={**built.signature, **({"limits": limits} if limits else {})},
        pipeline=[p.spec() for p in pass_list],
        meta={"kernels": built.kernels, **({"ep": ep_plan} if ep_plan else {}),
              **({"tuning": tuned} if tuned else {}),
              **({"pass_stats": stats_json(pm.ctx.stats)} if pm.ctx.stats else {}),
              **({"input_ranges": ranges} if ranges else {}),
              **({"generation": gen_meta} if gen_meta else {})},
        extra_files=extra_files,
    )
    if env.debug_level() >= 1:
        print(f"moec: compiled in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    return art


def index_ranges(graph: Graph) -> dict[str, list[int]]:
    """Integer graph inputs that index a table (token ids into an embedding) -> `[0, rows)`,
    the values the runtime accepts for them (moec.runtime.inputs.check_ranges)."""
    out: dict[str, list[int]] = {}
    for ids in graph.inputs:
        seen, todo = set(), [ids]
        while todo:  # the input and its reshapes (the values, rearranged)
            v = todo.pop()
            for node, slot in v.uses:
                if id(node) in seen:
                    continue
                seen.add(id(node))
                if node.op == "core.reshape":
                    todo.append(node.results[0])
                elif node.op == "core.embedding" and slot == 1 and isinstance(
                        node.operands[0].shape[0], int):
                    rows = int(node.operands[0].shape[0])
                    out[ids.name] = [0, min(rows, out.get(ids.name, [0, rows])[1])]
    return out


def _generates(model: Any, example_inputs: Any, generate: bool | None) -> bool:
    """Whether `compile` builds the generation step (see its `generate` argument)."""
    from moec.frontend.hf_model import is_checkpoint

    if isinstance(model, (str, Path)) and not str(model).endswith(".onnx"):
        ok = is_checkpoint(model)
    else:
        ok = _is_hf_causal_lm(model) and not example_inputs
    if generate and not ok:
        raise InputError("generate=True needs a Hugging Face checkpoint folder or a "
                         "transformers causal LM module (without example inputs)")
    return ok and generate is not False


def _is_hf_causal_lm(model: Any) -> bool:
    mod = sys.modules.get("transformers")  # a transformers model means transformers is imported
    if mod is None or not isinstance(model, mod.PreTrainedModel):
        return False
    return model.get_output_embeddings() is not None


def _step_graph(model: Any, max_tokens: int, block_size: int, tgt: dict[str, Any]
                ) -> tuple[Graph, dict[str, Any], dict[str, bytes]]:
    """The generation step graph, its metadata and the tokenizer files to ship with it."""
    from moec.frontend.hf_generate import step_graph, tokenizer_files
    from moec.frontend.hf_model import load_checkpoint

    folder = None
    if isinstance(model, (str, Path)):
        folder = Path(model)
        model = load_checkpoint(folder)
    import torch

    # CPU kernels compute in float32 (widen-activations), and the caches follow them
    kv_dtype = torch.float32 if tgt.get("kind") == "llvm" else None
    graph, gen = step_graph(model, max_tokens=max_tokens, block_size=block_size,
                            kv_dtype=kv_dtype)
    files = tokenizer_files(folder) if folder is not None else {}
    return graph, gen, files


def _tuning_entries(pass_list: list, db: Path | None) -> dict[str, Any]:
    """The tuning database's entries for this CPU. When there are any, a reorder-dispatch at its
    default block_m in `pass_list` is replaced by one that takes block_m from them."""
    from moec.codegen import tune
    from moec.passes.reorder_dispatch import ReorderDispatch

    cpu = tune.cpu_name()
    entries = {k: v for k, v in tune.load_db(db).items() if k.split("|", 1)[0] == cpu}
    if entries:
        for i, p in enumerate(pass_list):
            if type(p) is ReorderDispatch and p.block_m == tune.DEFAULT_BLOCK_M:
                pass_list[i] = _TunedDispatch(entries=entries, chosen=[])
    return entries


class _TunedDispatch(ReorderDispatch):
    """reorder-dispatch whose block_m is chosen from the tuning database when it runs, on the MoE
    layers as they reach it (a pass before it may have changed their top-k or expert count):
    the tuned block_m when every tuned layer agrees on one, else the default."""

    def __init__(self, entries: dict[str, Any], chosen: list[int]) -> None:
        super().__init__()
        object.__setattr__(self, "_entries", entries)
        object.__setattr__(self, "_chosen", chosen)

    def run(self, graph: Graph, ctx: Any) -> bool:
        from moec.codegen import tune

        tuned = {c.block_m for c in (tune.choose(s, self._entries) for s in tune.layers_of(graph))
                 if c.source == "tuned"}
        self._chosen[:] = [tuned.pop() if len(tuned) == 1 else self.block_m]
        return ReorderDispatch(block_m=self._chosen[0]).run(graph, ctx)

    def spec(self) -> str:
        return ReorderDispatch(block_m=self._chosen[0] if self._chosen else self.block_m).spec()


def _lowered_layers(graph: Graph) -> list[tuple[Any, Node, Node]]:
    """(LayerShape, first GEMM, second GEMM) of every MoE layer as the pipeline left it: the
    shape read off its two grouped GEMMs (the second reads the first's output)."""
    from moec.codegen import tune
    from moec.ir.types import tvm_dtype

    out = []
    for g2 in graph.find("moe.grouped_matmul"):
        g1 = g2.operands[0].producer
        if g1 is None or g1.op != "moe.grouped_matmul" or g2.attrs["activation"] != "none":
            continue
        x, w = g1.operands[0], g1.operands[1]
        e, inter, hidden = w.shape
        half = w.dtype in ("f16", "bf16")  # widened half layers keep half weights, as tuned
        shape = tune.LayerShape(experts=e, hidden=hidden, intermediate=inter,
                                top_k=g1.attrs["top_k"], activation=g1.attrs["activation"],
                                bias=bool(g1.attrs["bias"]),
                                dtype=tvm_dtype(w.dtype if half else x.dtype))
        out.append((shape, g1, g2))
    return out


def _apply_tuning(graph: Graph, entries: dict[str, Any]
                  ) -> tuple[dict[tuple, tuple[int, int]], dict[str, Any]]:
    """Tuned grouped-GEMM tiles for the lowering, looked up after the pipeline, per MoE layer as
    lowered (its shape after every pass). A layer's entry applies when its block_m is the one
    the layer was dispatched with. Returns (tiles, what was applied, for the manifest)."""
    from moec.codegen import tune

    tiles: dict[tuple, tuple[int, int]] = {}
    applied = {}
    for shape, g1, g2 in _lowered_layers(graph):
        c = tune.choose(shape, entries)
        bm = g1.attrs["block_m"]
        if c.source != "tuned" or c.block_m != bm:
            continue  # no entry, or its tiles were measured with another block_m
        for gemm, want, t in zip((g1, g2), shape.gemms(), c.tiles, strict=True):
            n, k = gemm.operands[1].shape[1:]
            a = gemm.attrs
            if t and (n, k, a["gather"], a["activation"]) == want:
                tiles[(shape.experts, n, k, bm, a["top_k"], a["gather"], a["activation"])] = \
                    tuple(t)
        applied[shape.key] = {"cpu": tune.cpu_name(), "block_m": bm,
                              "tiles": [list(t) if t else None for t in c.tiles]}
    return tiles, applied


def _progress(enabled: bool):
    if not enabled:
        return lambda name: None
    t0 = time.perf_counter()

    def step(name: str) -> None:
        print(f"[{time.perf_counter() - t0:6.2f}s] {name}...", file=sys.stderr, flush=True)

    return step
