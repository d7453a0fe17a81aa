"""The command line as a newcomer meets it (issue 19): help for every option, `--debug` on
either side of the subcommand, options checked before the slow steps, `moec bench` keeping out
of the tracked results, `moec profile` on a checkpoint folder, pruning that says what it did,
a closed pipe, inputs that are not arrays, an artifact run on the wrong device, and what to
install when transformers is missing."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import moec
from moec.cli import build_parser, main
from moec.errors import ArtifactError, DependencyError, PassError

ROOT = Path(__file__).resolve().parents[2]
HIDDEN = 64
FACTORY = textwrap.dedent("""
    from pathlib import Path

    def make():
        from moec.models.reference import demo_model

        Path(__file__).with_name("factory-ran").write_text("yes")
        return demo_model(hidden=64, intermediate=96, experts=4, top_k=2)
""")


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """A small compiled demo model (4 experts, hidden 64)."""
    from moec.models.reference import demo_model

    module, example = demo_model(hidden=HIDDEN, intermediate=96, experts=4, top_k=2)
    return Path(moec.compile(module, example, max_tokens=64).save(
        tmp_path_factory.mktemp("small") / "small.moec"))


def _options(p: argparse.ArgumentParser, path: str = "moec"):
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield path, action


def test_every_option_has_help():
    missing = [f"{cmd} {'/'.join(a.option_strings) or a.dest}"
               for cmd, a in _options(build_parser()) if not (a.help or "").strip()]
    assert not missing, "options without help text: " + ", ".join(missing)
    compile_help = build_parser()._subparsers._group_actions[0].choices["compile"].format_help()
    assert "cuda:sm_80" in compile_help  # the valid targets are in the help, not only in errors


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_on_either_side_of_the_subcommand(tmp_path, where, capsys):
    args = ["verify", str(tmp_path / "missing.moec")]
    assert main(args) == 1 and "moec: error:" in capsys.readouterr().err
    with pytest.raises(ArtifactError):  # --debug: the exception itself, for its traceback
        main(["--debug", *args] if where == "before" else [*args, "--debug"])


def test_quantize_mode_is_checked_before_the_factory_runs(tmp_path, capsys):
    (tmp_path / "model.py").write_text(FACTORY)
    rc = main(["compile", f"{tmp_path}/model.py:make", "-o", str(tmp_path / "m.moec"),
               "--quantize", "int3"])
    assert rc == 1 and "quantize mode 'int3'" in capsys.readouterr().err
    assert not (tmp_path / "factory-ran").exists()


def test_quantize_mode_is_checked_before_tracing(monkeypatch):
    def trace(*a, **k):
        raise AssertionError("traced before the options were checked")

    monkeypatch.setattr("moec.compiler.to_graph", trace)
    with pytest.raises(PassError, match="int3"):
        moec.compile(object(), (), quantize="int3")
    with pytest.raises(PassError, match="no-such-pass"):
        moec.compile(object(), (), passes="default,+no-such-pass")


def test_demo_command(tmp_path, capsys):
    assert main(["demo", "-o", str(tmp_path / "d.moec"), "--tokens", "1", "--max-tokens",
                 "64"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.split()[:1] == ["1"])
    assert float(row.split()[1]) <= 1e-4, out  # max relative error against torch
    assert (tmp_path / "d.moec" / "manifest.json").is_file()


def test_bench_writes_to_the_current_directory(tmp_path, monkeypatch):
    """From the repository root, `moec bench` must not replace the tracked results."""
    seen = []
    monkeypatch.setattr("moec.bench.runner.run", seen.append)
    monkeypatch.chdir(ROOT)
    assert main(["bench", "--quick"]) == 0
    assert main(["bench", "--quick", "--dtype", "bfloat16"]) == 0
    assert main(["bench", "--quick", "--json", str(tmp_path / "r.json")]) == 0
    paths = [Path(o.json_path).resolve() for o in seen]
    assert paths == [ROOT / "layer_bench.json", ROOT / "layer_bench_bf16.json",
                     tmp_path / "r.json"]
    assert not any((ROOT / "benchmarks" / "results") in p.parents for p in paths)


def test_bench_artifact(small, tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["bench", str(small), "--tokens", "1", "8", "--warmup", "0", "--repeat", "2",
                 "--json", str(out)]) == 0
    runs = json.loads(out.read_text())["ranks"][0]["runs"]
    assert [r["tokens"] for r in runs] == [1, 8] and all(r["total"] > 0 for r in runs)


def test_garbage_npy_gets_moecs_message(tmp_path, capsys):
    bad = tmp_path / "x.npy"
    bad.write_bytes(b"these bytes are not an array")
    assert main(["run", str(tmp_path / "any.moec"), "--input", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad} is not a .npy or .npz array file" in err and "np.save" in err
    assert "pickle" not in err


def test_wrong_device_names_the_flag(small, tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((2, HIDDEN), np.float32))
    assert main(["run", str(small), "--input", str(tmp_path / "x.npy"), "--device", "cuda"]) == 1
    err = capsys.readouterr().err
    assert "--device cpu" in err and "device=" not in err, err


def test_cuda_artifact_on_the_cpu_names_the_flag(tmp_path, capsys):
    import shutil

    if not (shutil.which("nvcc") or Path("/usr/local/cuda/bin/nvcc").exists()):
        pytest.skip("building a CUDA artifact needs nvcc")
    from moec.models.reference import demo_model

    module, example = demo_model(hidden=32, intermediate=32, experts=4, tokens=4)
    path = moec.compile(module, example, target="cuda", max_tokens=16).save(tmp_path / "g.moec")
    np.save(tmp_path / "x.npy", example[0].numpy())
    assert main(["run", str(path), "--input", str(tmp_path / "x.npy")]) == 1
    err = capsys.readouterr().err
    assert "--device cuda" in err and "device='cuda'" not in err, err


def test_closed_pipe_ends_quietly():
    """`moec passes | head -1`: the reader is gone before moec writes; no traceback, no
    "Broken pipe" error line, the exit status a shell gives a command killed by SIGPIPE."""
    r, w = os.pipe()
    os.close(r)
    try:
        p = subprocess.run([sys.executable, "-m", "moec.cli", "passes"], stdout=w,
                           stderr=subprocess.PIPE, text=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    finally:
        os.close(w)
    assert p.stderr == "" and p.returncode == 141, (p.returncode, p.stderr)


def _tiny_checkpoint(folder: Path) -> int:
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, intermediate_size=64, moe_intermediate_size=24,
        num_experts=4, num_experts_per_tok=2)
    transformers.Qwen3MoeForCausalLM(cfg).save_pretrained(folder)
    return cfg.vocab_size


def test_profile_a_checkpoint_folder_and_prune_from_it(tmp_path, capsys):
    """`moec profile CKPT` (random ids of the vocabulary by default, like `moec tune CKPT`
    and `moec compile CKPT` take the folder); the layers it names are the routers of the
    generation step that `moec compile CKPT` builds, so prune-experts finds them."""
    from moec.compiler import _step_graph
    from moec.passes import PassManager, parse_pipeline

    _tiny_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "p.json"
    assert main(["profile", str(tmp_path / "ckpt"), "-o", str(out), "--tokens", "24"]) == 0
    data = json.loads(out.read_text())
    assert [la["router"] for la in data["layers"]] == [
        f"model.model.layers.{i}.mlp.gate.weight" for i in range(2)]
    assert all(la["tokens"] == 24 and len(la["load"]) == 4 for la in data["layers"])
    capsys.readouterr()
    data["layers"][0]["load"] = [0.5, 0.0, 0.3, 0.2]  # expert 1 of layer 0 never chosen
    out.write_text(json.dumps(data))
    graph, _, _ = _step_graph(str(tmp_path / "ckpt"), 16, 16, {"kind": "llvm"})
    PassManager(parse_pipeline(f"default,+prune-experts{{profile={out},threshold=0.05}}")
                ).run(graph)
    err = capsys.readouterr().err
    assert "prune-experts: model.model.layers.0.mlp.gate.weight: removed 1 of 4 experts (1: " in err


def test_profile_refuses_a_folder_that_is_neither(tmp_path, capsys):
    assert main(["profile", str(tmp_path)]) == 1
    assert "neither an artifact" in capsys.readouterr().err


PRUNE_IR = """
dim T: 0..64
input %x: f32[T, 16]
param @r: f32[4, 16]
param @wd: f32[4, 8, 16]
%w: f32[T, 2], %i: i32[T, 2] = moe.router(%x, @r) {k=2}
%s: i32[(T*2//8+4)*8], %te: i32[T*2//8+4], %sr: i32[T, 2] = moe.align(%i) {block_m=8, num_experts=4}
%y: f32[(T*2//8+4)*8, 8] = moe.grouped_matmul(%x, @wd, %s, %te) {block_m=8, top_k=2, gather=true}
%o: f32[T, 8] = moe.combine(%y, %w, %sr)
output %o
"""


@pytest.mark.parametrize(("router", "load", "says"), [
    ("r", [0.5, 0.005, 0.3, 0.195], "prune-experts: r: removed 1 of 4 experts (1: load under "
                                    "0.01), kept 3"),
    ("r", [0.3, 0.2, 0.3, 0.2], "removed no expert: every expert of the 1 profiled layer(s) "
                                "has a load of at least 0.01 (the lowest: 0.2000, in r)"),
    ("other", [0.5, 0.0, 0.3, 0.2], "removed no expert: no router of this model (r) is in the "
                                    "profile"),
], ids=["pruned", "nothing-under-threshold", "another-model"])
def test_prune_experts_says_what_it_did(tmp_path, capsys, router, load, says):
    from moec.ir import parse
    from moec.passes.prune_experts import PruneExperts
    from moec.testing import run_pass

    g = parse(PRUNE_IR)
    rng = np.random.default_rng(0)
    for name, v in g.params.items():
        g.param_data[name] = rng.standard_normal([int(d) for d in v.shape]).astype(np.float32)
    p = tmp_path / "profile.json"
    p.write_text(json.dumps({"layers": [{"router": router, "load": load}]}))
    run_pass(PruneExperts(profile=str(p)), g)
    assert says in capsys.readouterr().err


def test_missing_transformers_names_the_extra(tmp_path, monkeypatch, capsys):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text('{"model_type": "qwen3_moe"}')
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` fails
    assert main(["compile", str(tmp_path / "ckpt"), "-o", str(tmp_path / "m.moec")]) == 1
    err = capsys.readouterr().err
    assert "needs the `transformers` package" in err and "pip install 'moec[hf]'" in err, err
    with pytest.raises(DependencyError, match=r"moec\[hf\]"):
        main(["profile", str(tmp_path / "ckpt"), "--debug"])


def test_missing_tokenizers_says_what_to_install(tmp_path, monkeypatch):
    from moec.engine.tokenizer import Tokenizer

    (tmp_path / "tokenizer.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(DependencyError, match="pip install tokenizers"):
        Tokenizer.from_folder(tmp_path)


def test_a_tuning_entry_this_cpu_cannot_use_falls_back_to_the_defaults(tmp_path):
    """Tiles measured where vectors are half as wide (AVX2 tiles on an AVX-512 host): the
    compile warns and uses the defaults instead of failing."""
    from moec.codegen import tune
    from moec.codegen.kernels.base import vector_lanes
    from moec.compiler import to_graph
    from moec.models.reference import demo_model

    module, example = demo_model(hidden=HIDDEN, intermediate=96, experts=4, top_k=2)
    (shape,) = tune.layers_of(to_graph(module, example, 64))
    half = vector_lanes("float32") // 2  # NR narrower than one vector of this CPU
    db = tmp_path / "db.json"
    tune.write_db(db, {f"{tune.cpu_name()}|{shape.key}": {"block_m": 16,
                                                          "tiles": [[4, half], None]}})
    with pytest.warns(RuntimeWarning, match=f"tuning entry .*{shape.key}.*default"):
        assert tune.choose(shape, tune.load_db(db)) == tune.Choice()
    with pytest.warns(RuntimeWarning, match="does not fit this CPU"):
        art = moec.compile(module, example, max_tokens=64, tuning=db)
    assert "tuning" not in art.meta
    x = example[0].numpy()
    import torch

    with torch.no_grad():
        want = module(example[0]).numpy()
    got = moec.load(art.save(tmp_path / "t.moec"))(x)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_check_ranges_refuses_ids_outside_the_table():
    """The runtime's check (moec/runtime/inputs.py; the end-to-end case with a compiled
    checkpoint is tests/frontend/test_whole_model.py): values in [lo, hi) pass, others and a
    damaged manifest entry are refused by name."""
    from moec.errors import InputError
    from moec.runtime.inputs import check_ranges
    from moec.runtime.manifest import DimSpec, Signature, TensorSpec

    sig = Signature((TensorSpec("ids", ("T",), "int64"),), (TensorSpec("y", ("T", 8), "float32"),),
                    {"T": DimSpec(0, 64)})
    check_ranges(sig, [np.array([0, 511])], {"ids": [0, 512]})
    check_ranges(sig, [np.array([], np.int64)], {"ids": [0, 512]})
    for bad in (512, 10**9, -1):
        with pytest.raises(InputError, match=f"input 'ids' holds {bad}, outside"):
            check_ranges(sig, [np.array([3, bad])], {"ids": [0, 512]})
    with pytest.raises(ArtifactError, match="input_ranges"):
        check_ranges(sig, [np.array([3])], {"ids": "512"})
