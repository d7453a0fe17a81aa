"""The `moec` command line: demo, compile, run, generate, chat, serve, bench, inspect, verify,
pack, passes, opt, profile, tune.

Errors print one line (`moec: error: ...`) and exit 1; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

from moec.errors import InputError, MoecError


def _load_factory(spec: str) -> Any:
    """`path/to/file.py:factory` or `package.module:factory` -> factory()."""
    if ":" not in spec:
        raise InputError(f"model spec {spec!r} must be FILE.py:FACTORY or package.module:FACTORY")
    mod_name, _, fn_name = spec.rpartition(":")
    if mod_name.endswith(".py") or "/" in mod_name:
        path = Path(mod_name)
        if not path.is_file():
            raise InputError(f"model file {path} does not exist")
        s = importlib.util.spec_from_file_location(path.stem, path)
        assert s is not None and s.loader is not None
        module = importlib.util.module_from_spec(s)
        s.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(mod_name)
        except ImportError as e:
            raise InputError(f"cannot import {mod_name!r}: {e}") from None
    fn = getattr(module, fn_name, None)
    if fn is None:
        raise InputError(f"{mod_name} has no attribute {fn_name!r}")
    out = fn()
    if not (isinstance(out, tuple) and len(out) == 2):
        raise InputError(f"{spec} must return (module, example_inputs)")
    return out


def cmd_compile(a: argparse.Namespace) -> int:
    import moec
    from moec.runtime.artifact import check_destination

    check_destination(a.output)  # before a compile that may take minutes
    if a.quantize is not None:  # before the factory runs, too
        from moec.passes.quantize_experts import parse_mode

        parse_mode(a.quantize)
    if Path(a.spec).is_dir():  # a Hugging Face checkpoint folder: ids [T] -> logits [T, V]
        model, example = a.spec, ()
    elif a.spec.endswith(".onnx"):  # an ONNX model file (moec.frontend.onnx_frontend)
        model, example = a.spec, ()
    else:
        model, example = _load_factory(a.spec)
    tuning = False if a.no_tuning else (a.tuning_db or True)
    art = moec.compile(model, example, target=a.target, pipeline=a.pipeline, passes=a.passes,
                       max_tokens=a.max_tokens, dump_ir=a.dump_ir, time_passes=a.time_passes,
                       progress=True, ep=a.ep, quantize=a.quantize,
                       quantize_dense=a.quantize_dense, tuning=tuning,
                       generate=False if a.no_generate else None, block_size=a.block_size,
                       dynamic_dims=_dynamic_dims(a.dynamic_dims))
    art.save(a.output)
    print(f"wrote {a.output}")
    return 0


def _dynamic_dims(text: str | None) -> dict | None:
    """--dynamic-dims JSON -> moec.compile's dynamic_dims (JSON keys are strings: digits
    become input positions and axes)."""
    if text is None:
        return None
    import json

    try:
        data = json.loads(text)
        return {int(k) if k.isdigit() else k: None if v is None else {
            int(ax): d if isinstance(d, str) else tuple(d) for ax, d in v.items()}
            for k, v in data.items()}
    except (ValueError, AttributeError, TypeError) as e:
        raise InputError(f"--dynamic-dims {text!r}: want JSON like "
                         f'{{"0": {{"0": "B", "1": "S"}}}} ({e})') from None


def _model_of(spec: str) -> tuple[Any, tuple]:
    if Path(spec).is_dir() or spec.endswith(".onnx"):  # checkpoint folder / ONNX file
        return spec, ()
    return _load_factory(spec)


def cmd_tune(a: argparse.Namespace) -> int:
    """Measure block_m and grouped-GEMM tiles for every MoE layer shape of the model and store
    the best in the tuning database that `moec compile` reads."""
    from moec.codegen import tune
    from moec.compiler import to_graph

    model, example = _model_of(a.spec)
    shapes = tune.layers_of(to_graph(model, example, max(a.tokens)))
    del model, example  # the tuning allocates its own weights
    if not shapes:
        raise InputError(f"{a.spec}: no MoE layer (moe.experts) to tune")
    out = Path(a.output) if a.output else tune.user_db_path()
    cpu = tune.cpu_name()
    print(f"tuning {len(shapes)} MoE layer shape(s) on {cpu}, tokens {a.tokens}, "
          f"TVM_NUM_THREADS={os.environ.get('TVM_NUM_THREADS', 'all cores')}", flush=True)
    new = {}
    for shape in shapes:
        print(f"{shape.key}:", flush=True)
        entry = tune.tune_layer(shape, a.tokens, a.reps, a.block_m,
                                progress=(lambda m: print("  " + m, flush=True)) if a.verbose
                                else None)
        new[f"{cpu}|{shape.key}"] = entry
        d = entry["default_ms"] or {}
        print(f"  best: block_m {entry['block_m']}, tiles {entry['tiles']}: "
              + ", ".join(f"T={t} {v:.2f} ms (default {d.get(t, float('nan')):.2f})"
                          for t, v in entry["measured_ms"].items()), flush=True)
    tune.write_db(out, new)
    print(f"wrote {len(new)} entr{'y' if len(new) == 1 else 'ies'} to {out}")
    return 0


def _read_inputs(paths: list[str]) -> list[Any]:
    import numpy as np

    arrays: list[Any] = []
    for p in paths:
        try:
            exists = Path(p).is_file()
        except OSError as e:  # a name too long, a loop of links
            raise InputError(f"cannot access input file {p[:200]}: {e.strerror}") from None
        if not exists:
            raise InputError(f"input file {p} does not exist")
        _check_numpy_file(p)
        try:
            data = np.load(p, allow_pickle=False)
            if isinstance(data, np.lib.npyio.NpzFile):
                with data:  # members are read (and CRC-checked) here, not lazily later
                    arrays.extend(data[k] for k in data.files)
            else:
                arrays.append(data)
        except Exception as e:  # numpy and zipfile raise ValueError, BadZipFile, OSError, ...
            raise InputError(f"cannot read {p} as .npy/.npz: {type(e).__name__}: {e}") from None
    return arrays


def _write_atomic(path: str, write: Any) -> None:
    """`write(file)` into a temporary file next to `path`, renamed to exactly `path` (numpy's
    own np.save(path) would append .npy to a name without it)."""
    import os
    import secrets

    head, tail = os.path.split(os.path.abspath(path))
    tmp = os.path.join(head, f".{tail[:64]}.tmp-{secrets.token_hex(6)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _check_numpy_file(path: str) -> None:
    """InputError unless `path` starts like a .npy or a .npz file (numpy would take anything
    else for pickled data and say so, in words about allow_pickle)."""
    with open(path, "rb") as f:
        head = f.read(6)
    if head != b"\x93NUMPY" and head[:2] != b"PK":  # .npz: a zip file
        raise InputError(f"input file {path} is not a .npy or .npz array file (it does not "
                         f"start with their header); write inputs with numpy.save or "
                         f"numpy.savez, e.g. np.save('x.npy', x)")


def cmd_run(a: argparse.Namespace) -> int:
    import numpy as np

    from moec.runtime import load

    if a.tokens is not None:
        if a.input:
            raise InputError("give either --tokens or --input, not both")
        try:
            inputs = [np.array([int(t) for t in a.tokens.replace(",", " ").split()], np.int64)]
        except ValueError:
            raise InputError(f"--tokens wants integers, got {a.tokens!r}") from None
    elif a.input:
        inputs = _read_inputs(a.input)
    else:
        raise InputError("give the inputs with --input FILE.npy or --tokens \"1 2 3\"")
    from moec.engine.cli import offload_kwargs

    off = offload_kwargs(a)
    if a.ep is not None and off:
        raise InputError("--expert-budget does not run with --ep (expert-parallel artifacts "
                         "keep their experts resident): drop one of them")
    if a.ep is not None:  # one process per rank, under torchrun; rank 0 reports
        from moec.distributed.launch import run_ep

        outs = run_ep(a, inputs)
        if outs is None:
            return 0
    else:
        _check_device(a.artifact, a.device)
        outs = load(a.artifact, device=a.device, **off)(*inputs)
    outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
    if a.output:
        # .npy has no bfloat16 (nor float8): numpy would write raw bytes that read back as void
        wide = [o.dtype.name for o in outs if np.asarray(o).dtype.kind == "V"]
        outs = [np.asarray(o, np.float32) if np.asarray(o).dtype.kind == "V" else o
                for o in outs]
        if wide:
            print(f"{', '.join(sorted(set(wide)))} output(s) written as float32 (.npy has no "
                  f"such dtype)")
        if not a.output.endswith(".npz") and len(outs) != 1:
            raise InputError(f"the model has {len(outs)} outputs: write them to a .npz file")
        _write_atomic(a.output, lambda f: (np.savez(f, *outs) if a.output.endswith(".npz")
                                           else np.save(f, outs[0])))
        fmt = "" if a.output.endswith((".npy", ".npz")) else " (in .npy format)"
        print(f"wrote {a.output}{fmt}")
    elif a.tokens is not None:  # logits [T, vocab]: the top tokens after the last position
        last = np.asarray(outs[0], dtype=np.float64)[-1]
        top = np.argsort(-last, kind="stable")[:a.top]
        p = np.exp(last - last.max())
        p /= p.sum()
        print(f"top {len(top)} next tokens after position {len(inputs[0]) - 1}:")
        for t in top:
            print(f"  {int(t):>8}  logit {last[t]:10.4f}  p {p[t]:.4f}")
    else:
        for i, o in enumerate(outs):
            print(f"output {i}: {o.dtype}{list(o.shape)} {np.array2string(o.ravel()[:8])}...")
    return 0


def _check_device(artifact: str, device: str) -> None:
    """The artifact's target against --device, in the command line's words (moec.load's own
    message speaks of device=...). Folders only: an archive is checked when it is loaded."""
    from moec.runtime.verify import SUPPORTED_TARGET_KINDS, read_manifest

    if not (Path(artifact) / "manifest.json").is_file():
        return
    kind = read_manifest(artifact).target.get("kind")
    runs_on = SUPPORTED_TARGET_KINDS.get(kind)
    if runs_on is not None and device.split(":")[0] != runs_on:
        where = " (on a machine with an NVIDIA GPU)" if runs_on == "cuda" else ""
        raise InputError(f"{artifact} was compiled for {kind} and runs on {runs_on}: run it "
                         f"with --device {runs_on}{where}, or recompile it with --target "
                         f"{device.split(':')[0]}")


def cmd_inspect(a: argparse.Namespace) -> int:
    from moec.runtime.archive import opened

    with opened(a.artifact) as path:  # a folder, or a NAME.moec.tar extracted for the while
        return _inspect(path)


def _inspect(path: Path) -> int:
    from moec.runtime import verify

    manifest = verify(path)
    print(json.dumps({k: v for k, v in manifest.items() if k != "files"}, indent=2))
    print("\nfiles:")
    for name, f in manifest["files"].items():
        print(f"  {name:<22} {f['size']:>12,d} bytes  sha256 {f['sha256'][:16]}...")
    from safetensors import safe_open

    print("\nweights:")
    with safe_open(str(path / "weights.safetensors"), "np") as st:
        for k in st.keys():
            if k.startswith("__pad__."):  # alignment filler (moec/runtime/weights.py)
                continue
            sl = st.get_slice(k)
            print(f"  {k:<48} {sl.get_dtype():>6} {sl.get_shape()}")
    print("\nfinal IR:")
    print((path / "model.ir").read_text())
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    from moec.runtime import verify
    from moec.runtime.archive import opened
    from moec.runtime.verify import MANIFEST, sha256_file

    with opened(a.artifact) as path:
        verify(path)
        digest = sha256_file(path / MANIFEST)
    print(f"{a.artifact}: ok (manifest, hashes, format version and target checked; no code "
          f"loaded)\nsha256 of {MANIFEST}: {digest} (pins every file of the artifact)")
    return 0


def cmd_pack(a: argparse.Namespace) -> int:
    from moec.runtime import verify
    from moec.runtime.archive import pack

    verify(a.artifact, check_host=False)
    out = pack(a.artifact, a.output or str(Path(a.artifact).absolute()) + ".tar")
    print(f"wrote {out}")
    return 0


def cmd_passes(a: argparse.Namespace) -> int:
    import textwrap

    from moec.passes import PIPELINES, get_pass, pass_origin, plugin_problems, registered_passes

    if a.name:  # one pass in full: docstring, options, origin
        if a.name in PIPELINES and a.name not in registered_passes():
            print(f"pipeline {a.name}: {PIPELINES[a.name]}")
            return 0
        cls = get_pass(a.name)
        print(f"{cls.name}  ({pass_origin(cls.name)}: {cls.__module__}.{cls.__qualname__})\n")
        print(textwrap.dedent("    " + (cls.__doc__ or "(no docstring)").strip()))
        module_doc = (sys.modules[cls.__module__].__doc__ or "").strip()
        if module_doc and module_doc != (cls.__doc__ or "").strip():
            print("\n" + module_doc)  # one pass per file: the file's docstring says the rest
        table = cls.option_table()
        print("\noptions:" if table else "\noptions: none")
        for n, t, d in table:
            print(f"  {n:<16} {t:<14} default {_option_text(d)}")
        opts = ",".join(f"{n}={_option_text(d)}" for n, _, d in table)
        print(f"\nin a pass list: {cls.name}" + (f"{{{opts}}}" if opts else "")
              + "  (place it with @after:OTHER or @before:OTHER)")
        return 0
    for name, cls in registered_passes().items():
        origin = pass_origin(name)
        tag = "" if origin == "built-in" else f"  [{origin}]"
        print(f"{name:<22} {cls.doc_line()}{tag}")
        if a.verbose:
            for n, t, d in cls.option_table():
                print(f"{'':<24}{n}: {t} = {_option_text(d)}")
    print("\npipelines:")
    for name, spec in PIPELINES.items():
        print(f"  {name:<20} {spec}")
    problems = plugin_problems()
    if problems:
        print("\nplugins that failed to load:")
        for line in problems:
            print(f"  {line}")
    if not a.verbose:
        print("\n`moec passes -v` shows the options, `moec passes NAME` one pass in full; place a "
              "pass with NAME@after:OTHER in --passes")
    return 0


def _option_text(v: Any) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else repr(v) if isinstance(v, str) \
        else str(v)


def cmd_opt(a: argparse.Namespace) -> int:
    from moec.ir import parse, print_graph
    from moec.passes import PassManager, PassTiming, PrintStats, parse_pipeline

    try:
        text = sys.stdin.read() if a.input == "-" else Path(a.input).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{a.input} is not a text IR file (not UTF-8: {e.reason})") from None
    g = parse(text)
    ins: list[Any] = [PassTiming(stream=sys.stderr)] if a.time_passes else []
    if a.stats and not a.time_passes:  # the timing table already ends with the statistics
        ins.append(PrintStats(sys.stderr))
    PassManager(parse_pipeline(a.passes), ins).run(g)
    sys.stdout.write(print_graph(g))
    return 0


def cmd_profile(a: argparse.Namespace) -> int:
    from moec.profile import profile

    is_artifact = (Path(a.model) / "model.ir").is_file()
    if is_artifact:
        from moec.engine.cli import _is_lm, profile_generation

        if _is_lm(a.model):  # a causal LM: generate, and report the expert cache per layer
            a.artifact = a.model
            profile_generation(a)
            print(f"wrote {a.output}")
            return 0
    folder = Path(a.model).is_dir() and not is_artifact
    if folder and not (Path(a.model) / "config.json").is_file():
        raise InputError(f"{a.model} is neither an artifact (no model.ir) nor a Hugging Face "
                         f"checkpoint folder (no config.json)")
    model, example = (a.model, ()) if is_artifact else _model_of(a.model)
    if a.input:
        sample = _read_inputs(a.input)
    elif folder:  # a checkpoint folder: token ids
        from moec.deps import HF, require

        require("transformers", f"reading the checkpoint folder {a.model}", HF)  # first
        sample = [_sample_ids(a.model, a.prompt_ids, a.tokens)]
    else:
        sample = list(example)
    if not sample:
        raise InputError("moec profile: give sample inputs with --input (.npy/.npz)")
    data = profile(model, [sample], out=a.output, png=a.png, max_tokens=a.max_tokens)
    for la in data["layers"]:
        loads = " ".join(f"{v:.2f}" for v in la["load"])
        print(f"{la['router']}: {la['tokens']} tokens, load per expert {loads}")
    print(f"wrote {a.output}" + (f" and {a.png}" if a.png else ""))
    return 0


def _sample_ids(folder: str, prompt_ids: str | None, tokens: int) -> Any:
    """The token ids to profile a checkpoint folder on: --prompt-ids, else `tokens` random ids
    below the config's vocab_size (seeded: the same every run)."""
    import numpy as np

    if prompt_ids is not None:
        try:
            return np.array([int(t) for t in prompt_ids.replace(",", " ").split()], np.int64)
        except ValueError:
            raise InputError(f"--prompt-ids wants integers, got {prompt_ids!r}") from None
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
        vocab = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    except (OSError, ValueError, AttributeError) as e:
        raise InputError(f"{folder}/config.json cannot be read ({e}); give the sample token "
                         f"ids with --prompt-ids or --input") from None
    if not isinstance(vocab, int) or vocab < 1:
        raise InputError(f"{folder}/config.json has no vocab_size; give the sample token ids "
                         f"with --prompt-ids or --input")
    if tokens < 1:
        raise InputError(f"--tokens must be >= 1, got {tokens}")
    return np.random.default_rng(0).integers(0, vocab, tokens).astype(np.int64)


def cmd_demo(a: argparse.Namespace) -> int:
    from moec.demo import run_demo

    return run_demo(output=a.output, tokens=a.tokens, max_tokens=a.max_tokens,
                    threads=a.threads)


def cmd_bench(a: argparse.Namespace) -> int:
    if a.artifact is None:  # the layer benchmark: systems against each other (moec.bench)
        from moec.bench.cli import run_from_args

        return run_from_args(a)
    from moec.distributed.launch import bench

    a.tokens = a.tokens or [64, 512]
    return bench(a)


def _add_ep_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--ep", type=int, default=None, metavar="N", help="expert-parallel over N "
                   "ranks; launch under `torchrun --nproc-per-node N -m moec.cli ...`")
    s.add_argument("--timeout", type=float, default=120.0, help="with --ep: seconds a rank "
                   "waits for the others in any collective before failing")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moec", description="Compile and run Mixture-of-Experts "
                                "models with Apache TVM.")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("demo", help="compile, save, load and run the built-in demo model")
    s.add_argument("-o", "--output", default="demo.moec", help="where to save the artifact "
                   "(default: %(default)s)")
    s.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 512], help="token counts "
                   "to check and time against torch (default: 1 64 512)")
    s.add_argument("--max-tokens", type=int, default=4096, help="most tokens per call the "
                   "artifact takes (default: %(default)s)")
    s.add_argument("--threads", type=int, default=2, help="torch threads for the baseline "
                   "(default: %(default)s)")
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser("compile", help="compile a model to an artifact")
    s.add_argument("spec", help="FILE.py:FACTORY or package.module:FACTORY returning "
                   "(module, example_inputs), or a Hugging Face checkpoint folder "
                   "(config.json + *.safetensors; compiles the causal LM's generation step "
                   "over a paged KV cache, with its tokenizer: `moec generate`), "
                   "or an ONNX model file (*.onnx)")
    s.add_argument("-o", "--output", required=True, help="artifact folder, e.g. model.moec")
    s.add_argument("--target", default="cpu", help="cpu (LLVM for this machine's CPU, the "
                   "default), cuda (NVIDIA sm_90) or cuda:sm_80; CUDA builds need nvcc, not "
                   "a GPU")
    s.add_argument("--max-tokens", type=int, default=4096, help="most tokens per call (for "
                   "a checkpoint folder: per generation step; longer prompts go in chunks; "
                   "default: %(default)s)")
    s.add_argument("--no-generate", action="store_true", help="checkpoint folder: compile the "
                   "plain forward of one sequence (ids [T] -> logits [T, vocab]) instead")
    s.add_argument("--block-size", type=int, default=16, help="checkpoint folder: tokens per "
                   "KV cache block")
    s.add_argument("--pipeline", default="default", help="named pipeline to run (`moec "
                   "passes` lists them; default: %(default)s)")
    s.add_argument("--passes", default=None, help="pass list that replaces --pipeline, e.g. "
                   "'default,+my-pass{opt=1}' or 'default,cap-topk{k=1}@after:fuse-gating' "
                   "(quote it for the shell)")
    s.add_argument("--dump-ir", default=None, metavar="DIR", help="write the IR before the "
                   "passes (000_input.ir) and after each pass (NNN_pass.ir) into DIR")
    s.add_argument("--time-passes", action="store_true", help="print each pass's time")
    s.add_argument("--ep", action="store_true", help="also build the expert-parallel entry "
                   "functions (for `moec run/bench --ep N`)")
    s.add_argument("--quantize", default=None, metavar="int8|int4[-gN]",
                   help="weight-only quantised expert weights (appends quantize-experts): int8 "
                        "per output channel, int4 in groups of 128 along K; -gN sets the group "
                        "size, e.g. int8-g32")
    s.add_argument("--quantize-dense", action="store_true",
                   help="also int8 dense linears (attention, shared experts, LM head; not the "
                        "routers; appends quantize-linears; CPU targets)")
    s.add_argument("--tuning-db", default=None, metavar="FILE",
                   help="also read this tuning database (besides moec's and the user cache)")
    s.add_argument("--no-tuning", action="store_true",
                   help="ignore tuning databases: built-in block_m and tiles")
    s.add_argument("--dynamic-dims", default=None, metavar="JSON",
                   help="which dims of the example inputs are dynamic, replacing the guess "
                        "(every leading dim of a float input), by input position or name: "
                        "'{\"0\": {\"0\": \"B\", \"1\": \"S\"}}', "
                        "'{\"x\": {\"1\": [\"S\", 1, 512]}}'")
    s.set_defaults(fn=cmd_compile)

    s = sub.add_parser("tune", help="measure the expert GEMMs' block_m and tiles for a model's "
                       "MoE layers and store the best for `moec compile`")
    s.add_argument("spec", help="as for `moec compile`")
    s.add_argument("-o", "--output", default=None, help="database file (default: the user "
                   "cache, $MOEC_TUNING_DB or ~/.cache/moec/tuning.json)")
    s.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 512],
                   help="token counts to time at (each weighs the same)")
    s.add_argument("--reps", type=int, default=5, help="timed calls per candidate and count")
    s.add_argument("--block-m", type=int, nargs="+", default=[16, 32, 64],
                   help="tile heights of the aligned layout to try")
    s.add_argument("-v", "--verbose", action="store_true", help="print every candidate")
    s.set_defaults(fn=cmd_tune)

    s = sub.add_parser("run", help="run a compiled artifact on .npy/.npz inputs")
    s.add_argument("artifact", help="artifact folder (NAME.moec) or archive (NAME.moec.tar)")
    s.add_argument("--input", action="append", default=[], help=".npy (repeat) or one .npz")
    s.add_argument("--tokens", default=None, help='token ids of one sequence, e.g. "1 2 3", for '
                   "an artifact compiled from a checkpoint folder: prints the top next tokens")
    s.add_argument("--top", type=int, default=5, help="with --tokens: how many to print")
    s.add_argument("--output", default=None, help=".npy (one output) or .npz")
    s.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N: where the "
                   "kernels run; a CUDA artifact needs cuda")
    _add_ep_args(s)
    s.add_argument("--check", action="store_true", help="with --ep: compare with the "
                   "single-process model on rank 0")
    from moec.engine.cli import add_offload_arguments

    add_offload_arguments(s)  # generation artifacts: run with the experts under a budget
    s.set_defaults(fn=cmd_run)

    from moec.engine.cli import add_commands as add_generation_commands

    add_generation_commands(sub)
    from moec.serve.cli import add_commands as add_serve_commands

    add_serve_commands(sub)

    s = sub.add_parser("bench", help="without ARTIFACT: the MoE layer benchmark (transformers, "
                       "torch.compile, ONNX Runtime and moec against the roofline; moec.bench); "
                       "with ARTIFACT: time it; with --ep N (under torchrun) the per-layer "
                       "dispatch / experts / combine / rest breakdown")
    s.add_argument("artifact", nargs="?", default=None, help="a compiled artifact to time; "
                   "omit it for the layer benchmark")
    s.add_argument("--tokens", type=int, nargs="+", default=None,
                   help="token counts; with ARTIFACT global (split over the ranks), default "
                   "64 512; layer benchmark default 1 8 64 512 2048")
    s.add_argument("--warmup", type=int, default=2, help="untimed calls first (default: "
                   "%(default)s)")
    s.add_argument("--repeat", type=int, default=10, help="timed calls (rounds for the layer "
                   "benchmark); the median is reported (default: %(default)s)")
    s.add_argument("--json", default=None, help="where to write the JSON results (default: a "
                   "file in the current directory, named in the output)")
    s.add_argument("--check", action="store_true", help="with --ep: also compare every rank's "
                   "outputs with the single-process model")
    _add_ep_args(s)
    from moec.bench.cli import add_arguments as add_layer_bench_arguments

    add_layer_bench_arguments(s)
    s.set_defaults(fn=cmd_bench)

    s = sub.add_parser("inspect", help="show an artifact's manifest, weights and final IR")
    s.add_argument("artifact", help="artifact folder or .tar archive")
    s.set_defaults(fn=cmd_inspect)

    s = sub.add_parser("verify", help="check an artifact's files and hashes without loading code")
    s.add_argument("artifact", help="artifact folder or .tar archive")
    s.set_defaults(fn=cmd_verify)

    s = sub.add_parser("pack", help="verify an artifact folder and write it as one .tar file")
    s.add_argument("artifact", help="artifact folder")
    s.add_argument("-o", "--output", default=None, help="default: ARTIFACT.tar")
    s.set_defaults(fn=cmd_pack)

    s = sub.add_parser("passes", help="list registered passes (their origin, options) and "
                       "pipelines; NAME shows one pass in full")
    s.add_argument("name", nargs="?", default=None, help="a pass (or pipeline) to describe")
    s.add_argument("-v", "--verbose", action="store_true", help="also list every pass's options "
                   "with their types and defaults")
    s.set_defaults(fn=cmd_passes)

    s = sub.add_parser("profile", help="expert load per layer on sample inputs: JSON + heat map")
    s.add_argument("model", help="FILE.py:FACTORY (its example inputs are the default "
                   "sample), a Hugging Face checkpoint folder (random token ids unless "
                   "--input or --prompt-ids), or an artifact")
    s.add_argument("--input", action="append", default=[], help="sample inputs: .npy (repeat) "
                   "or one .npz")
    s.add_argument("-o", "--output", default="profile.json", help="the JSON profile, which "
                   "prune-experts reads (default: %(default)s)")
    s.add_argument("--png", default=None, help="also write a layer x expert heat map")
    s.add_argument("--max-tokens", type=int, default=4096, help="most tokens per call of the "
                   "traced model (default: %(default)s)")
    s.add_argument("--tokens", type=int, default=64, help="checkpoint folder or generation "
                   "artifact: length of the random prompt (without --prompt-ids; default: "
                   "%(default)s)")
    s.add_argument("--prompt-ids", default=None, help='checkpoint folder or generation '
                   'artifact: the prompt as token ids, e.g. "1 2 3"')
    s.add_argument("--max-new-tokens", type=int, default=32, help="generation artifact: "
                   "tokens to generate (default: %(default)s)")
    from moec.engine.cli import add_offload_arguments

    add_offload_arguments(s)
    s.set_defaults(fn=cmd_profile)

    s = sub.add_parser("opt", help="run passes on text IR and print the result")
    s.add_argument("input", help="IR file, or - for stdin")
    s.add_argument("-p", "--passes", required=True, help="passes to run in order, e.g. "
                   "'fuse-gating,reorder-dispatch{block_m=16}' or "
                   "'default,cap-topk{k=1}@after:fuse-gating' (`moec passes` lists them)")
    s.add_argument("--time-passes", action="store_true", help="pass timings (and statistics) "
                   "on stderr")
    s.add_argument("--stats", action="store_true", help="the statistics passes recorded, on "
                   "stderr")
    s.set_defaults(fn=cmd_opt)
    for s in sub.choices.values():  # `moec run ... --debug` as well as `moec --debug run ...`
        s.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks on errors")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # what this command was given (`moec bench` records it), not sys.argv
    try:
        rc = args.fn(args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit, out of reach
        return rc
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # whoever read the output stopped (`moec run ... | head`): end quietly, as cat does,
        # with nothing left for the interpreter to flush into the closed pipe at exit
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is not a file (e.g. replaced in-process)
            pass
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by it
    except Exception as e:
        if args.debug:
            raise
        # One line whatever the failure: moec's own errors say what to do; a file that cannot
        # be read or written is the user's to fix; anything else is unexpected (a bug in moec
        # or in the user's model code) and --debug shows where it came from.
        msg = " ".join(str(e).split())
        if isinstance(e, MoecError):
            print(f"moec: error: {msg}", file=sys.stderr)
        elif isinstance(e, OSError):
            print(f"moec: error: {msg or type(e).__name__}", file=sys.stderr)
        else:
            print(f"moec: error: {type(e).__name__}: {msg} (unexpected; rerun with --debug "
                  f"for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
