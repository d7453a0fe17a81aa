"""Inputs with several dynamic dims: the signature's dim expressions (`B*S`) and limits are
checked on every call, a `[B, S, H]` model also takes `[S, H]` (one sequence), and a graph that
reshapes between `[B*S, H]` and `[B, S, H]` compiles and runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moec.errors import ArtifactError, InputError
from moec.runtime.dimexpr import DimExprError, parse_dim_expr
from moec.runtime.inputs import batch_left_out, check_inputs
from moec.runtime.manifest import Signature


def _sig(inputs, outputs=(), dims=("B", "S"), limits=()) -> Signature:
    return Signature.from_dict({
        "inputs": [{"name": n, "shape": list(s), "dtype": "float32"} for n, s in inputs],
        "outputs": [{"name": n, "shape": list(s), "dtype": "float32"} for n, s in outputs],
        "dims": {d: {"min": 0, "max": 64} for d in dims},
        "limits": [{"expr": e, "max": m} for e, m in limits]})


def test_dim_expressions_evaluate_and_refuse_what_is_not_one():
    e = parse_dim_expr("(B*S+4)//2 - 1")
    assert e.names == {"B", "S"} and e.evaluate({"B": 3, "S": 5}) == 8
    for bad in ("", "B*", "(B", "B S", "B**2", "-1", "B/2", ")"):
        with pytest.raises(DimExprError):
            parse_dim_expr(bad)


def test_inputs_are_checked_against_expressions_and_limits():
    sig = _sig([("x", ("B", "S", 4)), ("y", ("B*S", 4))], limits=[("B*S", 20)])
    x = np.zeros((3, 5, 4), np.float32)
    assert check_inputs(sig, [x, np.zeros((15, 4), np.float32)]) == {"B": 3, "S": 5}
    with pytest.raises(InputError, match=r"input 'y' has dim 0 = 14 .* expects B\*S = 15 with "
                                         r"B=3, S=5"):
        check_inputs(sig, [x, np.zeros((14, 4), np.float32)])
    with pytest.raises(InputError, match=r"B\*S = 21 \(B=3, S=7\) .* at most B\*S = 20 tokens"):
        check_inputs(sig, [np.zeros((3, 7, 4), np.float32), np.zeros((21, 4), np.float32)])
    only_expr = _sig([("y", ("B*S", 4))])
    with pytest.raises(InputError, match="no input gives B on its own"):
        check_inputs(only_expr, [np.zeros((6, 4), np.float32)])


def test_manifest_keeps_limits_and_refuses_undeclared_names():
    sig = _sig([("x", ("B", "S", 4))], [("y", ("B*S", 4))], limits=[("B*S", 20)])
    assert Signature.from_dict(sig.to_dict()) == sig
    assert str(sig).endswith("B*S <= 20")
    assert "limits" not in _sig([("x", ("B", 4))]).to_dict()  # old manifests stay as they were
    with pytest.raises(ArtifactError, match="uses dim 'Q'"):
        _sig([("x", ("B*Q", 4))])
    with pytest.raises(ArtifactError, match=r"limits\[0\] uses undeclared dim 'Q'"):
        _sig([("x", ("B", 4))], limits=[("B*Q", 3)])
    with pytest.raises(ArtifactError, match="not a dim expression"):
        _sig([("x", ("B+", 4))])


def test_a_call_without_the_batch_dim_is_one_sequence():
    sig = _sig([("x", ("B", "S", 4)), ("m", ("B", "S"))], [("y", ("B", "S", 4)),
                                                          ("l", ("B*S", 8))])
    x2, x3, m1, m2 = (np.zeros(s, np.float32) for s in ((5, 4), (1, 5, 4), (5,), (1, 5)))
    assert batch_left_out(sig, [x2, m1]) == "B"
    assert batch_left_out(sig, [x3, m2]) is None  # nothing left out
    assert batch_left_out(sig, [x2, m2]) is None  # one input with B, one without: no guess
    rank2 = _sig([("x", ("T", 4))], dims=("T",))
    assert batch_left_out(rank2, [np.zeros(4, np.float32)]) is None  # [T, H] keeps T


RESHAPE_IR = """
dim B: 0..8
dim S: 0..16
input %x: f32[B, S, 4]
input %y: f32[B*S, 4]
%f: f32[B*S, 4] = core.reshape(%x) {shape=[-1, 4]}
%s: f32[B*S, 4] = core.add(%f, %y)
%r: f32[B, S, 4] = core.reshape(%s) {shape=["B", "S", 4]}
%t: f32[B, S, 4] = core.scale(%r) {value=2.0}
output %t
"""


def test_reshapes_between_tokens_and_sequences_compile():
    """Relax reshapes to [B, S, 4] (two symbolic dims) and an input shaped by an expression
    (`B*S`) that the runtime checks before the kernels see it."""
    import moec
    from moec.ir import parse

    model = moec.compile(parse(RESHAPE_IR)).load_model()
    assert model.signature.inputs[1].shape == ("B*S", 4)
    for b, s in ((3, 5), (1, 1), (0, 4), (2, 0)):
        x = np.random.rand(b, s, 4).astype(np.float32)
        y = np.random.rand(b * s, 4).astype(np.float32)
        np.testing.assert_allclose(model(x, y), 2 * (x + y.reshape(b, s, 4)), rtol=1e-6)
    with pytest.raises(InputError, match=r"expects B\*S = 15"):
        model(np.zeros((3, 5, 4), np.float32), np.zeros((16, 4), np.float32))
    with pytest.raises(InputError, match="expects rank 3"):  # y has B too: no [S, H] reading
        model(np.zeros((5, 4), np.float32), np.zeros((5, 4), np.float32))


def test_bsh_artifact_takes_one_sequence_as_numpy_and_torch():
    import moec
    from moec.ir import parse

    text = """
dim B: 0..8
dim S: 0..16
input %x: f32[B, S, 4]
%t: f32[B, S, 4] = core.scale(%x) {value=3.0}
output %t
"""
    model = moec.compile(parse(text)).load_model()
    x = np.random.rand(7, 4).astype(np.float32)
    got = model(x)
    assert got.shape == (7, 4)
    np.testing.assert_allclose(got, 3 * x, rtol=1e-6)
    got_t = model(torch.from_numpy(x))
    assert isinstance(got_t, torch.Tensor) and tuple(got_t.shape) == (7, 4)
    assert model(np.zeros((2, 3, 4), np.float32)).shape == (2, 3, 4)
