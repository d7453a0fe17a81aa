"""verify() and load() refuse damaged, foreign or unrunnable artifacts with an ArtifactError
that names the file and the problem."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from moec.errors import ArtifactError, InputError
from moec.runtime import load, verify
from moec.runtime.artifact import write_manifest
from moec.runtime.verify import sha256_file


def _edit_manifest(root: Path, edit: Any) -> None:
    """Edit the manifest and update its digest (so that the checks behind the digest run)."""
    data = json.loads((root / "manifest.json").read_text())
    edit(data)
    write_manifest(root, json.dumps(data).encode())


def _both(root: Path, pattern: str) -> None:
    """verify and load must both refuse, with the same message."""
    with pytest.raises(ArtifactError, match=pattern):
        verify(root)
    with pytest.raises(ArtifactError, match=pattern):
        load(root)


def test_truncated_file(artifact_copy: Path) -> None:
    path = artifact_copy / "weights.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    _both(artifact_copy, r"weights\.safetensors .* is truncated: \d+ bytes, the manifest says")


@pytest.mark.parametrize("name", ["kernels.so", "weights.safetensors", "model.ir"])
def test_flipped_byte(artifact_copy: Path, name: str) -> None:
    path = artifact_copy / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    _both(artifact_copy, rf"{re.escape(name)} in .*: hash mismatch")


def test_flipped_byte_passes_without_hash_check(artifact_copy: Path) -> None:
    path = artifact_copy / "model.ir"
    path.write_bytes(path.read_bytes().replace(b"%y", b"%q"))
    load(artifact_copy, check_hashes=False)


@pytest.mark.parametrize("name", ["kernels.so", "weights.safetensors"])
def test_missing_file(artifact_copy: Path, name: str) -> None:
    (artifact_copy / name).unlink()
    _both(artifact_copy, rf"{re.escape(name)} is missing from")


def test_missing_manifest_and_folder(artifact_copy: Path, tmp_path: Path) -> None:
    (artifact_copy / "manifest.json").unlink()
    _both(artifact_copy, r"not a moec artifact: manifest\.json is missing")
    _both(tmp_path / "nowhere.moec", "does not exist")


def test_manifest_not_json(artifact_copy: Path) -> None:
    (artifact_copy / "manifest.json").write_text("{ nope")
    _both(artifact_copy, r"manifest\.json in .*: its sha256 .* is not the one manifest\.sha256")
    write_manifest(artifact_copy, b"{ nope")
    _both(artifact_copy, "not valid JSON")


@pytest.mark.parametrize(("version", "hint"), [(99, "upgrade moec"), (0, "recompile")])
def test_wrong_format_version(artifact_copy: Path, version: int, hint: str) -> None:
    _edit_manifest(artifact_copy, lambda m: m.update(format_version=version))
    _both(artifact_copy, rf"format version {version} is not supported.*{hint}")


def test_unknown_cpu_feature(artifact_copy: Path) -> None:
    _edit_manifest(artifact_copy, lambda m: m["target"]["cpu_features"].append("avx1024_moec"))
    _both(artifact_copy, r"need CPU features this host lacks: avx1024_moec.*illegal instruction")
    verify(artifact_copy, check_host=False)  # checking a build for another machine still works


def test_unknown_target_kind(artifact_copy: Path) -> None:
    _edit_manifest(artifact_copy, lambda m: m["target"].update(kind="hexagon"))
    _both(artifact_copy, "targets 'hexagon', which this runtime cannot run")


def test_kernels_for_another_architecture(artifact_copy: Path) -> None:
    # Patch the ELF e_machine field and re-hash, so that only the architecture check can fail.
    path = artifact_copy / "kernels.so"
    data = bytearray(path.read_bytes())
    host = int.from_bytes(data[18:20], "little")
    data[18:20] = (183 if host != 183 else 62).to_bytes(2, "little")
    path.write_bytes(bytes(data))
    _edit_manifest(
        artifact_copy, lambda m: m["files"]["kernels.so"].update(sha256=sha256_file(path))
    )
    _both(artifact_copy, r"kernels\.so is compiled for (aarch64|x86_64), but this host is")


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        (lambda m: m["files"].pop("model.ir"), "does not list model.ir"),
        (lambda m: m["files"].update({"../x": m["files"]["model.ir"]}), "invalid file name"),
        (lambda m: m.pop("params"), "missing required field 'params'"),
        (lambda m: m["params"].append("w3"), "lacks weight.*w3"),
        (lambda m: m["signature"]["inputs"][0].update(shape=["B", 64]), "uses dim 'B'"),
        (lambda m: m["files"]["model.ir"].update(size="7"), "size must be int"),
    ],
    ids=["unlisted", "traversal", "no-params", "missing-weight", "undeclared-dim", "size-type"],
)
def test_malformed_manifest(artifact_copy: Path, edit: Any, pattern: str) -> None:
    _edit_manifest(artifact_copy, edit)
    _both(artifact_copy, pattern)


def test_device_mismatch(saved_path: Path) -> None:
    with pytest.raises(ArtifactError, match="compiled for llvm and runs on device 'cpu'"):
        load(saved_path, device="cuda")
    with pytest.raises(InputError, match="unknown device 'tpu'"):
        load(saved_path, device="tpu")


def test_tvm_version_mismatch_warns(artifact_copy: Path) -> None:
    _edit_manifest(artifact_copy, lambda m: m.update(tvm_version="0.1.0"))
    with pytest.warns(RuntimeWarning, match="built with TVM 0.1.0"):
        load(artifact_copy)
