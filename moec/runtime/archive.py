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
devices, FIFOs, nested folders and sparse files (GNU sparse members in any of tar's three
encodings, which `tarfile` reports as regular files: any `GNU.sparse.*` header is refused) are
refused. The archive's `manifest.json` is then read (at most MAX_MANIFEST_BYTES) and parsed,
and every other member must be a file the manifest lists (or the manifest's digest file), with
exactly the size it records. Only then does it copy each file's bytes into a new file it
creates (O_EXCL) inside a fresh destination folder, never more than the recorded size.
Compressed archives are refused. So extraction writes at most what the manifest declares,
which is also at most the archive's own size: no decompression or sparse-file bombs.

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
from typing import BinaryIO

from moec.errors import ArtifactError

MAX_MEMBERS = 64
"""An artifact has four files; anything far beyond that is not one."""

_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
# The top folder may be named like any folder (spaces included), but never `.`, `..`, or
# anything with a path separator or a NUL in it.
_TOP_NAME = re.compile(r"^(?!\.\.?$)[^/\\\x00]+$")
_CHUNK = 1 << 20
# What Python's tarfile raises, besides TarError, on malformed PAX records: int() of a
# GNU.sparse.size / .map / .realsize value that is not a number (found by fuzzing).
_HEADER_ERRORS = (ValueError, OverflowError, EOFError)


def is_archive(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a file (not a folder): the form single-file artifacts take.
    ArtifactError when the path cannot even be looked at (a name too long, a loop of links)."""
    try:
        return Path(path).is_file()
    except OSError as e:
        raise ArtifactError(f"cannot access the artifact path {_short(path)}: {e.strerror}") \
            from None


def _short(path: str | os.PathLike[str]) -> str:
    text = str(path)
    return repr(text if len(text) <= 120 else text[:60] + "..." + text[-40:])


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
            for path in sorted(src / name for name in _artifact_files(src)):
                if path.is_symlink() or not path.is_file():
                    raise ArtifactError(f"cannot pack {path}: not a regular file")
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


def _artifact_files(src: Path) -> list[str]:
    """The files of the artifact folder `src` that an archive holds: the manifest, the files it
    lists, and the manifest's digest file where there is one (other files are left out)."""
    from moec.runtime.verify import MANIFEST, MANIFEST_DIGEST, read_manifest  # noqa: PLC0415

    names = [MANIFEST, *read_manifest(src).files]
    if (src / MANIFEST_DIGEST).exists() or (src / MANIFEST_DIGEST).is_symlink():
        names.append(MANIFEST_DIGEST)
    return names


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
    except (tarfile.TarError, *_HEADER_ERRORS) as e:
        raise ArtifactError(f"{where}: damaged archive ({type(e).__name__}: {e})") from None
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
        # Plain regular files only. GNU sparse members (PAX 0.0/0.1/1.0) are REGTYPE members
        # with a sparse map, and could expand to any size from a few bytes of archive.
        sparse = sorted(k for k in m.pax_headers if k.startswith("GNU.sparse"))
        if m.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or m.issparse() or sparse:
            kind = "sparse file" if (m.issparse() or sparse) else _kind(m)
            extra = f" (headers {', '.join(sparse)})" if sparse else ""
            raise ArtifactError(f"{where}: refusing member {name!r}: it is a {kind}{extra}, "
                                f"and only regular files may be extracted")
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
    except _HEADER_ERRORS as e:  # the first member's header is malformed
        raise ArtifactError(f"{src}: damaged archive ({type(e).__name__}: {e})") from None
    with tar:
        top, files = _members(tar, src)
        _check_declared(tar, files, src)
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
                    _copy_exactly(data, out, m.size)
            except (tarfile.TarError, OSError) as e:
                raise ArtifactError(f"{src}: cannot extract {m.name!r} ({e})") from None
    return root


def _check_declared(tar: tarfile.TarFile, files: list[tarfile.TarInfo], where: Path) -> None:
    """Refuse members that the archive's manifest does not declare, or of another size."""
    from moec.runtime.manifest import Manifest  # noqa: PLC0415
    from moec.runtime.verify import (  # noqa: PLC0415
        MANIFEST,
        MANIFEST_DIGEST,
        MAX_DIGEST_BYTES,
        MAX_MANIFEST_BYTES,
    )

    by_name = {m.name.split("/")[1]: m for m in files}
    entry = by_name.get(MANIFEST)
    if entry is None:
        raise ArtifactError(f"{where}: refusing the archive: it holds no {MANIFEST}, so it is "
                            f"not a moec artifact")
    if entry.size > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{where}: refusing the archive: its {MANIFEST} is larger than "
                            f"{MAX_MANIFEST_BYTES} bytes")
    try:
        data = tar.extractfile(entry)
        assert data is not None
        with data:
            text = data.read(MAX_MANIFEST_BYTES + 1).decode("utf-8")
        manifest = Manifest.from_json(text)
    except (tarfile.TarError, OSError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{where}: {MANIFEST} cannot be read ({e})") from None
    except ArtifactError as e:
        raise ArtifactError(f"{where}: {e}") from None
    for name, m in by_name.items():
        if name == MANIFEST:
            continue
        if name == MANIFEST_DIGEST:
            if m.size > MAX_DIGEST_BYTES:
                raise ArtifactError(f"{where}: refusing member {m.name!r}: larger than "
                                    f"{MAX_DIGEST_BYTES} bytes")
            continue
        if name not in manifest.files:
            raise ArtifactError(f"{where}: refusing member {m.name!r}: {MANIFEST} does not "
                                f"list it")
        if m.size != manifest.files[name].size:
            raise ArtifactError(f"{where}: refusing member {m.name!r}: {m.size} bytes, but "
                                f"{MANIFEST} records {manifest.files[name].size}")


def _copy_exactly(src: BinaryIO, dst: BinaryIO, size: int) -> None:
    left = size
    while left > 0:
        chunk = src.read(min(_CHUNK, left))
        if not chunk:
            raise tarfile.ReadError(f"the archive ends inside the member, {left} of {size} "
                                    f"bytes missing")
        dst.write(chunk)
        left -= len(chunk)


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
