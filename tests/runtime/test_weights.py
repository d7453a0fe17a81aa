"""weights.safetensors: 64-byte aligned tensors, readable by safetensors, loaded memory-mapped."""

from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np
import psutil
import pytest
import safetensors.numpy
import tvm

from moec.errors import ArtifactError
from moec.runtime.weights import ALIGN, PAD_PREFIX, load_mapped, save_aligned


def _weights():
    rng = np.random.default_rng(0)
    return {"a": rng.standard_normal((3, 5)).astype(np.float32),       # 60 bytes: pad after
            "q": rng.integers(-127, 127, (7, 3)).astype(np.int8),
            "b": rng.standard_normal(11).astype(ml_dtypes.bfloat16),
            "empty": np.zeros((0, 4), np.float32),
            "ids": np.arange(5, dtype=np.int64)}


def test_every_tensor_aligned_and_safetensors_reads_it(tmp_path):
    w = _weights()
    save_aligned(w, tmp_path / "w.safetensors")
    raw = (tmp_path / "w.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert (8 + n) % ALIGN == 0
    header = json.loads(raw[8:8 + n])
    for name, entry in header.items():
        if not name.startswith(PAD_PREFIX):
            assert entry["data_offsets"][0] % ALIGN == 0, name
    back = safetensors.numpy.load_file(str(tmp_path / "w.safetensors"))
    assert {k for k in back if not k.startswith(PAD_PREFIX)} == set(w)
    for k, v in w.items():
        np.testing.assert_array_equal(back[k], v)


def test_load_mapped_equal_and_in_requested_order(tmp_path):
    w = _weights()
    save_aligned(w, tmp_path / "w.safetensors")
    names = ["ids", "a", "empty", "b", "q"]
    got = load_mapped(tmp_path / "w.safetensors", names, tvm.cpu())
    for name, t in zip(names, got, strict=True):
        np.testing.assert_array_equal(t.numpy(), w[name])


def test_old_unaligned_files_still_load(tmp_path):
    w = {"x": np.arange(3, dtype=np.int8), "y": np.ones((5, 3), np.float32)}
    safetensors.numpy.save_file(w, str(tmp_path / "old.safetensors"))
    got = load_mapped(tmp_path / "old.safetensors", ["y", "x"], tvm.cpu())
    np.testing.assert_array_equal(got[0].numpy(), w["y"])
    np.testing.assert_array_equal(got[1].numpy(), w["x"])


def test_loading_maps_instead_of_reading(tmp_path):
    """256 MiB of weights: loading must not read them into private memory (a copy would add the
    full size to RSS; mapped pages count only once touched)."""
    big = {f"w{i}": np.full((16, 1 << 20), i, np.float32) for i in range(4)}
    save_aligned(big, tmp_path / "big.safetensors")
    del big
    proc = psutil.Process()
    before = proc.memory_info().rss
    got = load_mapped(tmp_path / "big.safetensors", [f"w{i}" for i in range(4)], tvm.cpu())
    grew = proc.memory_info().rss - before
    assert grew < 32 << 20, f"RSS grew {grew >> 20} MiB loading 256 MiB of weights"
    assert float(got[3].numpy()[5, 7]) == 3.0


def test_damaged_files_are_artifact_errors(tmp_path):
    save_aligned(_weights(), tmp_path / "w.safetensors")
    with pytest.raises(ArtifactError, match="no weight 'missing'"):
        load_mapped(tmp_path / "w.safetensors", ["missing"], tvm.cpu())
    raw = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[:-40])
    with pytest.raises(ArtifactError, match="spans bytes"):
        load_mapped(tmp_path / "cut.safetensors", ["ids"], tvm.cpu())
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(ArtifactError, match="shorter than"):
        load_mapped(tmp_path / "short.safetensors", ["a"], tvm.cpu())
    with pytest.raises(ArtifactError, match="reserved"):
        save_aligned({PAD_PREFIX + "0": np.zeros(1)}, tmp_path / "x.safetensors")


def test_bfloat16_view_outlives_the_loader(tmp_path):
    import gc

    w = {"b": np.linspace(-2, 2, 64, dtype=np.float32).astype(ml_dtypes.bfloat16).reshape(8, 8)}
    save_aligned(w, tmp_path / "w.safetensors")
    (t,) = load_mapped(tmp_path / "w.safetensors", ["b"], tvm.cpu())
    gc.collect()
    assert str(t.dtype) == "bfloat16"
    np.testing.assert_array_equal(t.numpy().astype(np.float32), w["b"].astype(np.float32))


@pytest.mark.parametrize("copy", [False, True])
def test_load_mapped_copy_is_private(tmp_path, copy):
    """copy=True: every tensor (bfloat16 too) lives in TVM's own memory, so rewriting the
    file in place does not reach it; copy=False: aligned tensors are views of the mapping."""
    w = {"a": np.arange(48, dtype=np.float32).reshape(6, 8),
         "b": np.linspace(-2, 2, 64, dtype=np.float32).astype(ml_dtypes.bfloat16).reshape(8, 8)}
    path = tmp_path / "w.safetensors"
    save_aligned(w, path)
    got = load_mapped(path, ["a", "b"], tvm.cpu(), copy=copy)
    with open(path, "r+b") as f:  # rewrite every data byte in place
        f.seek(64)
        f.write(b"\xff" * (path.stat().st_size - 64))
    a = got[0].numpy()
    if copy:
        np.testing.assert_array_equal(a, w["a"])
        np.testing.assert_array_equal(got[1].numpy().astype(np.float32),
                                      w["b"].astype(np.float32))
    else:  # the copy-on-write mapping shows the file's new bytes (not yet written privately)
        assert not np.array_equal(a, w["a"])
