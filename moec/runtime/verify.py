"""`moec.runtime.verify`: every check `load` makes, without loading native code.

A damaged or foreign artifact must fail with an ArtifactError that names the file and the
problem, never with a crash inside dlopen or the kernels.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from moec.errors import ArtifactError, InputError
from moec.runtime import archive
from moec.runtime.cpu import check_elf_machine, check_host_cpu
from moec.runtime.manifest import FileEntry, Manifest

MANIFEST = "manifest.json"
KERNELS = "kernels.so"
WEIGHTS = "weights.safetensors"
IR = "model.ir"
REQUIRED_FILES = (KERNELS, WEIGHTS, IR)

SUPPORTED_TARGET_KINDS = {"llvm": "cpu", "cuda": "cuda"}
"""Target kind in the manifest -> the device kind its kernels run on."""

_CHUNK = 1 << 20
MAX_MANIFEST_BYTES = 16 << 20
"""A manifest is a few kB; a bigger file is damaged or hostile, and is not read whole."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (weights can be many GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def as_path(path: object) -> Path:
    """`path` as a Path; InputError (not a TypeError from deep inside) for other types."""
    if isinstance(path, Path):
        return path
    if isinstance(path, (str, os.PathLike)):
        return Path(path)
    raise InputError(f"an artifact path must be a str or os.PathLike, not {type(path).__name__}")


def read_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Parse `PATH/manifest.json`; ArtifactError if the folder or the manifest is missing."""
    root = as_path(path)
    if not root.exists():
        raise ArtifactError(f"no artifact at {root}: the path does not exist")
    if not root.is_dir():
        raise ArtifactError(f"{root} is not an artifact folder (expected a NAME.moec/ directory)")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{root} is not a moec artifact: {MANIFEST} is missing")
    try:
        with open(mpath, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
        if len(raw) > MAX_MANIFEST_BYTES:
            raise ArtifactError(f"{mpath}: larger than {MAX_MANIFEST_BYTES} bytes; not a manifest")
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mpath}: cannot be read ({e})") from None
    try:
        return Manifest.from_json(text)
    except ArtifactError as e:
        raise ArtifactError(f"{root}: {e}") from None


def check_file(root: Path, name: str, entry: FileEntry, check_hash: bool = True) -> None:
    """Raise ArtifactError if `root/name` is missing, of the wrong size or hash."""
    path = root / name
    if not path.is_file():
        raise ArtifactError(f"{name} is missing from {root} (the manifest lists it)")
    try:
        _check_file(path, root, name, entry, check_hash)
    except OSError as e:  # unreadable (permissions), or removed meanwhile
        raise ArtifactError(f"{name} in {root} cannot be read ({e})") from None


def _check_file(path: Path, root: Path, name: str, entry: FileEntry, check_hash: bool) -> None:
    size = path.stat().st_size
    if size < entry.size:
        raise ArtifactError(
            f"{name} in {root} is truncated: {size} bytes, the manifest says {entry.size}"
        )
    if size > entry.size:
        raise ArtifactError(
            f"{name} in {root} has the wrong size: {size} bytes, the manifest says {entry.size}"
        )
    if check_hash:
        digest = sha256_file(path)
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

    Checks: the manifest exists, parses and has a supported format_version; every file it
    lists (and at least kernels.so, weights.safetensors, model.ir) is present with the
    recorded size and sha256; every weight in `params` is in weights.safetensors. With
    `check_host` (the default) also that this host can run it: known target kind, CPU
    features present in /proc/cpuinfo, kernels.so built for this CPU architecture.

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
