"""The moec artifact: what `moec.compile` produces and `moec.runtime.load` runs.

Layout: a folder `NAME.moec/` holding

- `kernels.so`: `Executable.export_library` of a Relax module whose function `main` takes the
  model inputs followed by the weights, both in manifest order, and returns a tuple of outputs.
- `weights.safetensors`: the weights, already in the layout the kernels want (packed, transposed,
  quantised: whatever codegen chose), keyed by the names in `params`.
- `model.ir`: the final IR as text, for humans and `moec inspect`.
- `manifest.json`, with these fields (and no timestamps: the same model compiled twice gives
  the same manifest, byte for byte):

  ```
  format_version  int, currently 1; a reader refuses versions it does not know
  moec_version    str, the moec that wrote it
  tvm_version     str, the TVM that built kernels.so (a mismatch at load warns)
  target          {"kind": "llvm" | "cuda", "mcpu": str, "cpu_features": [str, ...], ...}
                  cpu_features: /proc/cpuinfo flags the native code may use ("avx2", "fma",
                  "avx512f", ...); load refuses a host that lacks one (no SIGILL crash)
  signature       {"inputs":  [{"name": str, "shape": [int | str, ...], "dtype": str}, ...],
                   "outputs": [same form; str dims may be expressions such as "T*2"],
                   "dims":    {"T": {"min": 0, "max": 4096}, ...},
                   "limits":  [{"expr": "B*S", "max": 4096}, ...]  (optional)}
                  a str dim of an input is a dynamic dim declared in dims, or an expression of
                  them ("B*S", checked against the call); max may be null; limits bound
                  expressions of the dims (the token count of a [B, S, H] input)
  params          [str, ...]: weight names, in the order main takes them after the inputs
  pipeline        [str, ...]: the passes that ran, in order
  files           {"kernels.so": {"sha256": hex, "size": bytes}, ...} for every file but the
                  manifest itself
  meta            free-form JSON object (model name, compile options, ...)
  ```

- `manifest.sha256`: the manifest's own digest, one `sha256sum` line (`<hex>  manifest.json`),
  so that a damaged or hand-edited manifest is refused (docs/security.md).

Writes are atomic: `Artifact.save` writes everything into a temporary folder next to the
destination, fsyncs it, and only then renames it into place, so a crash mid-save leaves either
the old artifact or the new one, never a mix. Loads (`moec.runtime.load`) check format version,
sizes, hashes, target and CPU features before any native code is loaded (`moec.runtime.verify`
does the same checks without loading).
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import json
import os
import secrets
import shutil
import sys
import tarfile
import tempfile
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from moec.errors import ArtifactError
from moec.runtime import _tvm, archive
from moec.runtime.manifest import (
    FORMAT_VERSION,
    FileEntry,
    Manifest,
    Signature,
    as_str_tuple,
    signature_from,
)
from moec.runtime.model import CompiledModel, load
from moec.runtime.verify import (
    IR,
    KERNELS,
    MANIFEST,
    MANIFEST_DIGEST,
    WEIGHTS,
    as_path,
    manifest_digest_text,
    sha256_file,
)


def _moec_version() -> str:
    try:
        return importlib.metadata.version("moec")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class Artifact:
    """A compiled model in memory: the built executable, its weights and the manifest fields.

    `moec.compile` returns one; `save(path)` writes the `NAME.moec/` folder described in this
    module's docstring, `load_model()` runs it without saving anywhere the user sees.

    Args:
        executable: the `tvm.compile` result (a Relax VM executable) whose `main` takes the
            inputs, then the weights in `weights` order, and returns a tuple of outputs.
        weights: name -> array, in the order `main` takes them (this order becomes `params`).
        signature: a `Signature` or its manifest dict form.
        target: manifest target dict, e.g. {"kind": "llvm", "mcpu": "znver3"}; for kind llvm
            `cpu_features` is derived from mcpu (via LLVM) when not given.
        ir_text: the final IR as text.
        pipeline: names of the passes that ran.
        meta: free-form, JSON-serialisable information.
        extra_files: more files of the artifact, name -> content (a generation artifact's
            tokenizer.json, tokenizer_config.json, ...); hashed in the manifest like the rest.
    """

    def __init__(
        self,
        executable: Any,
        weights: Mapping[str, Any],
        *,
        signature: Signature | Mapping[str, Any],
        target: Mapping[str, Any],
        ir_text: str,
        pipeline: Sequence[str] = (),
        meta: Mapping[str, Any] | None = None,
        extra_files: Mapping[str, bytes] | None = None,
    ) -> None:
        if not hasattr(executable, "export_library"):
            raise TypeError(f"executable must be a built TVM Executable, got {type(executable)}")
        self._executable = executable
        arrays: dict[str, np.ndarray] = {}
        for name, w in weights.items():
            arr = np.asarray(w)
            if arr.dtype == object:
                raise TypeError(f"weight {name!r} is not a numeric array")
            arrays[name] = arr
        self._weights = arrays
        self._signature = signature_from(signature)
        self._target = self._complete_target(target)
        self._pipeline = as_str_tuple(pipeline, "pipeline")
        self._ir_text = ir_text
        self._meta = dict(meta or {})
        self._extra = dict(extra_files or {})
        for name, data in self._extra.items():
            if name in (KERNELS, WEIGHTS, IR, MANIFEST) or "/" in name or name.startswith(".") \
                    or not isinstance(data, bytes):
                raise TypeError(f"extra file {name!r}: want a plain file name (not one of the "
                                f"artifact's own) and bytes")
        try:
            json.dumps(self._meta, allow_nan=False)
            json.dumps(self._target, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise TypeError(f"meta and target must be JSON-serialisable: {e}") from None

    @staticmethod
    def _complete_target(target: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(target)
        if not isinstance(out.get("kind"), str):
            raise TypeError(f"target needs a 'kind' string, got {target!r}")
        if out["kind"] == "llvm" and "cpu_features" not in out:
            from moec.runtime.cpu import required_cpu_features  # noqa: PLC0415

            out["cpu_features"] = required_cpu_features(out)
        if "cpu_features" in out:
            out["cpu_features"] = sorted(set(out["cpu_features"]))
        return out

    @property
    def executable(self) -> Any:
        return self._executable

    @property
    def weights(self) -> Mapping[str, np.ndarray]:
        """Weights by name, in `params` order (read-only view)."""
        return MappingProxyType(self._weights)

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(self._weights)

    @property
    def signature(self) -> Signature:
        return self._signature

    @property
    def target(self) -> Mapping[str, Any]:
        return MappingProxyType(self._target)

    @property
    def pipeline(self) -> tuple[str, ...]:
        return self._pipeline

    @property
    def ir_text(self) -> str:
        return self._ir_text

    @property
    def meta(self) -> Mapping[str, Any]:
        return MappingProxyType(self._meta)

    def __repr__(self) -> str:
        return (
            f"Artifact(target={self._target.get('kind')}:{self._target.get('mcpu', '')}, "
            f"{len(self._weights)} weights, {self._signature})"
        )

    def build_manifest(self, files: Mapping[str, FileEntry]) -> Manifest:
        """The manifest this artifact saves, given the entries of the files written."""
        return Manifest(
            format_version=FORMAT_VERSION,
            moec_version=_moec_version(),
            tvm_version=_tvm.tvm().__version__,
            target=self._target,
            signature=self._signature,
            params=self.params,
            pipeline=self._pipeline,
            files=dict(files),
            meta=self._meta,
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the artifact folder at `path` (conventionally `NAME.moec`) atomically.

        An existing artifact at `path` is replaced only once the new one is complete; a path
        that exists and is not a moec artifact (nor an empty folder) is never touched. Returns
        the absolute path written.

        A path ending in `.tar` (`NAME.moec.tar`) writes a single-file archive instead
        (`moec.runtime.archive`), which `load`, `verify` and the CLI accept like a folder."""
        dest = as_path(path).absolute()
        if dest.suffix == ".tar":
            return self._save_archive(dest)
        _check_replaceable(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        # Next to the destination, so the final rename stays within one filesystem. mkdir (not
        # mkdtemp, whose 0700 mode would stick to the artifact) with a random suffix.
        tmp = dest.parent / f".{dest.name}.tmp-{secrets.token_hex(6)}"
        tmp.mkdir()
        try:
            self._write_into(tmp)
            _replace_dir(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return dest

    def _save_archive(self, dest: Path) -> Path:
        check_destination(dest)
        tmp = tempfile.mkdtemp(prefix="moec-pack-")
        try:
            folder = self.save(Path(tmp) / (dest.stem if dest.stem.endswith(".moec") else
                                            dest.stem + ".moec"))
            return archive.pack(folder, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _write_into(self, folder: Path) -> None:
        from moec.runtime.weights import save_aligned  # noqa: PLC0415

        self._executable.export_library(str(folder / KERNELS))
        save_aligned(self._weights, folder / WEIGHTS)
        text = self._ir_text if self._ir_text.endswith("\n") else self._ir_text + "\n"
        (folder / IR).write_text(text, encoding="utf-8")
        for name, data in self._extra.items():
            (folder / name).write_bytes(data)
        files = {}
        for name in (KERNELS, WEIGHTS, IR, *self._extra):
            _fsync_file(folder / name)
            files[name] = FileEntry(sha256_file(folder / name), (folder / name).stat().st_size)
        # The manifest last: a folder without one is never mistaken for an artifact.
        write_manifest(folder, self.build_manifest(files).to_json().encode("utf-8"))
        _fsync_dir(folder)

    def load_model(self, device: Any = "cpu", *, weights: str = "copy") -> CompiledModel:
        """Load this artifact for running, without the caller choosing a path.

        It is saved to a private temporary folder and loaded from there (so it runs exactly
        as the saved artifact would); the folder is deleted when the model is garbage
        collected. `weights`: as for `moec.load`."""
        tmp = tempfile.mkdtemp(prefix="moec-")
        try:
            model = load(self.save(Path(tmp) / "model.moec"), device, weights=weights)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        weakref.finalize(model, shutil.rmtree, tmp, ignore_errors=True)
        return model


def write_manifest(folder: Path, text: bytes) -> None:
    """Write `manifest.json` (and first `manifest.sha256`, its digest) into `folder`, synced.

    For `Artifact.save`; tests use it to make edits the digest does not catch."""
    (folder / MANIFEST_DIGEST).write_text(manifest_digest_text(text), encoding="ascii")
    (folder / MANIFEST).write_bytes(text)
    for name in (MANIFEST_DIGEST, MANIFEST):
        _fsync_file(folder / name)


def check_destination(path: str | os.PathLike[str]) -> None:
    """Raise ArtifactError if `Artifact.save(path)` would refuse to write there (so that a
    long compile can fail before it starts)."""
    dest = as_path(path).absolute()
    if dest.suffix == ".tar":
        try:
            bad = dest.is_symlink() or (dest.exists() and not (dest.is_file()
                                                               and _is_tarfile(dest)))
        except OSError as e:
            raise ArtifactError(f"cannot write an archive to {str(dest)[:200]}: {e.strerror}") \
                from None
        if bad:
            raise ArtifactError(f"refusing to replace {dest}: it exists and is not a tar archive")
    else:
        _check_replaceable(dest)


def _is_tarfile(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except (ValueError, OverflowError, EOFError):  # a malformed header: not a tar we replace
        return False


def _check_replaceable(dest: Path) -> None:
    try:
        if not dest.exists() and not dest.is_symlink():
            return
    except OSError as e:  # a name too long for the file system, a loop of links
        raise ArtifactError(f"cannot write an artifact to {str(dest)[:200]}: {e.strerror}") \
            from None
    if dest.is_symlink() or not dest.is_dir():
        raise ArtifactError(f"refusing to write an artifact to {dest}: it is not a folder")
    if any(dest.iterdir()) and not (dest / MANIFEST).is_file():
        raise ArtifactError(
            f"refusing to replace {dest}: it exists and is not a moec artifact (no {MANIFEST})"
        )


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    # Makes renames and new entries durable; some platforms cannot open directories.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux renameat2(RENAME_EXCHANGE); False if unsupported."""
    if sys.platform != "linux":
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _replace_dir(new: Path, dest: Path) -> None:
    """Move the complete folder `new` to `dest`, replacing what is there."""
    if not dest.exists():
        os.rename(new, dest)
    elif _exchange(new, dest):
        # dest is the new artifact at every instant; `new` now holds the old one.
        shutil.rmtree(new, ignore_errors=True)
    else:
        # Two renames: between them dest is briefly absent, but the old artifact survives
        # under `old` and is put back if the second rename fails.
        old = dest.parent / f".{dest.name}.old-{secrets.token_hex(6)}"
        os.rename(dest, old)
        try:
            os.rename(new, dest)
        except BaseException:
            os.rename(old, dest)
            raise
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(dest.parent)
