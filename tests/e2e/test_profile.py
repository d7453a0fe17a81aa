"""moec profile: expert load of a torch module, of its compiled artifact, and through the CLI."""

import json

import numpy as np
import pytest
import torch

from moec.cli import main
from moec.profile import profile

FACTORY = '''
import torch
from moec.models.reference import demo_model, skew_router

def make():
    model, (x,) = demo_model(hidden=64, intermediate=128, tokens=32)
    return skew_router(model, expert=3), (x,)
'''


@pytest.fixture(scope="module")
def skewed():
    from moec.models.reference import demo_model, skew_router

    model, (x,) = demo_model(hidden=64, intermediate=128, tokens=32)
    return skew_router(model, expert=3), x


def test_profile_module(skewed, tmp_path):
    model, x = skewed
    data = profile(model, [(x,)], out=tmp_path / "p.json", png=tmp_path / "p.png")
    (layer,) = data["layers"]
    assert layer["router"] == "mlp.gate.weight" and layer["tokens"] == 32
    counts = np.array(layer["tokens_per_expert"])
    assert counts.sum() == 32 * 2 and counts[3] == 32  # every token picks expert 3
    assert abs(sum(layer["load"]) - 1) < 1e-9 and layer["load"][3] == 0.5
    co = np.array(layer["coactivation"])
    assert (co == co.T).all() and co.trace() == 0 and co[3].sum() == 32
    assert abs(sum(layer["weight_share"]) - 1) < 1e-6
    assert json.loads((tmp_path / "p.json").read_text()) == data
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profile_artifact_matches_module(skewed, tmp_path):
    import moec

    model, x = skewed
    moec.compile(model, (x,), max_tokens=64).save(tmp_path / "m.moec")
    a = profile(tmp_path / "m.moec", [(x,)])
    b = profile(model, [(x,)])
    assert a["layers"][0]["tokens_per_expert"] == b["layers"][0]["tokens_per_expert"]
    np.testing.assert_allclose(a["layers"][0]["weight_mass"], b["layers"][0]["weight_mass"],
                               rtol=1e-5)


def test_profile_cli(tmp_path, capsys):
    (tmp_path / "model.py").write_text(FACTORY)
    out, png = tmp_path / "p.json", tmp_path / "h.png"
    assert main(["profile", f"{tmp_path}/model.py:make", "-o", str(out), "--png", str(png)]) == 0
    assert "mlp.gate.weight: 32 tokens" in capsys.readouterr().out
    assert json.loads(out.read_text())["layers"][0]["tokens_per_expert"][3] == 32
    assert png.stat().st_size > 1000
    np.save(tmp_path / "x.npy", torch.randn(5, 64).numpy())
    assert main(["profile", f"{tmp_path}/model.py:make", "-o", str(out),
                 "--input", str(tmp_path / "x.npy")]) == 0
    assert json.loads(out.read_text())["layers"][0]["tokens"] == 5


def test_heat_map_leaves_matplotlib_as_it_was(tmp_path, monkeypatch):
    """It used to switch the process's backend (matplotlib.use("Agg")) and use pyplot's
    global figures; without matplotlib it failed with an ImportError naming nothing to do."""
    import matplotlib
    import matplotlib.pyplot as plt

    from moec.errors import InputError
    from moec.profile import heat_map

    data = {"layers": [{"router": "r", "num_experts": 2, "load": [0.25, 0.75]}], "samples": 1}
    with matplotlib.rc_context({"backend": "svg"}):
        figures = plt.get_fignums()
        heat_map(data, tmp_path / "h.png")
        assert matplotlib.rcParams["backend"] == "svg" and plt.get_fignums() == figures
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"
    monkeypatch.setitem(__import__("sys").modules, "matplotlib.figure", None)
    with pytest.raises(InputError, match=r"matplotlib, which is not installed: pip install "
                                         r"'moec\[plot\]'"):
        heat_map(data, tmp_path / "h2.png")
