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
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from moec.errors import ArtifactError
from moec.runtime.cpu import check_elf_machine
from moec.runtime.manifest import FileEntry, Manifest

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


# The VM executable's constant pool holds, for every parameter of every function, the error
# context of its type check: `ErrorContext(fn=main, loc=param[2], param=NAME,
# annotation=R.Tensor((4, 64, 16), dtype="float32"))` (TVM 0.27, `Executable.stats()`).
_PARAM = re.compile(r'ErrorContext\(fn=main, loc=param\[(\d+)\], param=(.*?), '
                    r'annotation=R\.Tensor\(\((.*?)\), dtype="(\w+)"\)\)')
_INT64 = re.compile(r"^T\.int64\((\d+)\)$")


def kernel_params(lib: Any) -> dict[int, tuple[str, tuple[str, ...], str]]:
    """`main`'s parameters as the compiled module records them: index -> (name, dims as
    text, dtype); an int dim reads "64", a symbolic one its TVM name ("T_1")."""
    out = {}
    for m in _PARAM.finditer(lib["stats"]()):
        dims = tuple(_INT64.sub(r"\1", d.strip()) for d in m.group(3).split(",") if d.strip())
        out[int(m.group(1))] = (m.group(2), dims, m.group(4))
    return out


def check_kernel_params(lib: Any, root: Path, manifest: Manifest) -> None:
    """Raise ArtifactError unless `main` of the loaded kernels takes, in order, the
    signature's inputs and the manifest's params by name, with their dtypes and static dims
    (the weights' as weights.safetensors stores them): a manifest edited to contradict the
    kernels (weights reordered, an input's dtype or shape changed) is refused here, at load."""
    from moec.runtime.verify import KERNELS, stored_weight_types  # noqa: PLC0415

    stored = stored_weight_types(root, manifest)
    where = f"{KERNELS} in {root}"
    found = kernel_params(lib)
    expected = [("input", s.name, s.shape, s.dtype) for s in manifest.signature.inputs]
    expected += [("weight", p, stored[p].shape, stored[p].dtype) for p in manifest.params]
    for i, (kind, name, shape, dtype) in enumerate(expected):
        if i not in found:
            raise ArtifactError(f"{where}: the type of main's parameter {i} cannot be read from "
                                f"the library (built by another TVM?); recompile the model")
        kname, kdims, kdtype = found[i]
        if kname != name:
            raise ArtifactError(
                f"{where}: main's parameter {i} is {kname!r}, but the manifest has {kind} "
                f"{name!r} there: the manifest and the kernels disagree (reordered or renamed; "
                f"the artifact was edited or damaged), recompile the model")
        ok = kdtype == dtype and len(kdims) == len(shape) and all(
            not k.isdigit() or str(d) == k for k, d in zip(kdims, shape, strict=True))
        if not ok:
            raise ArtifactError(
                f"{where}: main takes {name!r} as {kdtype}[{', '.join(kdims)}], but the "
                f"{'signature' if kind == 'input' else 'weights file'} has "
                f"{dtype}[{', '.join(str(d) for d in shape)}]: the manifest and the kernels "
                f"disagree (the artifact was edited or damaged), recompile the model")
