"""What an artifact may hold: regular files only, in a folder (no symbolic link is followed, no
FIFO opened) and in an archive (no sparse member, nothing the manifest does not declare)."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from moec.errors import ArtifactError
from moec.runtime import archive, load, verify

from .conftest import Demo

# ------------------------------------------------------------------ GNU sparse archives

REALSIZE = 64 << 20  # what one sparse member would expand to (the was 8 GiB)


def _sparse_member(fmt: str, name: str) -> tuple[tarfile.TarInfo, bytes]:
    """A member that reads as REALSIZE bytes (holes, then one byte) from a few stored bytes,
    in one of GNU tar's sparse encodings."""
    info = tarfile.TarInfo(name)
    last = REALSIZE - 1
    if fmt == "pax-0.0":
        info.pax_headers = {"GNU.sparse.size": str(REALSIZE), "GNU.sparse.numblocks": "1",
                            "GNU.sparse.offset": str(last), "GNU.sparse.numbytes": "1"}
        data = b"x"
    elif fmt == "pax-0.1":
        info.pax_headers = {"GNU.sparse.size": str(REALSIZE), "GNU.sparse.numblocks": "1",
                            "GNU.sparse.map": f"{last},1"}
        data = b"x"
    elif fmt == "pax-1.0":
        top, _, base = name.partition("/")
        info.name = f"{top}/GNUSparseFile.0/{base}"
        info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                            "GNU.sparse.name": name, "GNU.sparse.realsize": str(REALSIZE)}
        data = f"1\n{last}\n1\n".encode().ljust(512, b"\0") + b"x"
    elif fmt == "gnu-header-only":  # sparse headers on a plain member: refused all the same
        info.pax_headers = {"GNU.sparse.major": "1"}
        data = b"x"
    else:
        raise AssertionError(fmt)
    info.size = len(data)
    return info, data


@pytest.mark.parametrize("fmt", ["pax-0.0", "pax-0.1", "pax-1.0", "gnu-header-only"])
def test_sparse_member_is_refused_before_anything_is_written(tmp_path: Path, fmt: str) -> None:
    tar = tmp_path / "bomb.moec.tar"
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as t:
        info, data = _sparse_member(fmt, "m.moec/kernels.so")
        t.addfile(info, io.BytesIO(data))
    assert tar.stat().st_size < 20_000
    if fmt != "gnu-header-only":
        with tarfile.open(tar) as t:  # what the attack relies on: a "regular" sparse member
            m = t.getmembers()[0]
            assert m.isreg() and m.issparse() and m.size == REALSIZE
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(ArtifactError, match=r"refusing member 'm\.moec/.*': it is a sparse file"):
        archive.unpack(tar, dest)
    assert list(dest.iterdir()) == []
    with pytest.raises(ArtifactError, match="sparse file"):
        load(tar)
    with pytest.raises(ArtifactError, match="sparse file"):
        verify(tar)


@pytest.mark.parametrize("headers", [
    {"GNU.sparse.size": "3x"},  # tarfile: int("3x") -> ValueError (found by atheris)
    {"GNU.sparse.size": "3", "GNU.sparse.map": "0,x"},
    {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.realsize": "?"},
])
def test_malformed_sparse_headers_are_artifact_errors(tmp_path: Path, headers: dict) -> None:
    tar = tmp_path / "bad.moec.tar"
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as t:
        info = tarfile.TarInfo("m.moec/model.ir")
        info.pax_headers, info.size = headers, 1
        t.addfile(info, io.BytesIO(b"x"))
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(ArtifactError, match="damaged archive|sparse file"):
        archive.unpack(tar, dest)
    assert list(dest.iterdir()) == []


def _members_of(demo: Demo) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in demo.path.iterdir()}


def _tar_of(path: Path, files: dict[str, bytes], top: str = "m.moec") -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as t:
        info = tarfile.TarInfo(top)
        info.type = tarfile.DIRTYPE
        t.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("case", ["undeclared", "bigger", "no-manifest"])
def test_members_the_manifest_does_not_declare_are_refused(demo: Demo, tmp_path: Path,
                                                           case: str) -> None:
    """Extraction writes at most what the manifest declares: every member must be listed in
    it, with the recorded size."""
    files = _members_of(demo)
    if case == "undeclared":
        files["extra.bin"] = b"\0" * 4096
        pattern = r"'m\.moec/extra\.bin': manifest\.json does not list it"
    elif case == "bigger":
        files["model.ir"] += b"\n"
        pattern = r"'m\.moec/model\.ir': \d+ bytes, but manifest\.json records \d+"
    else:
        del files["manifest.json"]
        pattern = "holds no manifest.json"
    tar = _tar_of(tmp_path / "x.moec.tar", files)
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(ArtifactError, match=pattern):
        archive.unpack(tar, dest)
    assert list(dest.iterdir()) == []


def test_pack_takes_only_the_artifacts_files(demo: Demo, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(demo.path, tmp_path / "d.moec"))
    (folder / "notes.txt").write_text("not part of the artifact")
    tar = archive.pack(folder, tmp_path / "d.moec.tar")
    with tarfile.open(tar) as t:
        assert "d.moec/notes.txt" not in t.getnames()
    verify(tar)


# ------------------------------------------------------------------ links and special files

NAMES = ["kernels.so", "weights.safetensors", "model.ir", "manifest.json", "manifest.sha256"]


@pytest.mark.parametrize("name", NAMES)
def test_symlink_to_an_identical_file_outside_is_refused(artifact_copy: Path, tmp_path: Path,
                                                         name: str) -> None:
    """Even a link to the very same bytes (hashes match) is refused: never read outside."""
    outside = tmp_path / "elsewhere" / name
    outside.parent.mkdir()
    shutil.move(artifact_copy / name, outside)
    (artifact_copy / name).symlink_to(outside)
    pattern = rf"{name} in .* is a symbolic link \(to '{outside}'\); an artifact folder holds"
    with pytest.raises(ArtifactError, match=pattern):
        verify(artifact_copy)
    with pytest.raises(ArtifactError, match=pattern):
        load(artifact_copy)


@pytest.mark.parametrize("name", ["kernels.so", "model.ir", "manifest.json"])
def test_fifo_is_refused_and_never_opened(artifact_copy: Path, tmp_path: Path,
                                          name: str) -> None:
    """A FIFO (or a link to one) used to be reported as missing, or could block the reader."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (artifact_copy / name).unlink()
    os.mkfifo(artifact_copy / name)
    with pytest.raises(ArtifactError, match=rf"{name} in .* is a FIFO, not a regular file"):
        verify(artifact_copy)
    (artifact_copy / name).unlink()
    (artifact_copy / name).symlink_to(fifo)
    with pytest.raises(ArtifactError, match=rf"{name} in .* is a symbolic link"):
        load(artifact_copy)


def test_a_link_to_the_artifact_folder_itself_loads(demo: Demo, tmp_path: Path) -> None:
    """The folder may be reached through a link; what is inside it may not be a link."""
    link = tmp_path / "link.moec"
    link.symlink_to(demo.path)
    assert verify(link).files == verify(demo.path).files
    load(link)
