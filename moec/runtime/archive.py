"""Single-file artifacts: `NAME.moec.tar`, a plain tar of the artifact folder.

    moec.runtime.archive.pack("m.moec", "m.moec.tar")      # or Artifact.save("m.moec.tar")
    model = moec.load("m.moec.tar")                         # verify, inspect, run accept it too

The archive holds one folder, `NAME.moec/`, with the artifact's files (flat: an artifact has no
subfolders). `pack` is deterministic (sorted members, mtime 0, owner 0, mode 0644), so packing
the same folder twice gives the same bytes.

Extraction is the risky half, so `unpack` never calls `tarfile.extract`/`extractall`. It first
reads every member header and refuses the whole archive (ArtifactError, nothing written) unless
each member is either the top folder itself or a regular file `TOP/NAME` with a plain file name
(letters, digits, `_`, `.`, `-`; no `/`, no `..`, not absolute), with no duplicates. Links,
devices, FIFOs and nested folders are refused. Only then does it copy each file's bytes into a
new file it creates (O_EXCL) inside a fresh destination folder. Compressed archives are refused:
an uncompressed member cannot be larger than the archive, so extraction writes at most the
archive's size to disk (no decompression bombs).

Unpacked archives are checked like folders afterwards (`verify`): hashes, format, target.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

from moec.errors import ArtifactError

MAX_MEMBERS = 64
"""An artifact has four files; anything far beyond that is not one."""

_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
# The top folder may be named like any folder (spaces included), but never `.`, `..`, or
# anything with a path separator or a NUL in it.
_TOP_NAME = re.compile(r"^(?!\.\.?$)[^/\\\x00]+$")
_CHUNK = 1 << 20


def is_archive(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a file (not a folder): the form single-file artifacts take."""
    return Path(path).is_file()


def pack(folder: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
    """Write the artifact folder `folder` as an uncompressed tar at `dest`, atomically.

    Only regular files directly inside `folder` are packed (an artifact has no subfolders);
    the folder is not verified here (`moec pack` verifies first). Returns the absolute path."""
    src = Path(folder)
    out = Path(dest).absolute()
    if not src.is_dir():
        raise ArtifactError(f"cannot pack {src}: it is not an artifact folder")
    top = src.absolute().name
    if not _TOP_NAME.match(top):
        raise ArtifactError(f"cannot pack {src}: its name {top!r} cannot name a folder")
    if out.is_dir() or (out.exists() and not out.is_file()):
        raise ArtifactError(f"refusing to write an archive to {out}: it exists and is no file")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{secrets.token_hex(6)}"
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            tar.addfile(_info(top + "/", tarfile.DIRTYPE, 0, 0o755))
            for path in sorted(src.iterdir()):
                if path.is_symlink() or not path.is_file():
                    raise ArtifactError(f"cannot pack {path}: not a regular file")
                if not _FILE_NAME.match(path.name):
                    raise ArtifactError(f"cannot pack {path}: not a plain file name")
                with open(path, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    tar.addfile(_info(f"{top}/{path.name}", tarfile.REGTYPE, size, 0o644), f)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def _info(name: str, kind: bytes, size: int, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mode = kind, size, mode
    info.mtime = 0  # deterministic bytes: no timestamps, owners or user names
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _members(tar: tarfile.TarFile, where: Path) -> tuple[str, list[tarfile.TarInfo]]:
    """The top folder's name and the file members, after checking every header."""
    try:
        members = []
        for m in tar:
            members.append(m)
            if len(members) > MAX_MEMBERS:
                raise ArtifactError(f"{where}: more than {MAX_MEMBERS} members; not an artifact")
    except tarfile.TarError as e:
        raise ArtifactError(f"{where}: damaged archive ({e})") from None
    tops: set[str] = set()
    files: list[tarfile.TarInfo] = []
    seen: set[str] = set()
    for m in members:
        name = m.name
        if m.isdir():
            top = name.rstrip("/")
            if not _TOP_NAME.match(top):
                raise ArtifactError(f"{where}: refusing folder member {name!r} (only one "
                                    f"top-level NAME.moec/ folder is allowed)")
            tops.add(top)
            continue
        parts = name.split("/")
        if len(parts) != 2 or not _TOP_NAME.match(parts[0]) or not _FILE_NAME.match(parts[1]):
            raise ArtifactError(f"{where}: refusing member {name!r}: only NAME.moec/FILE "
                                f"with a plain file name may be extracted (no '..', no '/', "
                                f"no absolute paths)")
        # Plain regular files only: GNU sparse members could expand far beyond the archive.
        if m.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
            raise ArtifactError(f"{where}: refusing member {name!r}: it is a "
                                f"{_kind(m)}, and only regular files may be extracted")
        if name in seen:
            raise ArtifactError(f"{where}: member {name!r} appears twice")
        seen.add(name)
        tops.add(parts[0])
        files.append(m)
    if len(tops) != 1:
        raise ArtifactError(f"{where}: an artifact archive holds exactly one NAME.moec/ folder, "
                            f"found {sorted(tops) or 'none'}")
    return tops.pop(), files


def _kind(m: tarfile.TarInfo) -> str:
    if m.issym():
        return f"symbolic link to {m.linkname!r}"
    if m.islnk():
        return f"hard link to {m.linkname!r}"
    if m.isfifo():
        return "FIFO"
    if m.isdev():
        return "device node"
    if m.issparse():
        return "sparse file"
    return f"member of tar type {m.type!r}"


def unpack(archive: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
    """Extract an artifact archive into the new folder `dest/TOP` and return that folder.

    `dest` must exist; `dest/TOP` must not. Refuses (ArtifactError, before writing anything)
    any archive that is compressed or damaged, or has a member other than the top folder and
    regular files directly inside it (see the module docstring)."""
    src = Path(archive)
    try:
        tar = tarfile.open(src, "r:")  # "r:" refuses compressed archives
    except (tarfile.TarError, OSError) as e:
        raise ArtifactError(f"{src} is not an artifact folder nor an uncompressed "
                            f"NAME.moec.tar archive ({e})") from None
    with tar:
        top, files = _members(tar, src)
        root = Path(dest) / top
        try:
            root.mkdir()
        except OSError as e:
            raise ArtifactError(f"cannot extract {src} into {root}: {e}") from None
        for m in files:
            target = root / m.name.split("/")[1]
            try:
                data = tar.extractfile(m)
                assert data is not None  # a regular file always has data
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                with os.fdopen(fd, "wb") as out, data:
                    shutil.copyfileobj(data, out, _CHUNK)
            except (tarfile.TarError, OSError) as e:
                raise ArtifactError(f"{src}: cannot extract {m.name!r} ({e})") from None
    return root


@contextlib.contextmanager
def opened(path: str | os.PathLike[str]) -> Iterator[Path]:
    """The artifact folder at `path`: the folder itself, or an archive extracted into a
    temporary folder that is deleted on exit."""
    p = Path(path)
    if not is_archive(p):
        yield p
        return
    tmp = tempfile.mkdtemp(prefix="moec-unpack-")
    try:
        yield unpack(p, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
