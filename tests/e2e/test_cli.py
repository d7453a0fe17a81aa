"""The CLI end to end in a temporary folder: compile -> inspect -> verify -> run, output equals
PyTorch (fp32, max relative error <= 1e-4); passes / opt; one-line errors."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from moec.passes.manager import relative_error

FACTORY = textwrap.dedent("""
    from moec.models.reference import demo_model

    def make():
        return demo_model(seed=7, hidden=64, intermediate=96, experts=4, top_k=2)
""")


def moec_cli(*args, cwd, check=True):
    out = subprocess.run([sys.executable, "-m", "moec.cli", *args], cwd=cwd, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "TVM_NUM_THREADS": "2"})
    if check and out.returncode != 0:
        raise AssertionError(f"moec {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
    return out


def test_compile_inspect_run(tmp_path):
    (tmp_path / "model.py").write_text(FACTORY)
    out = moec_cli("compile", "model.py:make", "-o", "m.moec", "--max-tokens", "128",
                   "--time-passes", "--dump-ir", "ir", cwd=tmp_path)
    assert "fuse-gating" in out.stderr  # the timing table
    dumps = sorted(p.name for p in (tmp_path / "ir").iterdir())
    assert dumps[0] == "000_input.ir" and any("fuse-gating" in d for d in dumps)

    info = moec_cli("inspect", "m.moec", cwd=tmp_path).stdout
    assert "moe.router" in info and "moe.grouped_matmul" in info and "weights.safetensors" in info
    assert "ok" in moec_cli("verify", "m.moec", cwd=tmp_path).stdout

    x = np.random.default_rng(0).standard_normal((9, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    moec_cli("run", "m.moec", "--input", "x.npy", "--output", "y.npy", cwd=tmp_path)
    y = np.load(tmp_path / "y.npy")
    sys.path.insert(0, str(tmp_path))
    try:
        from model import make
    finally:
        sys.path.pop(0)
    module, _ = make()
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    assert relative_error(y, want) <= 1e-4


BF16_FACTORY = FACTORY + textwrap.dedent("""
    def make_bf16():
        module, (x,) = make()
        return module.bfloat16(), (x.bfloat16(),)
""")


def test_bf16_model_compiles_and_runs_from_npy(tmp_path):
    """A bf16 model through the CLI: float32 .npy input converted on the way in, the bf16
    output written as float32 (.npy has no bfloat16), equal to the float32 model on the same
    bf16 weights up to one bf16 rounding (2^-8 relative, plus 1e-5 of the largest output)."""
    (tmp_path / "model.py").write_text(BF16_FACTORY)
    moec_cli("compile", "model.py:make_bf16", "-o", "m.moec", "--max-tokens", "64", cwd=tmp_path)
    x = np.random.default_rng(1).standard_normal((9, 64)).astype(np.float32)
    x = torch.from_numpy(x).bfloat16().float().numpy()  # values bf16 holds exactly
    np.save(tmp_path / "x.npy", x)
    out = moec_cli("run", "m.moec", "--input", "x.npy", "--output", "y.npy", cwd=tmp_path)
    assert "bfloat16 output(s) written as float32" in out.stdout
    y = np.load(tmp_path / "y.npy")
    assert y.dtype == np.float32 and y.shape == (9, 64)
    sys.path.insert(0, str(tmp_path))
    sys.modules.pop("model", None)  # another test's model.py may be imported already
    try:
        from model import make_bf16
    finally:
        sys.path.pop(0)
        sys.modules.pop("model", None)
    module, _ = make_bf16()
    with torch.no_grad():
        want = module.float()(torch.from_numpy(x)).numpy()
    assert np.all(np.abs(y - want) <= 2.0 ** -8 * np.abs(want) + 1e-5 * np.abs(want).max())


def test_errors_are_one_line(tmp_path):
    out = moec_cli("run", "nope.moec", "--input", "x.npy", cwd=tmp_path, check=False)
    assert out.returncode == 1
    assert out.stderr.startswith("moec: error:") and len(out.stderr.strip().splitlines()) == 1
    out = moec_cli("compile", "nofile.py:make", "-o", "a.moec", cwd=tmp_path, check=False)
    assert out.returncode == 1 and "nofile.py" in out.stderr


def test_passes_and_opt(tmp_path):
    listing = moec_cli("passes", cwd=tmp_path).stdout
    for name in ("fuse-gating", "reorder-dispatch", "tile-expert-gemm", "fuse-combine"):
        assert name in listing
    (tmp_path / "in.ir").write_text(textwrap.dedent("""
        dim T: 0..64
        input %x: f32[T, 16]
        param @r: f32[4, 16]
        %l: f32[T, 4] = core.linear(%x, @r)
        %p: f32[T, 4] = core.softmax(%l) {axis=-1}
        %v: f32[T, 2], %i: i32[T, 2] = core.topk(%p) {k=2}
        output %v, %i
    """))
    out = moec_cli("opt", "in.ir", "-p", "fuse-gating", cwd=tmp_path).stdout
    assert "moe.router(%x, @r)" in out and "core.topk" not in out


@pytest.mark.parametrize("bad", ["no-such-pass", "reorder-dispatch{block_m=x=1}"])
def test_opt_bad_pass_list(tmp_path, bad):
    (tmp_path / "in.ir").write_text("dim T: 0..4\ninput %x: f32[T, 4]\noutput %x\n")
    out = moec_cli("opt", "in.ir", "-p", bad, cwd=tmp_path, check=False)
    assert out.returncode == 1 and out.stderr.startswith("moec: error:")
