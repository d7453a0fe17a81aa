"""Damaged, edited and foreign artifacts are refused with ArtifactError (by `verify` and `load`,
or at the latest by the first call); archives extract safely; `verify` loads no native code."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import moec
from moec.errors import ArtifactError
from moec.runtime import archive, load, verify
from moec.runtime.verify import MAX_MANIFEST_BYTES, sha256_file

from .conftest import Demo, tokens

FILES = ["kernels.so", "weights.safetensors", "model.ir"]


def _refused(root: Path, pattern: str | None = None) -> None:
    with pytest.raises(ArtifactError, match=pattern):
        verify(root)
    with pytest.raises(ArtifactError, match=pattern):
        load(root)


def _damage(path: Path, fault: str) -> None:
    data = path.read_bytes()
    if fault == "empty":
        path.write_bytes(b"")
    elif fault == "truncated-half":
        path.write_bytes(data[: len(data) // 2])
    elif fault == "truncated-1":
        path.write_bytes(data[:-1])
    elif fault == "extended-1":
        path.write_bytes(data + b"\0")
    elif fault.startswith("flip-"):
        at = {"first": 0, "middle": len(data) // 2, "last": len(data) - 1}[fault[5:]]
        path.write_bytes(data[:at] + bytes([data[at] ^ 0x80]) + data[at + 1 :])
    elif fault == "missing":
        path.unlink()
    elif fault == "directory":
        path.unlink()
        path.mkdir()
    elif fault == "swapped":  # another file of the artifact in its place, same name
        other = next(p for p in path.parent.iterdir() if p.name not in (path.name, "manifest.json"))
        path.write_bytes(other.read_bytes())
    else:
        raise AssertionError(fault)


FAULTS = ["empty", "truncated-half", "truncated-1", "extended-1", "flip-first", "flip-middle",
          "flip-last", "missing", "directory", "swapped"]
PATTERNS = {"empty": "truncated", "truncated-half": "truncated", "truncated-1": "truncated",
            "extended-1": "wrong size", "missing": "missing", "directory": "missing"}


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("name", FILES)
def test_damaged_file_is_refused(artifact_copy: Path, name: str, fault: str) -> None:
    _damage(artifact_copy / name, fault)
    _refused(artifact_copy, PATTERNS.get(fault, "hash mismatch|wrong size|truncated"))


@pytest.mark.parametrize("fault", ["empty", "truncated-half", "flip-first", "missing",
                                   "directory"])
def test_damaged_manifest_is_refused(artifact_copy: Path, fault: str) -> None:
    _damage(artifact_copy / "manifest.json", fault)
    _refused(artifact_copy)


def _edit(root: Path, edit: Any) -> None:
    path = root / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _rehash(root: Path, name: str) -> None:
    _edit(root, lambda m: m["files"][name].update(
        sha256=sha256_file(root / name), size=(root / name).stat().st_size))


def _set(*keys: Any, value: Any) -> Any:
    def edit(m: dict) -> None:
        for k in keys[:-1]:
            m = m[k]
        m[keys[-1]] = value
    return edit


MANIFEST_EDITS = {
    "format-version-0": (_set("format_version", value=0), "format version 0 is not supported"),
    "format-version-2": (_set("format_version", value=2), "version 2 is not supported.*upgrade"),
    "format-version-str": (_set("format_version", value="1"), "format_version must be int"),
    "format-version-float": (_set("format_version", value=1.0), "format_version must be int"),
    "format-version-null": (_set("format_version", value=None), "format_version must be int"),
    "target-cuda": (_set("target", "kind", value="cuda"), "compiled for cuda and runs on"),
    "target-unknown": (_set("target", "kind", value="hexagon"), "targets 'hexagon'"),
    "target-not-dict": (_set("target", value="llvm"), "target must be dict"),
    "cpu-feature-missing": (
        lambda m: m["target"]["cpu_features"].append("avx1024"), "CPU features this host lacks"),
    "hash-not-hex": (_set("files", "model.ir", "sha256", value="zz"), "not a hex sha256"),
    "size-negative": (_set("files", "model.ir", "size", value=-1), "wrong size"),
    "file-traversal": (
        lambda m: m["files"].update({"../../etc/passwd": m["files"]["model.ir"]}),
        "invalid file name"),
    "file-absolute": (
        lambda m: m["files"].update({"/etc/passwd": m["files"]["model.ir"]}), "invalid file name"),
    "unlisted-kernels": (lambda m: m["files"].pop("kernels.so"), "does not list kernels.so"),
    "extra-weight": (lambda m: m["params"].append("ghost"), "lacks weight.*ghost"),
    "dims-min-over-max": (_set("signature", "dims", "T", value={"min": 9, "max": 1}), "bounds"),
    "undeclared-dim": (_set("signature", "inputs", 0, "shape", value=["B", 64]), "uses dim 'B'"),
    "dtype-unknown": (_set("signature", "inputs", 0, "dtype", value="float33"), "float33"),
    "dtype-object": (_set("signature", "inputs", 0, "dtype", value="O"), "'O'"),
    # The manifest says more or fewer arguments than the kernels' main takes: refused at load.
    "extra-input": (
        lambda m: m["signature"]["inputs"].append({"name": "y", "shape": ["T"],
                                                  "dtype": "float32"}),
        "main takes 8 arguments but the manifest lists 2 input"),
    "dropped-param": (lambda m: m["params"].pop(), "main takes 8 arguments"),
}


@pytest.mark.parametrize("name", list(MANIFEST_EDITS))
def test_edited_manifest_is_refused(artifact_copy: Path, name: str) -> None:
    edit, pattern = MANIFEST_EDITS[name]
    _edit(artifact_copy, edit)
    with pytest.raises(ArtifactError, match=pattern):
        load(artifact_copy)


# Edits that every load-time check lets through, because the manifest is consistent with
# itself, but that contradict the kernels: the first call says so with an ArtifactError.
CALL_EDITS = {
    "hidden-65": (_set("signature", "inputs", 0, "shape", value=["T", 65]), (3, 65), np.float32),
    "dtype-float64": (_set("signature", "inputs", 0, "dtype", value="float64"), (3, 64),
                      np.float64),
    "rank-3": (_set("signature", "inputs", 0, "shape", value=["T", 4, 16]), (3, 4, 16),
               np.float32),
    "params-reordered": (lambda m: m["params"].reverse(), (3, 64), np.float32),
}


@pytest.mark.parametrize("name", list(CALL_EDITS))
def test_manifest_contradicting_the_kernels_fails_at_call(artifact_copy: Path, name: str) -> None:
    edit, shape, dtype = CALL_EDITS[name]
    _edit(artifact_copy, edit)
    model = load(artifact_copy)
    with pytest.raises(ArtifactError, match="the manifest and the kernels disagree"):
        model(np.ones(shape, dtype))


def test_manifest_limits(artifact_copy: Path) -> None:
    path = artifact_copy / "manifest.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    _refused(artifact_copy, "nested too deeply")
    path.write_text('{"format_version": NaN}')
    _refused(artifact_copy, "NaN is not a JSON value")
    path.write_bytes(b" " * (MAX_MANIFEST_BYTES + 1))
    _refused(artifact_copy, "larger than")
    path.write_bytes(b"\xff\xfe{}")
    _refused(artifact_copy, "cannot be read")


def test_rehashed_corrupt_weights_are_refused(artifact_copy: Path) -> None:
    # A corrupt file whose hash was updated to match: the safetensors header check still fails.
    path = artifact_copy / "weights.safetensors"
    path.write_bytes(b"\xff" * 8 + path.read_bytes()[8:])
    _rehash(artifact_copy, "weights.safetensors")
    _refused(artifact_copy, "cannot be read as safetensors")


def test_kernels_for_another_architecture(artifact_copy: Path) -> None:
    path = artifact_copy / "kernels.so"
    data = bytearray(path.read_bytes())
    data[18:20] = (183 if int.from_bytes(data[18:20], "little") != 183 else 62).to_bytes(2,
                                                                                         "little")
    path.write_bytes(bytes(data))
    _rehash(artifact_copy, "kernels.so")
    _refused(artifact_copy, r"kernels\.so is compiled for")


# ---------------------------------------------------------------------------------- archives


def test_archive_round_trip(demo: Demo, tmp_path: Path) -> None:
    a = archive.pack(demo.path, tmp_path / "a.moec.tar")
    b = archive.pack(demo.path, tmp_path / "b.moec.tar")
    assert a.read_bytes() == b.read_bytes()  # deterministic
    assert verify(a).files == verify(demo.path).files
    x = tokens(5)
    np.testing.assert_array_equal(load(a)(x), demo.model(x))
    with tarfile.open(a) as tar:
        assert sorted(tar.getnames()) == ["demo.moec", *(f"demo.moec/{n}" for n in
                                          sorted(["manifest.json", *FILES]))]


def test_artifact_save_to_tar(demo: Demo, tmp_path: Path) -> None:
    from moec.runtime import Artifact

    assert isinstance(moec.load(demo.path), moec.CompiledModel)
    art_path = tmp_path / "m.moec.tar"
    (tmp_path / "not-a-tar.moec.tar").write_text("precious")
    art = _artifact_from(demo.path)
    assert isinstance(art, Artifact)
    art.save(art_path)
    np.testing.assert_array_equal(load(art_path)(tokens(3)), demo.model(tokens(3)))
    with pytest.raises(ArtifactError, match="not a tar archive"):
        art.save(tmp_path / "not-a-tar.moec.tar")
    assert (tmp_path / "not-a-tar.moec.tar").read_text() == "precious"


def _artifact_from(path: Path) -> Any:
    """An in-memory Artifact with the demo's kernels and weights (no second compile)."""
    import safetensors.numpy

    from moec.runtime import Artifact

    class Built:  # stands in for the TVM executable: export_library copies kernels.so
        def export_library(self, dest: str) -> None:
            Path(dest).write_bytes((path / "kernels.so").read_bytes())

    m = verify(path)
    ex = Built()
    weights = safetensors.numpy.load_file(str(path / "weights.safetensors"))
    return Artifact(ex, {p: weights[p] for p in m.params}, signature=m.signature,
                    target=m.target, ir_text=(path / "model.ir").read_text(),
                    pipeline=m.pipeline, meta=m.meta)


def _tar(members: list[tuple[str, bytes, bytes]], mode: str = "w") -> bytes:
    """A tar with (name, tar type, data) members; links point at 'target'."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.linkname = data.decode()
                tar.addfile(info)
            elif kind == tarfile.REGTYPE:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return buf.getvalue()


F = tarfile.REGTYPE
CRAFTED = {
    "dotdot": [("m.moec/../../evil", F, b"x")],
    "dotdot-top": [("../evil", F, b"x")],
    "absolute": [("/tmp/moec-evil", F, b"x")],
    "nested-folder": [("m.moec/sub/evil", F, b"x")],
    "bare-file": [("evil", F, b"x")],
    "symlink": [("m.moec/kernels.so", tarfile.SYMTYPE, b"/etc/passwd")],
    "symlink-then-write": [("m.moec/link", tarfile.SYMTYPE, b".."), ("m.moec/link/x", F, b"x")],
    "hardlink": [("m.moec/model.ir", tarfile.LNKTYPE, b"/etc/passwd")],
    "char-device": [("m.moec/dev", tarfile.CHRTYPE, b"")],
    "fifo": [("m.moec/fifo", tarfile.FIFOTYPE, b"")],
    "two-tops": [("a.moec/x", F, b"x"), ("b.moec/y", F, b"y")],
    "duplicate": [("m.moec/x", F, b"x"), ("m.moec/x", F, b"y")],
    "backslash": [("m.moec/..\\evil", F, b"x")],
    "empty": [],
    "too-many": [(f"m.moec/f{i}", F, b"") for i in range(archive.MAX_MEMBERS + 1)],
}


@pytest.mark.parametrize("name", list(CRAFTED))
def test_crafted_archives_write_nothing(tmp_path: Path, name: str) -> None:
    work = tmp_path / "work" / "deep"
    work.mkdir(parents=True)
    tar = work / "evil.moec.tar"
    tar.write_bytes(_tar(CRAFTED[name]))
    dest = work / "out"
    dest.mkdir()
    with pytest.raises(ArtifactError, match="refusing|exactly one|appears twice|more than"):
        archive.unpack(tar, dest)
    assert list(dest.iterdir()) == []  # refused before anything was written
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["deep", "evil.moec.tar", "out", "work"]
    with pytest.raises(ArtifactError):
        load(tar)
    with pytest.raises(ArtifactError):
        verify(tar)
    assert not Path("/tmp/moec-evil").exists()


@pytest.mark.parametrize("kind", ["gzip", "garbage", "truncated"])
def test_unreadable_archives(demo: Demo, tmp_path: Path, kind: str) -> None:
    tar = tmp_path / "x.moec.tar"
    if kind == "gzip":
        tar.write_bytes(_tar([("m.moec/x", F, b"x")], mode="w:gz"))
    elif kind == "garbage":
        tar.write_bytes(os.urandom(4096))
    else:
        good = archive.pack(demo.path, tmp_path / "good.moec.tar").read_bytes()
        tar.write_bytes(good[: len(good) // 2])
    with pytest.raises(ArtifactError):
        verify(tar)


def test_archive_with_damaged_member_is_refused(demo: Demo, tmp_path: Path) -> None:
    good = archive.pack(demo.path, tmp_path / "good.moec.tar").read_bytes()
    at = good.index(b"moe.router(")  # inside model.ir's data
    tar = tmp_path / "bad.moec.tar"
    tar.write_bytes(good[:at] + b"M" + good[at + 1 :])
    with pytest.raises(ArtifactError, match="model.ir.*hash mismatch"):
        verify(tar)


# ---------------------------------------------------------------------- verify loads no code

_NO_CODE = """
import sys
from moec.cli import main
rc = main(["verify", sys.argv[1]])
maps = open("/proc/self/maps").read()
loaded = sorted({line.split()[-1] for line in maps.splitlines()
                 if "kernels.so" in line or "libtvm" in line or "tvm_ffi" in line})
print(rc, "tvm" in sys.modules, "torch" in sys.modules, loaded)
"""


@pytest.mark.parametrize("packed", [False, True])
def test_verify_loads_no_native_code(demo: Demo, tmp_path: Path, packed: bool) -> None:
    path = archive.pack(demo.path, tmp_path / "d.moec.tar") if packed else demo.path
    out = subprocess.run([sys.executable, "-c", _NO_CODE, str(path)], capture_output=True,
                         text=True, timeout=120, check=True)
    assert out.stdout.splitlines()[-1] == "0 False False []", out.stdout + out.stderr
    assert "ok (manifest, hashes" in out.stdout
