"""Bad and unusual inputs at the public entries (`moec.load`, `CompiledModel.__call__`,
`moec.compile`): every layout a numpy array or torch tensor can have is either computed right
(against PyTorch eager) or refused with an InputError saying what to do; NaN and Inf propagate as
PyTorch propagates them; empty batches work."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import moec
from moec.errors import InputError, MoecError
from moec.passes.manager import relative_error
from moec.runtime.inputs import aligned_empty

from .conftest import HIDDEN, MAX_TOKENS, Demo, eager, tokens

RTOL = 1e-4


def _offset_view(x: np.ndarray, offset: int) -> np.ndarray:
    """`x` copied into a buffer at a byte offset: aligned to `offset` mod 64 only."""
    raw = np.zeros(x.nbytes + 64 + offset, np.uint8)
    start = (-raw.ctypes.data) % 64 + offset
    view = raw[start : start + x.nbytes].view(np.float32).reshape(x.shape)
    view[...] = x
    return view


def _aligned(x: np.ndarray) -> np.ndarray:
    out = aligned_empty(x.shape, x.dtype)
    out[...] = x
    return out


def _readonly(x: np.ndarray) -> np.ndarray:
    x = x.copy()
    x.setflags(write=False)
    return x


X = tokens(7, seed=3)
# name -> the input, built from X; each must give eager(X) (as float32).
LAYOUTS: dict[str, Any] = {
    "fortran-order": lambda: np.asfortranarray(X),
    "reversed-rows": lambda: np.ascontiguousarray(X[::-1])[::-1],
    "reversed-cols": lambda: np.ascontiguousarray(X[:, ::-1])[:, ::-1],
    "column-slice": lambda: np.concatenate([X, X], 1)[:, :HIDDEN],
    "row-stride-2": lambda: np.repeat(X, 2, axis=0)[::2],
    "misaligned-4": lambda: _offset_view(X, 4),
    "misaligned-32": lambda: _offset_view(X, 32),
    "read-only": lambda: _readonly(X),
    "frombuffer-bytes": lambda: np.frombuffer(X.tobytes(), np.float32).reshape(X.shape),
    "big-endian": lambda: X.astype(">f4"),
    "float64": lambda: X.astype(np.float64),
    "float16": lambda: X.astype(np.float16),
    "masked-array": lambda: np.ma.masked_array(X, mask=np.zeros(X.shape, bool)),
    "torch": lambda: torch.from_numpy(X.copy()),
    "torch-transposed": lambda: torch.from_numpy(X.T.copy()).T,
    "torch-offset-4": lambda: torch.from_numpy(np.r_[np.float32(0), X.ravel()])[1:].view(7, -1),
    "torch-requires-grad": lambda: torch.from_numpy(X.copy()).requires_grad_(),
    "torch-parameter": lambda: torch.nn.Parameter(torch.from_numpy(X.copy())),
    "torch-neg-view": lambda: torch.from_numpy(_aligned(-X))._neg_view(),  # zero-copy path
    "torch-bfloat16": lambda: torch.from_numpy(X.copy()).bfloat16(),
    "torch-float64": lambda: torch.from_numpy(X.astype(np.float64)),
}


def _as_f32(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().resolve_neg().float().numpy()
    return np.asarray(x, np.float32)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_memory_layouts_compute_right(demo: Demo, name: str) -> None:
    x = LAYOUTS[name]()
    got = demo.model(x)
    assert type(got) is (torch.Tensor if isinstance(x, torch.Tensor) else np.ndarray)
    got = _as_f32(got)
    assert got.shape == X.shape and got.dtype == np.float32
    assert relative_error(got, eager(demo.module, _as_f32(x))) <= (
        1e-2 if "16" in name else RTOL  # the input itself was rounded
    )


def test_broadcast_views_compute_right(demo: Demo) -> None:
    row = tokens(1, seed=9)
    for x in (np.broadcast_to(row, (5, HIDDEN)), torch.from_numpy(row).expand(5, HIDDEN)):
        got = _as_f32(demo.model(x))
        assert relative_error(got, eager(demo.module, np.repeat(row, 5, 0))) <= RTOL


def test_inputs_are_not_modified(demo: Demo) -> None:
    x = tokens(9, seed=4)
    keep = x.copy()
    demo.model(x)
    np.testing.assert_array_equal(x, keep)


BAD: dict[str, tuple[Any, str]] = {
    "python-list": (lambda: X.tolist(), "is a list; pass a numpy array or a torch tensor"),
    "none": (lambda: None, "is a NoneType"),
    "scalar": (lambda: np.float32(1), r"shape \(\) \(rank 0\).*expects rank 2"),
    "rank-3": (lambda: X[None], r"rank 3\) but the model expects rank 2"),
    "hidden-32": (lambda: X[:, :32], r"dim 1 is 32, expected 64"),
    "too-many-tokens": (
        lambda: tokens(MAX_TOKENS + 1),
        rf"T={MAX_TOKENS + 1} .*at most T={MAX_TOKENS}.*max_tokens=",
    ),
    "int32": (lambda: X.astype(np.int32), "dtype int32 but the model expects float32"),
    "bool": (lambda: X > 0, "dtype bool"),
    "complex": (lambda: X.astype(np.complex64), "dtype complex64"),
    "object": (lambda: X.astype(object), "dtype object"),
    "string": (lambda: np.full(X.shape, "a"), "dtype str"),
    "structured": (lambda: np.zeros(X.shape, [("a", "f4")]), "dtype void"),
    "datetime": (lambda: np.zeros(X.shape, "datetime64[s]"), "dtype datetime64"),
    "torch-int64": (lambda: torch.zeros(7, HIDDEN, dtype=torch.int64), "dtype int64"),
    "torch-complex": (lambda: torch.zeros(7, HIDDEN, dtype=torch.complex64), "complex64"),
    "torch-sparse": (lambda: torch.from_numpy(X).to_sparse(), "sparse_coo torch tensor"),
    "torch-sparse-csr": (lambda: torch.from_numpy(X).to_sparse_csr(), "sparse_csr"),
    "torch-nested": (
        lambda: torch.nested.nested_tensor([torch.zeros(3, HIDDEN), torch.zeros(2, HIDDEN)]),
        "nested torch tensor",
    ),
    "torch-meta-device": (
        lambda: torch.empty(7, HIDDEN, device="meta"),
        r"is on meta but the model runs on cpu; move it with .to\('cpu'\)",
    ),
    # its mask used to be ignored silently
    "masked-array": (lambda: np.ma.masked_array(X, mask=X > 0),
                     "masked numpy array with masked elements.*filled"),
}


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch: sparse CSR / nested are beta
@pytest.mark.parametrize("name", list(BAD))
def test_bad_inputs_raise_input_error(demo: Demo, name: str) -> None:
    make, pattern = BAD[name]
    with pytest.raises(InputError, match=pattern):
        demo.model(make())


def test_wrong_argument_count(demo: Demo) -> None:
    with pytest.raises(InputError, match=r"takes 1 input\(s\) \(x: float32\[T, 64\]\) but 2"):
        demo.model(X, X)
    with pytest.raises(InputError, match="but 0 were given"):
        demo.model()


def test_inputs_by_name(demo: Demo) -> None:
    """`model(x=...)` used to raise TypeError."""
    np.testing.assert_array_equal(demo.model(x=X), demo.model(X))
    with pytest.raises(InputError, match="no input 'y'; its inputs are x"):
        demo.model(y=X)
    with pytest.raises(InputError, match="'x' is given twice"):
        demo.model(X, x=X)


@pytest.mark.parametrize("n", [0, 1, MAX_TOKENS])
def test_token_count_bounds_and_empty_batches(demo: Demo, n: int) -> None:
    strided = np.repeat(tokens(n), 2, axis=1)[:, ::2]
    for x in (tokens(n), torch.from_numpy(tokens(n)), strided):
        got = _as_f32(demo.model(x))
        assert got.shape == (n, HIDDEN)
        if n:
            assert relative_error(got, eager(demo.module, _as_f32(x))) <= RTOL


def _fill(kind: str) -> np.ndarray:
    x = tokens(9, seed=11)
    if kind == "nan-element":
        x[3, 5] = np.nan
    elif kind == "nan-row":
        x[3] = np.nan
    elif kind == "nan-everywhere":
        x[:] = np.nan
    elif kind == "inf-element":
        x[0, 0] = np.inf
    elif kind == "inf-and-minus-inf":
        x[2, 0], x[2, 1] = np.inf, -np.inf
    elif kind == "inf-everywhere":
        x[:] = np.inf
    elif kind == "huge-3e38":
        x[4] = 3e38
    elif kind == "huge-negative":
        x[5] = -3e38
    elif kind == "huge-element":
        x[6, 7] = 3e38
    elif kind == "subnormal-row":
        x[1] = 1e-45
    elif kind == "zero-row":
        x[1] = 0.0
    elif kind == "negative-zero-row":
        x[1] = -0.0
    return x


@pytest.mark.parametrize("kind", [
    "nan-element", "nan-row", "nan-everywhere", "inf-element", "inf-and-minus-inf",
    "inf-everywhere", "huge-3e38", "huge-negative", "huge-element", "subnormal-row", "zero-row",
    "negative-zero-row",
])
def test_nan_and_inf_propagate_like_pytorch(demo: Demo, kind: str) -> None:
    x = _fill(kind)
    got, want = demo.model(x), eager(demo.module, x)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(want))
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    finite = np.isfinite(want)
    if finite.any():
        assert relative_error(got[finite], want[finite]) <= RTOL
    # A token's NaN stays in its own row: the other rows are the clean model's.
    bad_rows = ~np.isfinite(x).all(axis=1)
    if bad_rows.any() and not bad_rows.all():
        clean = demo.model(np.ascontiguousarray(x[~bad_rows]))
        assert relative_error(got[~bad_rows], clean) <= RTOL


@pytest.mark.parametrize(("path", "pattern"), [
    (None, "must be a str or os.PathLike, not NoneType"),
    (42, "not int"),
    ("/nonexistent/model.moec", "does not exist"),
    ("/", "not a moec artifact: manifest.json is missing"),
    ("m" * 300 + ".moec", "cannot access the artifact path .*: File name too long"),
    ("m" * 300 + ".moec.tar", "cannot access the artifact path"),
])
def test_load_rejects_bad_paths(path: Any, pattern: str) -> None:
    with pytest.raises(MoecError, match=pattern):
        moec.load(path)
    if isinstance(path, str):
        with pytest.raises(MoecError, match=pattern):
            moec.runtime.verify(path)


def test_save_to_a_name_too_long(demo: Demo, tmp_path: Path) -> None:
    for name in ("m" * 300 + ".moec", "m" * 300 + ".moec.tar"):
        with pytest.raises(MoecError, match="cannot write an (artifact|archive) to .*too long"):
            demo.artifact.save(tmp_path / name)


@pytest.mark.parametrize("device", [None, 0, "tpu", "cuda:x", "cpu:-1", "CPU"])
def test_load_rejects_bad_devices(demo: Demo, device: Any) -> None:
    with pytest.raises(InputError, match="unknown device"):
        moec.load(demo.path, device=device)


def test_load_accepts_torch_devices(demo: Demo) -> None:
    assert moec.load(demo.path, device=torch.device("cpu")).device == "cpu"


@pytest.mark.parametrize(("kwargs", "pattern"), [
    ({"max_tokens": 0}, "max_tokens must be >= 1"),
    ({"max_tokens": -5}, "max_tokens must be >= 1"),
    ({"target": "tpu"}, "unknown target 'tpu'"),
    ({"pipeline": "no-such-pipeline"}, "unknown pass"),
    ({"example": (torch.zeros(4, 32),)}, "could not trace"),
    ({"example": ()}, "could not trace"),
    ({"max_tokens": "64"}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens must be an int"),
    ({"model": None}, "model"),
    ({"example": None}, "example"),
])
def test_compile_rejects_bad_arguments(kwargs: dict[str, Any], pattern: str) -> None:
    from moec.models.reference import demo_model

    module, example = demo_model(seed=0, hidden=16, intermediate=16, experts=2, top_k=1)
    module = kwargs.pop("model", module)
    example = kwargs.pop("example", example)
    with pytest.raises(MoecError, match=pattern):
        moec.compile(module, example, **kwargs)
