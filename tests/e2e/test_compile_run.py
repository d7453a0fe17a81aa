"""End to end: torch model -> moec.compile -> save -> load -> run, against PyTorch eager.

Tolerance: fp32, max relative error (max |got - want| / max |want|) <= 1e-4, as the core issue
asks. Routing: uniform (random router) and skewed (every token's first choice is expert 3).
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import moec
from moec.errors import ArtifactError, InputError
from moec.models.reference import demo_model, skew_router
from moec.passes.manager import relative_error

TOKENS = [0, 1, 7, 64, 300]
RTOL = 1e-4
HIDDEN = 64


def _model(routing: str, skewed: bool, stacked: bool = False):
    module, example = demo_model(seed=1, hidden=HIDDEN, intermediate=96, experts=8, top_k=2,
                                 routing=routing, norm_topk_prob=routing == "softmax_topk",
                                 stacked=stacked)
    if skewed:
        skew_router(module, expert=3)
    return module, example


@pytest.fixture(scope="module", params=[
    ("softmax_topk", False), ("softmax_topk", True), ("topk_softmax", False),
    ("topk_softmax", True)], ids=lambda p: f"{p[0]}-{'skewed' if p[1] else 'uniform'}")
def compiled(request, tmp_path_factory):
    routing, skewed = request.param
    module, example = _model(routing, skewed)
    art = moec.compile(module, example, max_tokens=512)
    path = tmp_path_factory.mktemp("art") / "m.moec"
    art.save(path)
    return module, moec.load(path), skewed


@pytest.mark.parametrize("tokens", TOKENS)
def test_matches_pytorch_eager(compiled, tokens):
    module, model, skewed = compiled
    x = torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(tokens))
    with torch.no_grad():
        want = module(x).numpy()
    got = model(x.numpy())
    assert isinstance(got, np.ndarray) and got.shape == (tokens, HIDDEN)
    assert relative_error(got, want) <= RTOL
    if skewed and tokens:
        with torch.no_grad():
            h = module.input_norm(x)
            h = x + module.mixer(h)
            logits = module.mlp.gate(module.post_norm(h))
        assert (logits.argmax(-1) == 3).all()  # the skew really routes every token to expert 3


def test_stacked_expert_weights_block():
    module, example = _model("softmax_topk", False, stacked=True)
    model = moec.compile(module, example, max_tokens=64).load_model()
    x = torch.randn(33, HIDDEN)
    with torch.no_grad():
        assert relative_error(model(x.numpy()), module(x).numpy()) <= RTOL


def test_torch_in_torch_out_and_layouts(compiled):
    module, model, _ = compiled
    x = torch.randn(20, HIDDEN)
    with torch.no_grad():
        want = module(x)
    got = model(x)
    assert isinstance(got, torch.Tensor)
    assert relative_error(got.numpy(), want.numpy()) <= RTOL
    # a non-contiguous view, a misaligned numpy view and a float64 array all give the same answer
    wide = torch.randn(20, 2 * HIDDEN)
    wide[:, ::2] = x
    assert relative_error(model(wide[:, ::2]).numpy(), want.numpy()) <= RTOL
    buf = np.zeros(20 * HIDDEN + 1, np.float32)
    mis = buf[1:].reshape(20, HIDDEN)
    mis[...] = x.numpy()
    assert mis.ctypes.data % 64 != 0
    assert relative_error(model(mis), want.numpy()) <= RTOL
    assert relative_error(model(x.numpy().astype(np.float64)), want.numpy()) <= RTOL


def test_bad_inputs_raise_input_error(compiled):
    _, model, _ = compiled
    with pytest.raises(InputError, match="rank"):
        model(np.zeros((4, 2, HIDDEN), np.float32))
    with pytest.raises(InputError, match=f"expected {HIDDEN}|{HIDDEN}"):
        model(np.zeros((4, HIDDEN + 1), np.float32))
    with pytest.raises(InputError, match="dtype"):
        model(np.zeros((4, HIDDEN), np.int32))
    with pytest.raises(InputError, match="max_tokens|--max-tokens"):
        model(np.zeros((513, HIDDEN), np.float32))
    with pytest.raises(InputError):
        model()


def test_damaged_artifacts_raise_artifact_error(tmp_path):
    module, example = _model("softmax_topk", False)
    path = moec.compile(module, example, max_tokens=16).save(tmp_path / "a.moec")
    weights = path / "weights.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="weights.safetensors"):
        moec.load(path)
    weights.write_bytes(data)
    moec.load(path)  # intact again
    ir = path / "model.ir"
    ir.write_text(ir.read_text() + "\n# edited")
    with pytest.raises(ArtifactError, match="model.ir"):
        moec.load(path)
    with pytest.raises(ArtifactError):
        moec.load(tmp_path / "missing.moec")


def test_running_an_artifact_does_not_import_torch(tmp_path):
    module, example = _model("softmax_topk", False)
    path = moec.compile(module, example, max_tokens=16).save(tmp_path / "a.moec")
    code = (f"import sys, numpy as np, moec\nm = moec.load({str(path)!r})\n"
            f"y = m(np.ones((3, {HIDDEN}), np.float32))\nassert y.shape == (3, {HIDDEN})\n"
            f"assert 'torch' not in sys.modules, 'torch was imported'\nprint('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.getcwd()}, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_bf16_artifact_takes_numpy_and_torch_inputs():
    """A bf16 artifact takes a bf16 numpy array (ml_dtypes), a float32 one (converted) and a
    torch bf16 tensor, and gives the same output for each: numpy in -> numpy bf16 out."""
    import ml_dtypes

    module, (x,) = demo_model(hidden=64, intermediate=96, experts=4, top_k=2)
    model = moec.compile(module.bfloat16(), (x.bfloat16(),), max_tokens=32).load_model()
    x16 = x[:7].bfloat16()
    want = model(x16).float().numpy()
    as_bf16 = model(x16.float().numpy().astype(ml_dtypes.bfloat16))
    assert as_bf16.dtype == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(as_bf16.astype(np.float32), want)
    np.testing.assert_array_equal(model(x16.float().numpy()).astype(np.float32), want)
