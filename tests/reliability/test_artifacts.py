"""Damaged, edited and foreign artifacts are refused with ArtifactError (by `verify` and `load`,
or at the latest by the first call); archives extract safely; `verify` loads no native code."""

from __future__ import annotations

import io
import json
import os
import re
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
from moec.runtime.artifact import write_manifest
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
            "extended-1": "wrong size", "missing": "missing",
            "directory": "is a folder, not a regular file"}


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
    """Edit the manifest and update its digest (so that the checks behind the digest run)."""
    data = json.loads((root / "manifest.json").read_text())
    edit(data)
    write_manifest(root, json.dumps(data).encode())


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
    "dtype-object": (_set("signature", "inputs", 0, "dtype", value="O"), r"as O\[T, 64\]"),
    # The manifest says more or fewer arguments than the IR declares and the weights file holds.
    "extra-input": (
        lambda m: m["signature"]["inputs"].append({"name": "y", "shape": ["T"],
                                                  "dtype": "float32"}),
        "model.ir .* declares no input %y"),
    "dropped-param": (lambda m: m["params"].pop(), "the manifest's params do not list"),
}


@pytest.mark.parametrize("name", list(MANIFEST_EDITS))
def test_edited_manifest_is_refused(artifact_copy: Path, name: str) -> None:
    edit, pattern = MANIFEST_EDITS[name]
    _edit(artifact_copy, edit)
    with pytest.raises(ArtifactError, match=pattern):
        load(artifact_copy)


def _write_ir(root: Path, edit: Any) -> None:
    path = root / "model.ir"
    path.write_text(edit(path.read_text()))
    _rehash(root, "model.ir")


# Edits of the manifest made consistent with model.ir (its input line edited and re-hashed),
# so that only the kernels contradict them: refused at load by the kernels' own parameter
# types (they used to load, and fail at the first call).
CALL_EDITS = {
    "hidden-65": (_set("signature", "inputs", 0, "shape", value=["T", 65]), "f32[T, 65]",
                  r"main takes 'x' as float32\[T_\d+, 64\], but the signature has "
                  r"float32\[T, 65\]"),
    "dtype-float64": (_set("signature", "inputs", 0, "dtype", value="float64"), "f64[T, 64]",
                      r"main takes 'x' as float32.*float64\[T, 64\]"),
    "rank-3": (_set("signature", "inputs", 0, "shape", value=["T", 4, 16]), "f32[T, 4, 16]",
               r"float32\[T, 4, 16\]"),
}


@pytest.mark.parametrize("name", list(CALL_EDITS))
def test_manifest_contradicting_the_kernels_is_refused_at_load(artifact_copy: Path,
                                                               name: str) -> None:
    edit, ir_type, pattern = CALL_EDITS[name]
    _edit(artifact_copy, edit)
    _write_ir(artifact_copy, lambda t: t.replace("input %x: f32[T, 64]", f"input %x: {ir_type}"))
    verify(artifact_copy)  # every part but the kernels agrees
    with pytest.raises(ArtifactError, match=pattern):
        load(artifact_copy)


SAME_SHAPE = ("mlp.experts.w_gate@", "mlp.experts.w_up@")  # both f32[8, 12, 64, 8]


def _same_shape_pair(params: list[str]) -> tuple[int, int]:
    i, j = (next(k for k, p in enumerate(params) if p.startswith(s)) for s in SAME_SHAPE)
    return i, j


def test_same_shape_params_swapped_in_the_manifest(artifact_copy: Path) -> None:
    """The issue's reproducer: two same-shape weights swapped in `params` ran silently wrong."""
    def swap(m: dict) -> None:
        i, j = _same_shape_pair(m["params"])
        m["params"][i], m["params"][j] = m["params"][j], m["params"][i]

    _edit(artifact_copy, swap)
    _refused(artifact_copy, r"weights\.safetensors .* spans bytes")


def test_same_shape_params_swapped_with_the_weights_rewritten(artifact_copy: Path) -> None:
    """Swapped in `params` and the weights file rewritten in that order (hashes updated): every
    file agrees with the manifest, only the kernels' parameter names do not."""
    import safetensors.numpy

    from moec.runtime.weights import save_aligned

    m = json.loads((artifact_copy / "manifest.json").read_text())
    i, j = _same_shape_pair(m["params"])
    m["params"][i], m["params"][j] = m["params"][j], m["params"][i]
    w = safetensors.numpy.load_file(str(artifact_copy / "weights.safetensors"))
    save_aligned({p: w[p] for p in m["params"]}, artifact_copy / "weights.safetensors")
    _edit(artifact_copy, lambda d: d.update(params=m["params"]))
    _rehash(artifact_copy, "weights.safetensors")
    verify(artifact_copy)
    with pytest.raises(ArtifactError, match=r"main's parameter \d+ is 'mlp\.experts\.w_"):
        load(artifact_copy)


def test_swapped_data_offsets_in_the_weights_header(artifact_copy: Path) -> None:
    """`data_offsets` of two same-shape tensors swapped in the safetensors header (file hash
    updated): the names, shapes and dtypes all still match, the layout does not."""
    path = artifact_copy / "weights.safetensors"
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    a, b = (next(k for k in header if k.startswith(s)) for s in SAME_SHAPE)
    header[a]["data_offsets"], header[b]["data_offsets"] = (header[b]["data_offsets"],
                                                            header[a]["data_offsets"])
    text = json.dumps(header, separators=(",", ":")).encode()
    path.write_bytes(data[:8] + text.ljust(n) + data[8 + n:])
    _rehash(artifact_copy, "weights.safetensors")
    _refused(artifact_copy, rf"weight {re.escape(repr(a))} .* spans bytes")


def test_ir_of_another_model_is_refused(artifact_copy: Path) -> None:
    _write_ir(artifact_copy, lambda t: t.replace("param @mixer.weight:", "param @other.weight:"))
    _refused(artifact_copy, r"model\.ir .* declares no parameter @mixer\.weight")
    _write_ir(artifact_copy, lambda t: t.replace("param @other.weight: f32[64, 64]",
                                                 "param @mixer.weight: f32[64, 64]")
              .replace("param @input_norm.weight: f32[64]", "param @input_norm.weight: f32[65]"))
    _refused(artifact_copy, r"declares @input_norm\.weight as float32\[65\], but it is stored "
                            r"as float32\[64\]")


def test_edited_manifest_without_its_digest_is_refused(artifact_copy: Path) -> None:
    """A hand edit that every other check lets through (the bounds of T) is caught by the
    manifest's digest."""
    path = artifact_copy / "manifest.json"
    data = json.loads(path.read_text())
    data["signature"]["dims"]["T"]["max"] = 4096
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    _refused(artifact_copy, r"manifest\.json in .*: its sha256 .* is not the one manifest\.sha256")
    (artifact_copy / "manifest.sha256").unlink()
    _refused(artifact_copy, r"manifest\.sha256 is missing")
    (artifact_copy / "manifest.sha256").write_text("not a digest\n")
    _refused(artifact_copy, r"manifest\.sha256 .* is not a `<sha256>  manifest\.json` line")


def test_manifest_limits(artifact_copy: Path) -> None:
    write_manifest(artifact_copy, b"[" * 100_000 + b"]" * 100_000)
    _refused(artifact_copy, "nested too deeply")
    write_manifest(artifact_copy, b'{"format_version": NaN}')
    _refused(artifact_copy, "NaN is not a JSON value")
    write_manifest(artifact_copy, b'{"format_version": 1' + b"0" * 5000 + b"}")
    _refused(artifact_copy, "not valid JSON")
    write_manifest(artifact_copy, b" " * (MAX_MANIFEST_BYTES + 1))
    _refused(artifact_copy, "larger than")
    write_manifest(artifact_copy, b"\xff\xfe{}")
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
                                          sorted(["manifest.json", "manifest.sha256", *FILES]))]


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
