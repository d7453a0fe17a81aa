"""CompiledModel.__call__: numerics, numpy/torch in and out, conversions, and input errors."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
import torch

from moec.errors import InputError
from moec.runtime import _tvm
from moec.runtime.inputs import aligned_empty, to_tvm

from .tiny_models import MAX_T, H, reference


def _inputs(t: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((t, H)).astype("float32"), rng.random(t).astype("float32")


def _check(model: Any, weights: dict, x: Any, s: Any) -> tuple[Any, Any]:
    y, z = model(x, s)
    ry, rz = reference(np.asarray(x), np.asarray(s), weights)
    np.testing.assert_allclose(np.asarray(y), ry, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(z), rz, rtol=1e-4, atol=1e-4)
    return y, z


@pytest.mark.parametrize("t", [0, 1, 7, MAX_T])
def test_numpy_matches_reference(model: Any, scale_weights: dict, t: int) -> None:
    y, z = _check(model, scale_weights, *_inputs(t))
    assert isinstance(y, np.ndarray) and isinstance(z, np.ndarray)
    assert y.shape == (t, H) and z.shape == (t, 32) and z.dtype == np.float32


def test_torch_in_torch_out(model: Any, scale_weights: dict) -> None:
    x, s = _inputs(5)
    y, z = model(torch.from_numpy(x), torch.from_numpy(s))
    assert isinstance(y, torch.Tensor) and isinstance(z, torch.Tensor)
    ry, rz = reference(x, s, scale_weights)
    np.testing.assert_allclose(z.numpy(), rz, rtol=1e-4, atol=1e-4)
    # Tensors that require grad are detached, not refused.
    y2, _ = model(torch.from_numpy(x).requires_grad_(), torch.from_numpy(s))
    np.testing.assert_allclose(y2.numpy(), ry, rtol=1e-5, atol=1e-5)


def test_misaligned_numpy_input(model: Any, scale_weights: dict) -> None:
    # A view 4 bytes into a buffer: never 64-byte aligned. Vectorised kernels may fault on it;
    # the runtime must copy it to an aligned buffer and compute the right result.
    x, s = _inputs(9)
    buf = np.zeros(x.size * 4 + 4, np.uint8)
    xm = np.frombuffer(buf, dtype=np.float32, offset=4, count=x.size).reshape(x.shape)
    assert xm.ctypes.data % 64 != 0
    np.copyto(xm, x)
    _check(model, scale_weights, xm, s)
    # Read-only (DLPack cannot export those) and misaligned at once.
    ro = np.frombuffer(x.tobytes() + b"\0" * 4, dtype=np.float32, count=x.size).reshape(x.shape)
    _check(model, scale_weights, ro, s)


def test_misaligned_torch_view(model: Any, scale_weights: dict) -> None:
    x, s = _inputs(5)
    base = torch.zeros(x.size + 1)
    view = base[1:].view(x.shape)
    view.copy_(torch.from_numpy(x))
    assert view.data_ptr() % 64 != 0
    y, _ = model(view, torch.from_numpy(s))
    np.testing.assert_allclose(y.numpy(), reference(x, s, scale_weights)[0], rtol=1e-5)


def test_noncontiguous_and_other_float_dtypes(model: Any, scale_weights: dict) -> None:
    x, s = _inputs(6)
    xt = np.ascontiguousarray(x.T).T  # same values, Fortran order
    assert not xt.flags.c_contiguous
    _check(model, scale_weights, xt, s)
    _check(model, scale_weights, x.astype(np.float64), s.astype(np.float64))
    big = np.zeros((6, 2 * H), np.float32)
    big[:, ::2] = x
    _check(model, scale_weights, big[:, ::2], s)  # strided view
    y, _ = model(torch.from_numpy(x).half(), torch.from_numpy(s).double())
    ref = reference(x.astype(np.float16).astype(np.float32), s, scale_weights)[0]
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-5, atol=1e-5)


def test_conversions_are_aligned_and_zero_copy_when_possible(model: Any) -> None:
    tvm, spec, dev = _tvm.tvm(), model.signature.inputs[0], _tvm.tvm().cpu()
    x, _ = _inputs(4)
    buf = np.zeros(x.size * 4 + 4, np.uint8)
    xm = np.frombuffer(buf, dtype=np.float32, offset=4, count=x.size).reshape(x.shape)
    assert to_tvm(spec, xm, tvm, dev).data_ptr() % 64 == 0
    aligned = aligned_empty(x.shape, np.dtype(np.float32))
    aligned[:] = x
    assert to_tvm(spec, aligned, tvm, dev).data_ptr() == aligned.ctypes.data
    xt = torch.from_numpy(x).clone()  # torch allocations are 64-byte aligned
    assert to_tvm(spec, xt, tvm, dev).data_ptr() == xt.data_ptr()
    assert to_tvm(spec, xt.double(), tvm, dev).data_ptr() % 64 == 0


def test_outputs_are_independent(model: Any, scale_weights: dict) -> None:
    x1, s1 = _inputs(3, seed=1)
    y1, _ = model(x1, s1)
    keep = y1.copy()
    model(*_inputs(3, seed=2))
    np.testing.assert_array_equal(y1, keep)  # a later call does not overwrite earlier outputs


def test_threads_get_their_own_results(model: Any, scale_weights: dict) -> None:
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            for _ in range(5):
                _check(model, scale_weights, *_inputs(seed % 5 + 1, seed))
        except BaseException as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_int_input_conversion(ids_model: Any) -> None:
    out, same = ids_model(np.array([1, -2, 3], np.int32))
    np.testing.assert_array_equal(out, [2, -4, 6])
    assert out.dtype == np.int32 and same.dtype == np.int32
    np.testing.assert_array_equal(ids_model(np.array([5, 6]))[0], [10, 12])  # int64 -> int32
    with pytest.raises(InputError, match=r"'ids' holds values in \[0, 4294967296\]"):
        ids_model(np.array([0, 2**32]))
    with pytest.raises(InputError, match="dtype float32 but the model expects int32"):
        ids_model(np.array([1.0], np.float32))
    with pytest.raises(InputError, match=r"needs T >= 1"):
        ids_model(np.zeros(0, np.int32))


def test_outputs_never_alias_inputs(ids_model: Any) -> None:
    ids = aligned_empty((4,), np.dtype(np.int32))  # aligned: passed zero-copy
    ids[:] = [1, 2, 3, 4]
    _, same = ids_model(ids)
    np.testing.assert_array_equal(same, ids)
    assert not np.shares_memory(same, ids)
    t = torch.arange(4, dtype=torch.int32)
    _, same_t = ids_model(t)
    assert isinstance(same_t, torch.Tensor) and same_t.data_ptr() != t.data_ptr()


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        ((np.zeros((2, H), np.float32),), r"takes 2 input\(s\) \(x: float32\[T, 64\], s: "),
        (
            (np.zeros(H, np.float32), np.zeros(1, np.float32)),
            r"'x' is a numpy float32 array of shape \(64,\) \(rank 1\) .*rank 2",
        ),
        (
            (np.zeros((2, 32), np.float32), np.zeros(2, np.float32)),
            r"'x' is a numpy float32 array of shape \(2, 32\).*: dim 1 is 32, expected 64",
        ),
        (
            (np.zeros((2, H), np.int64), np.zeros(2, np.float32)),
            r"'x' has dtype int64 but the model expects float32",
        ),
        (
            (np.zeros((2, H), np.float32), np.zeros(3, np.float32)),
            r"'s' has T=3 .* input 'x' has T=2",
        ),
        (
            (np.zeros((MAX_T + 1, H), np.float32), np.zeros(MAX_T + 1, np.float32)),
            rf"T={MAX_T + 1} .*at most T={MAX_T}.*max_tokens=.*--max-tokens",
        ),
        (([[0.0] * H], np.zeros(1, np.float32)), r"'x' is a list; pass a numpy array"),
        ((np.zeros((2, H), bool), np.zeros(2, np.float32)), r"'x' has dtype bool"),
    ],
    ids=["count", "rank", "hidden", "dtype", "inconsistent-T", "too-many", "list", "bool"],
)
def test_bad_inputs(model: Any, args: tuple, pattern: str) -> None:
    with pytest.raises(InputError, match=pattern):
        model(*args)


def test_bad_torch_inputs(model: Any) -> None:
    with pytest.raises(InputError, match="'x' has dtype int32 but the model expects float32"):
        model(torch.zeros(2, H, dtype=torch.int32), torch.zeros(2))
    with pytest.raises(InputError, match=r"'x' is a torch float32 tensor of shape \(2, 3\) on cpu"):
        model(torch.zeros(2, 3), torch.zeros(2))


def test_cuda_graph_needs_a_cuda_model_and_cuda_inputs(model):
    """CUDA graph capture is refused with a clear error on a CPU model, and for non-CUDA inputs
    (the capture itself runs on a GPU: benchmarks/gpu_check.py)."""
    import torch

    from moec.errors import InputError
    from moec.runtime.cuda_graph import capture

    x = torch.zeros(2, model.signature.inputs[0].shape[1])
    with pytest.raises(InputError, match="device='cuda'"):
        model.cuda_graph(x)
    with pytest.raises(InputError, match="torch CUDA tensors"):
        capture(model, x)


def test_weight_modes_agree(saved_path: Any, scale_artifact: Any, scale_weights: dict) -> None:
    """moec.load(weights="copy") (the CPU default) and "mmap" run the same numbers, also
    through Artifact.load_model; any other mode is refused before anything loads."""
    from moec.runtime import load

    x, s = _inputs(5)
    for mode in ("copy", "mmap"):
        _check(load(saved_path, weights=mode), scale_weights, x, s)
        _check(scale_artifact.load_model(weights=mode), scale_weights, x, s)
    with pytest.raises(InputError, match="weights='lazy'"):
        load(saved_path, weights="lazy")
