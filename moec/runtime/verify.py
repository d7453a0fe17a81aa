"""`moec.runtime.verify`: every check `load` makes, without loading native code.

A damaged or foreign artifact must fail with an ArtifactError that names the file and the
problem, never with a crash inside dlopen or the kernels.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from pathlib import Path

from moec.errors import ArtifactError, InputError
from moec.runtime import archive
from moec.runtime.consistency import StoredTensor, check_ir_file, stored_weights
from moec.runtime.cpu import check_elf_machine, check_host_cpu
from moec.runtime.manifest import FileEntry, Manifest

MANIFEST = "manifest.json"
MANIFEST_DIGEST = "manifest.sha256"
"""`<sha256 of manifest.json>  manifest.json`: the manifest's own digest, in `sha256sum` format
(`cd NAME.moec && sha256sum -c manifest.sha256` checks it too)."""
KERNELS = "kernels.so"
WEIGHTS = "weights.safetensors"
IR = "model.ir"
REQUIRED_FILES = (KERNELS, WEIGHTS, IR)

SUPPORTED_TARGET_KINDS = {"llvm": "cpu", "cuda": "cuda"}
"""Target kind in the manifest -> the device kind its kernels run on."""

_CHUNK = 1 << 20
MAX_MANIFEST_BYTES = 16 << 20
"""A manifest is a few kB; a bigger file is damaged or hostile, and is not read whole."""
MAX_DIGEST_BYTES = 4096
_DIGEST_LINE = re.compile(r"^([0-9a-f]{64})  manifest\.json\n?$")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (weights can be many GB)."""
    with open(path, "rb") as f:
        return _sha256_fd(f.fileno())


def _sha256_fd(fd: int) -> str:
    h = hashlib.sha256()
    while chunk := os.read(fd, _CHUNK):
        h.update(chunk)
    return h.hexdigest()


def manifest_digest_text(manifest_bytes: bytes) -> str:
    """The content of `manifest.sha256` for a manifest.json holding `manifest_bytes`."""
    return f"{hashlib.sha256(manifest_bytes).hexdigest()}  {MANIFEST}\n"


_KINDS = ((stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
          (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"))


def _not_regular(root: Path, name: str, mode: int, path: Path) -> ArtifactError:
    if stat.S_ISLNK(mode):
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        return ArtifactError(
            f"{name} in {root} is a symbolic link (to {target!r}); an artifact folder holds only "
            f"regular files, and links are not followed: copy the file into the folder")
    kind = next((k for test, k in _KINDS if test(mode)), "special file")
    return ArtifactError(f"{name} in {root} is a {kind}, not a regular file; an artifact "
                         f"folder holds only regular files")


def open_regular(root: Path, name: str) -> int:
    """A read-only descriptor of the regular file `root/name`. ArtifactError when it is
    missing, a symbolic link (never followed, wherever it points), a folder, a FIFO (never
    opened, so never waited on) or another special file, or unreadable."""
    path = root / name
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        raise ArtifactError(f"{name} is missing from {root} (the manifest lists it)") from None
    except OSError as e:
        raise ArtifactError(f"{name} in {root} cannot be read ({e})") from None
    if not stat.S_ISREG(mode):
        raise _not_regular(root, name, mode, path)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:  # removed or replaced meanwhile, or no permission
        raise ArtifactError(f"{name} in {root} cannot be read ({e})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):  # replaced between lstat and open
        os.close(fd)
        raise _not_regular(root, name, mode, path)
    return fd


def _read_limited(root: Path, name: str, limit: int) -> bytes:
    fd = open_regular(root, name)
    try:
        if os.fstat(fd).st_size > limit:
            raise ArtifactError(f"{name} in {root}: larger than {limit} bytes; not a {name}")
        return os.read(fd, limit + 1)
    except OSError as e:
        raise ArtifactError(f"{name} in {root} cannot be read ({e})") from None
    finally:
        os.close(fd)


def as_path(path: object) -> Path:
    """`path` as a Path; InputError (not a TypeError from deep inside) for other types."""
    if isinstance(path, Path):
        return path
    if isinstance(path, (str, os.PathLike)):
        return Path(path)
    raise InputError(f"an artifact path must be a str or os.PathLike, not {type(path).__name__}")


def read_manifest(path: str | os.PathLike[str], *, check_digest: bool = True) -> Manifest:
    """Parse `PATH/manifest.json`; ArtifactError if the folder or the manifest is missing, or
    (with `check_digest`) if its sha256 differs from the one `manifest.sha256` records."""
    root = as_path(path)
    if not root.exists():
        raise ArtifactError(f"no artifact at {root}: the path does not exist")
    if not root.is_dir():
        raise ArtifactError(f"{root} is not an artifact folder (expected a NAME.moec/ directory)")
    if not os.path.lexists(root / MANIFEST):
        raise ArtifactError(f"{root} is not a moec artifact: {MANIFEST} is missing")
    raw = _read_limited(root, MANIFEST, MAX_MANIFEST_BYTES)
    if check_digest:
        check_manifest_digest(root, raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ArtifactError(f"{root / MANIFEST}: cannot be read ({e})") from None
    try:
        return Manifest.from_json(text)
    except ArtifactError as e:
        raise ArtifactError(f"{root}: {e}") from None


def check_manifest_digest(root: Path, manifest_bytes: bytes) -> None:
    """Raise ArtifactError unless `root/manifest.sha256` records the sha256 of
    `manifest_bytes` (the manifest's content): catches a damaged or hand-edited manifest."""
    if not os.path.lexists(root / MANIFEST_DIGEST):
        raise ArtifactError(
            f"{MANIFEST_DIGEST} is missing from {root}: the manifest's digest is part of every "
            f"artifact this moec writes (artifacts saved before it lack one): recompile or "
            f"re-save the model")
    line = _read_limited(root, MANIFEST_DIGEST, MAX_DIGEST_BYTES)
    m = _DIGEST_LINE.match(line.decode("ascii", "replace"))
    if m is None:
        raise ArtifactError(f"{MANIFEST_DIGEST} in {root} is not a `<sha256>  {MANIFEST}` "
                            f"line; the file is damaged")
    actual = hashlib.sha256(manifest_bytes).hexdigest()
    if m.group(1) != actual:
        raise ArtifactError(
            f"{MANIFEST} in {root}: its sha256 ({actual[:16]}...) is not the one "
            f"{MANIFEST_DIGEST} records ({m.group(1)[:16]}...): the manifest was damaged or "
            f"edited; recompile the model (or restore the artifact)")


def check_file(root: Path, name: str, entry: FileEntry, check_hash: bool = True) -> None:
    """Raise ArtifactError if `root/name` is missing, not a regular file (a symbolic link
    included), or of the wrong size or hash."""
    fd = open_regular(root, name)
    try:
        _check_file(fd, root, name, entry, check_hash)
    except OSError as e:  # unreadable
        raise ArtifactError(f"{name} in {root} cannot be read ({e})") from None
    finally:
        os.close(fd)


def _check_file(fd: int, root: Path, name: str, entry: FileEntry, check_hash: bool) -> None:
    size = os.fstat(fd).st_size
    if size < entry.size:
        raise ArtifactError(
            f"{name} in {root} is truncated: {size} bytes, the manifest says {entry.size}"
        )
    if size > entry.size:
        raise ArtifactError(
            f"{name} in {root} has the wrong size: {size} bytes, the manifest says {entry.size}"
        )
    if check_hash:
        digest = _sha256_fd(fd)
        if digest != entry.sha256:
            raise ArtifactError(
                f"{name} in {root}: hash mismatch (sha256 {digest[:16]}..., the manifest says "
                f"{entry.sha256[:16]}...); the file is damaged or was modified"
            )


def check_target(manifest: Manifest, device_kind: str | None = None) -> None:
    """Raise ArtifactError if the target kind is unknown, does not match `device_kind`, or
    needs CPU features this host lacks."""
    kind = manifest.target["kind"]
    if kind not in SUPPORTED_TARGET_KINDS:
        raise ArtifactError(
            f"the artifact targets {kind!r}, which this runtime cannot run "
            f"(supported: {', '.join(SUPPORTED_TARGET_KINDS)})"
        )
    runs_on = SUPPORTED_TARGET_KINDS[kind]
    if device_kind is not None and device_kind != runs_on:
        raise ArtifactError(
            f"the artifact was compiled for {kind} and runs on device {runs_on!r}, not "
            f"{device_kind!r}; load it with device={runs_on!r} or recompile for {device_kind}"
        )
    # Host code of every target is native CPU code, so the features matter for cuda too.
    check_host_cpu(manifest.target)


def verify(
    path: str | os.PathLike[str], *, check_host: bool = True, check_hashes: bool = True
) -> Manifest:
    """Check an artifact without loading its native code, and return its manifest.

    Checks: the manifest exists, matches its digest (manifest.sha256), parses and has a
    supported format_version; every file it lists (and at least kernels.so,
    weights.safetensors, model.ir) is a regular file (no symbolic link, never followed) with
    the recorded size and sha256; weights.safetensors holds exactly `params`, in the canonical
    layout; model.ir declares the signature's inputs and every stored weight
    (moec.runtime.consistency). With `check_host` (the default) also that this host can run
    it: known target kind, CPU features present in /proc/cpuinfo, kernels.so built for this
    CPU architecture. (`load` adds the kernels' own parameter types, once they are loaded.)

    `path` is an artifact folder or a single-file `NAME.moec.tar` archive (`moec.runtime.archive`:
    extracted safely into a temporary folder, checked there, and deleted).

    Raises ArtifactError naming the file and the problem ("missing", "truncated",
    "hash mismatch", ...)."""
    root = as_path(path)
    if archive.is_archive(root):
        with archive.opened(root) as folder:
            return verify(folder, check_host=check_host, check_hashes=check_hashes)
    manifest = read_manifest(root)
    for name in REQUIRED_FILES:
        if name not in manifest.files:
            raise ArtifactError(f"{root}: the manifest does not list {name}")
    for name, entry in manifest.files.items():
        check_file(root, name, entry, check_hash=check_hashes)
    check_weight_names(root / WEIGHTS, manifest.params)
    stored = stored_weight_types(root, manifest)
    check_ir_file(root / IR, manifest.signature, stored)
    if check_host:
        check_target(manifest)
        check_elf_machine(root / KERNELS)
    return manifest


def check_weight_names(path: Path, params: tuple[str, ...]) -> None:
    """Raise ArtifactError if weights.safetensors is unreadable or lacks a listed weight."""
    from safetensors import safe_open  # noqa: PLC0415  (keeps `import moec.runtime` light)

    try:
        with safe_open(str(path), framework="numpy") as f:
            stored = set(f.keys())
    except Exception as e:  # safetensors raises its own SafetensorError and OSError
        raise ArtifactError(f"{path.name} cannot be read as safetensors: {e}") from None
    missing = [p for p in params if p not in stored]
    if missing:
        raise ArtifactError(
            f"{path.name} lacks weight(s) the manifest's params list: {', '.join(missing[:5])}"
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        )


def stored_weight_types(root: Path, manifest: Manifest) -> dict[str, StoredTensor]:
    """The dtype and shape of every weight in `root/weights.safetensors`, after checking that
    the file has the canonical layout of `manifest.params` (moec.runtime.consistency)."""
    from moec.runtime.weights import read_header  # noqa: PLC0415  (imports numpy)

    header, data_size = read_header(root / WEIGHTS)
    return stored_weights(header, data_size, manifest.params, f"{WEIGHTS} in {root}")
