"""`moec.compile`: model -> IR -> passes -> TVM kernels -> Artifact.

    art = moec.compile(model, (x,), max_tokens=4096)     # torch.nn.Module and example inputs
    art.save("model.moec")
    m = moec.load("model.moec"); y = m(x)
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moec import env
from moec.errors import CodegenError, InputError
from moec.ir.graph import Graph
from moec.ir.printer import print_graph
from moec.passes.base import Pass
from moec.passes.manager import DumpIR, Instrument, PassManager, PassTiming, parse_pipeline


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


def to_graph(model: Any, example_inputs: Sequence[Any], max_tokens: int) -> Graph:
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

    return from_torch(model, examples, max_tokens=max_tokens)


def compile(model: Any, example_inputs: Sequence[Any] = (), *, target: str = "cpu",
            pipeline: str = "default", passes: str | Sequence[str | Pass] | None = None,
            max_tokens: int = 4096, dump_ir: str | Path | None = None,
            time_passes: bool = False, instruments: Sequence[Instrument] = (),
            progress: bool = False, ep: bool = False,
            quantize: str | None = None,
            tuning: bool | str | Path = True,
            generate: bool | None = None, block_size: int = 16) -> Artifact:  # noqa: F821
    """Compile an MoE model to an Artifact.

    model: a torch.nn.Module (traced with torch.export; MoE blocks recognised and lifted into
    moe.* ops), a Hugging Face checkpoint folder (config.json + safetensors; the whole causal LM,
    token ids [T] -> logits [T, vocab], no example inputs needed), a path ending in .onnx
    (moec.frontend.onnx_frontend.from_onnx) or an already-built IR Graph.
    example_inputs: one example per model input;
    dim 0 of each float input is the token dimension, dynamic in 0..max_tokens.
    pipeline: a named pipeline ("default"); passes: a pass list that replaces it, as a string
    ("default,+my-pass{opt=1}") or a list of names and Pass objects.
    dump_ir: folder for the IR before and after each pass; time_passes: print pass timings.
    quantize: "int8" or "int4" appends quantize-experts (weight-only expert weights; int8 per
    output channel, int4 in groups of 128 along K with zero points; "int8-g32" / "int4-g64"
    choose the group size): weights.safetensors holds them quantised.
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
    t0 = time.perf_counter()
    step = _progress(progress)
    step("tracing")
    gen_meta, extra_files = None, {}
    if ep and generate is None:
        generate = False  # expert-parallel artifacts are the plain forward (no EP generation)
    if _generates(model, example_inputs, generate):
        if ep:
            raise InputError("generation artifacts cannot be built expert-parallel yet "
                             "(ep=True with generate=True); leave generate out for the plain "
                             "forward")
        graph, gen_meta, extra_files = _step_graph(model, max_tokens, block_size, tgt)
    else:
        graph = to_graph(model, example_inputs, max_tokens)
    tiles, tuned = ({}, {}) if tgt.get("kind") != "llvm" or tuning is False else \
        _apply_tuning(graph, pass_list, None if tuning is True else Path(tuning))
    if quantize is not None:
        pass_list.append(quantize_pass)
    if gen_meta is not None:
        from moec.passes.offload_experts import OffloadExperts

        pass_list.append(OffloadExperts())  # the expert cache's hook (identity when resident)
    if tgt.get("kind") == "llvm" and not any(isinstance(p, WidenActivations) for p in pass_list) \
            and has_half_compute(graph):
        # the CPU kernels compute in float32 and widen half GEMM weights as they read them
        pass_list.append(WidenActivations())
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
    PassManager(pass_list, ins).run(graph)
    step("kernels")
    ep_plan = None
    if ep:
        from moec.codegen.ep import build_ep

        built, ep_plan = build_ep(graph, tgt)
    else:
        functions = (("main", False), ("decode", True), ("main_offload", False, True),
                     ("decode_offload", True, True)) if gen_meta else (("main", False),)
        built = build(graph, tgt, tiles=tiles, functions=functions)
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
        signature=built.signature,
        pipeline=[p.spec() for p in pass_list],
        meta={"kernels": built.kernels, **({"ep": ep_plan} if ep_plan else {}),
              **({"tuning": tuned} if tuned else {}),
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


def _apply_tuning(graph: Graph, pass_list: list, db: Path | None
                  ) -> tuple[dict[tuple, tuple[int, int]], dict[str, Any]]:
    """Tuned choices for the graph's MoE layers: reorder-dispatch's block_m (replaced in
    `pass_list` when it has the default value and every tuned layer agrees on one) and the
    grouped GEMM tiles for the lowering. Returns (tiles, what was applied, for the manifest)."""
    import dataclasses

    from moec.codegen import tune
    from moec.passes.reorder_dispatch import ReorderDispatch

    entries = tune.load_db(db)
    choices = {}
    for shape in tune.layers_of(graph):
        c = tune.choose(shape, entries)
        if c.source == "tuned":
            choices[shape.key] = (shape, c)
    if not choices:
        return {}, {}
    block_ms = {c.block_m for _, c in choices.values()}
    idx = [i for i, p in enumerate(pass_list) if isinstance(p, ReorderDispatch)]
    bm = tune.DEFAULT_BLOCK_M
    if len(block_ms) == 1 and idx and pass_list[idx[0]].block_m == tune.DEFAULT_BLOCK_M:
        bm = block_ms.pop()
        for i in idx:
            pass_list[i] = dataclasses.replace(pass_list[i], block_m=bm)
    elif idx:
        bm = pass_list[idx[0]].block_m
    tiles: dict[tuple, tuple[int, int]] = {}
    applied = {}
    for key, (shape, c) in choices.items():
        if c.block_m != bm:
            continue  # its tiles were measured with another block_m
        for (n, k, gather, act), t in zip(shape.gemms(), c.tiles, strict=True):
            if t:
                tiles[(shape.experts, n, k, bm, shape.top_k, gather, act)] = tuple(t)
        applied[key] = {"cpu": tune.cpu_name(), "block_m": bm,
                        "tiles": [list(t) if t else None for t in c.tiles]}
    return tiles, applied


def _progress(enabled: bool):
    if not enabled:
        return lambda name: None
    t0 = time.perf_counter()

    def step(name: str) -> None:
        print(f"[{time.perf_counter() - t0:6.2f}s] {name}...", file=sys.stderr, flush=True)

    return step
