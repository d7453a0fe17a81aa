"""Loading an artifact's `kernels.so`: the code that was verified, and unloadable again.

Two things go wrong when `dlopen` is handed the artifact's own path:

- **Stale code.** The dynamic loader keeps one handle per path: once `P/kernels.so` is loaded,
  loading `P/kernels.so` again (after another model was saved to `P`) returns the library
  already mapped, so the new weights would run with the old code, although the new file's hash
  checked out. A notebook or a hot-reloading server that compiles, saves and reloads to one
  path would get silently wrong results.
- **Code that never goes away.** tvm_ffi's `load_module` pins every module it loads for the
  life of the process (`keep_module_alive=True` by default), so each load of a model kept its
  library mapped for good: a process that loads and unloads models grew with every cycle, and
  `.tar` loads kept their deleted kernels mapped.

So `open_kernels` copies `kernels.so` into a new private file of its own (a fresh temporary
folder each time, so the path has never been loaded before), hashing the bytes it copies and
comparing them with the manifest's hash (so the code loaded is the code verified, even if the
artifact's file changes between `verify` and the load), `dlopen`s that copy, and deletes the
copy at once: the mapping keeps the code. The module is not pinned, so the library is unloaded
once the model (its VM and functions) is garbage collected.

The temporary folder is `tempfile.gettempdir()` (`$TMPDIR`): it must allow executable mappings
(not mounted `noexec`), as for any library TVM loads.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from moec.errors import ArtifactError
from moec.runtime.cpu import check_elf_machine
from moec.runtime.manifest import FileEntry

_CHUNK = 1 << 20


def open_kernels(path: Path, entry: FileEntry, *, check_hash: bool = True) -> Any:
    """The TVM module of the kernels library `path` (an artifact's kernels.so), loaded from a
    private copy whose size (and, with `check_hash`, sha256) equals `entry`'s.

    Raises ArtifactError when the file changed since the manifest was written (or since
    `verify`), is for another CPU architecture, or cannot be loaded."""
    from moec.runtime import _tvm  # noqa: PLC0415

    _tvm.tvm()  # imports tvm_ffi the way the runtime wants it (without torch)
    import tvm_ffi  # noqa: PLC0415

    folder = Path(tempfile.mkdtemp(prefix="moec-kernels-"))
    private = folder / path.name
    try:
        _copy_checked(path, private, entry, check_hash)
        check_elf_machine(private)
        try:
            return tvm_ffi.load_module(str(private), keep_module_alive=False)
        except Exception as e:  # tvm_ffi raises several error types for a bad library
            raise ArtifactError(
                f"{path.name} in {path.parent} could not be loaded: {_first_line(e)} (it was "
                f"copied to {folder} to be loaded; if {tempfile.gettempdir()} is mounted "
                f"noexec, set TMPDIR to a folder that allows executables)"
            ) from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # the loaded library stays mapped


def _copy_checked(src: Path, dst: Path, entry: FileEntry, check_hash: bool) -> None:
    h = hashlib.sha256()
    size = 0
    try:
        fd = os.open(src, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as f:
            out_fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o700)
            with os.fdopen(out_fd, "wb") as out:
                # One byte more than recorded is enough to know the file grew.
                while size <= entry.size and (chunk := f.read(min(_CHUNK, entry.size + 1 - size))):
                    size += len(chunk)
                    if check_hash:
                        h.update(chunk)
                    out.write(chunk)
    except OSError as e:
        raise ArtifactError(f"{src.name} in {src.parent} cannot be read ({e})") from None
    if size != entry.size or (check_hash and h.hexdigest() != entry.sha256):
        raise ArtifactError(
            f"{src.name} in {src.parent} changed after it was verified (it no longer has the "
            f"size and sha256 the manifest records); reload the artifact once it is complete"
        )


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return (text.splitlines() or [type(e).__name__])[0][:300]
