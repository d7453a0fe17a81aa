"""Import TVM's runtime lazily, and without dragging torch in.

`tvm_ffi/__init__.py` runs `import torch` (a Windows symbol-clash workaround) whenever torch is
installed, which costs seconds and a few hundred MB in a process that only runs an artifact on
numpy arrays. So when torch is not imported yet, TVM is imported with an import hook that
refuses `torch` (ImportError, at once) to the importing thread only; tvm_ffi treats torch as
absent and carries on. Other threads are not affected: one that imports torch meanwhile gets it
(this used to be done with `sys.modules["torch"] = None`, which made every thread's
`import torch` fail while TVM was being imported). The hook is removed right after, so the
user's own `import torch` later works normally, and DLPack exchange with torch tensors still
works (it only needs the tensors' `__dlpack__` methods).

What a process gives up when moec.runtime is the first to import TVM: tvm_ffi's optional torch
extras (its faster C DLPack converter, `tvm_ffi.use_torch_stream`, torch.dtype arguments to FFI
functions). A process that wants them imports torch before moec, as `moec.compile` users do.

TVM is imported on first use rather than at `import moec.runtime`, so that `moec verify` and
`moec inspect` never load native code.
"""

from __future__ import annotations

import importlib.abc
import sys
import threading
from types import ModuleType
from typing import Any

_lock = threading.Lock()
_tvm: ModuleType | None = None


def tvm() -> ModuleType:
    """The `tvm` package with `tvm.runtime` and `tvm.runtime.vm` imported."""
    global _tvm
    if _tvm is not None:
        return _tvm
    with _lock:
        if _tvm is None:
            hook = _NoTorchInThisThread() if "torch" not in sys.modules else None
            if hook is not None:
                sys.meta_path.insert(0, hook)
            try:
                import tvm as tvm_pkg  # noqa: PLC0415
                import tvm.runtime  # noqa: F401, PLC0415
                import tvm.runtime.vm  # noqa: F401, PLC0415
            finally:
                if hook is not None:
                    sys.meta_path.remove(hook)
            _tvm = tvm_pkg
    return _tvm


class _NoTorchInThisThread(importlib.abc.MetaPathFinder):
    """Refuses `torch` (and its submodules) to the thread that created it; answers every other
    thread's imports with None ("not mine"), so that they proceed exactly as without it."""

    def __init__(self) -> None:
        self.thread = threading.get_ident()

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if threading.get_ident() == self.thread and name.partition(".")[0] == "torch":
            raise ModuleNotFoundError("moec.runtime imports TVM without torch", name=name)
        return None


def ensure_device_runtime(kind: str) -> None:
    """Load TVM's runtime plugin for a GPU kind ("cuda") if this process has not yet.

    A full TVM loads it at import when the driver library is present; a runtime-only TVM
    (`TVM_USE_RUNTIME_LIB=1`, or a tvm package without libtvm_compiler, as shipped to machines
    that only run artifacts) loads no backends, and without the plugin a kernels library with
    an embedded CUDA binary cannot be loaded. A missing plugin or driver is left for the loader
    to report (the device then does not exist)."""
    if kind != "cuda":
        return
    tvm_pkg = tvm()
    if tvm_pkg.get_global_func("ffi.Module.load_from_bytes.cuda", allow_missing=True):
        return
    from pathlib import Path  # noqa: PLC0415

    from tvm.base import _LOADED_LIBS  # noqa: PLC0415
    from tvm_ffi.libinfo import load_lib_ctypes  # noqa: PLC0415

    with _lock:
        try:
            _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
                "tvm", "tvm_runtime_cuda", "RTLD_LOCAL",
                extra_lib_paths=[Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent])
        except (OSError, RuntimeError):
            pass
