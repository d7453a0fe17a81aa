"""`moec.runtime.load` and `CompiledModel`: a verified artifact, loaded and callable."""

from __future__ import annotations

import os
import re
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from moec.errors import ArtifactError, InputError
from moec.runtime import _tvm
from moec.runtime.cpu import check_elf_machine
from moec.runtime.inputs import check_inputs, is_torch_tensor, on_cpu, to_tvm, torch_module
from moec.runtime.manifest import Manifest, Signature
from moec.runtime.verify import KERNELS, WEIGHTS, check_target, verify

_DEVICE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")
# Output dtypes np.from_dlpack understands; others (bfloat16, float8) go through .numpy().
_NUMPY_DLPACK_DTYPES = frozenset(
    "bool int8 int16 int32 int64 uint8 uint16 uint32 uint64 float16 float32 float64".split()
)


def _parse_device(device: Any) -> tuple[str, int]:
    # str() so that a torch.device("cuda:1") works as well as "cuda:1".
    m = _DEVICE.match(str(device))
    if m is None:
        raise InputError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'")
    return m.group(1), int(m.group(2) or 0)


class CompiledModel:
    """A loaded artifact, callable like the model it was compiled from.

    `model(*inputs)` takes numpy arrays or torch tensors in `signature.inputs` order and
    returns the outputs: one array if the signature has one output, else a tuple. Outputs are
    torch tensors when the first input is a torch tensor, numpy arrays otherwise; they never
    alias an input or a weight. Inputs are checked first (InputError names the input, what was
    given and what is expected). Inputs that are misaligned (the kernels assume 64-byte
    alignment), non-contiguous, or of another float (or int) dtype are copied once into a
    buffer the kernels accept; the others are passed zero-copy through DLPack.

    Thread safety: calls are serialised by a per-model lock, because TVM's Relax VM is not
    documented as safe to call from several threads at once. Input conversion and output
    wrapping happen outside the lock. For parallel inference load one model per thread.

    Construct it with `moec.runtime.load` (or `Artifact.load_model`), not directly."""

    def __init__(
        self, path: Path, manifest: Manifest, vm: Any, weights: list[Any], device: Any
    ) -> None:
        self._path = path
        self._manifest = manifest
        self._vm = vm
        self._main = vm["main"]
        self._weights = weights
        self._weight_ptrs = frozenset(w.data_ptr() for w in weights)
        self._device = device
        self._tvm = _tvm.tvm()
        self._lock = threading.Lock()

    @property
    def signature(self) -> Signature:
        """The inputs, outputs and symbolic dim bounds of the model."""
        return self._manifest.signature

    @property
    def manifest(self) -> Manifest:
        """The artifact's parsed manifest.json."""
        return self._manifest

    @property
    def path(self) -> Path:
        """The artifact folder this model was loaded from."""
        return self._path

    @property
    def device(self) -> str:
        """Where the kernels run: 'cpu' or 'cuda:N'."""
        return str(self._device).replace("cpu:0", "cpu")

    def __repr__(self) -> str:
        return f"CompiledModel({str(self._path)!r}, device={self.device!r}, {self.signature})"

    def __call__(self, *inputs: Any) -> Any:
        """Run the model; see the class docstring for what inputs and outputs can be."""
        sig = self._manifest.signature
        check_inputs(sig, inputs)
        args = [
            to_tvm(spec, x, self._tvm, self._device)
            for spec, x in zip(sig.inputs, inputs, strict=True)
        ]
        with self._lock:
            result = self._main(*args, *self._weights)
        outs = [result] if isinstance(result, self._tvm.runtime.Tensor) else list(result)
        # A graph may return an input or a weight unchanged; handing out a view of it would let
        # the caller's writes reach the weights, so such outputs are copied.
        shared = self._weight_ptrs | {a.data_ptr() for a in args}
        as_torch = bool(inputs) and is_torch_tensor(inputs[0])
        converted = tuple(
            self._wrap(o, copy=o.data_ptr() in shared and o.numel() > 0, as_torch=as_torch)
            for o in outs
        )
        return converted[0] if len(converted) == 1 else converted

    def _wrap(self, t: Any, *, copy: bool, as_torch: bool) -> Any:
        if as_torch:
            torch = torch_module()
            assert torch is not None  # the first input was a torch tensor
            out = torch.from_dlpack(t)
            return out.clone() if copy else out
        if on_cpu(t.device) and str(t.dtype) in _NUMPY_DLPACK_DTYPES:
            out = np.from_dlpack(t)  # zero-copy; the array keeps the TVM tensor alive
            return out.copy() if copy else out
        return t.numpy()  # copies (to the host, or through ml_dtypes for bfloat16)


def load(
    path: str | os.PathLike[str], device: Any = "cpu", *, check_hashes: bool = True
) -> CompiledModel:
    """Load an artifact folder (`NAME.moec/`) and return a callable `CompiledModel`.

    Before any native code is loaded it runs every check of `verify`: manifest present and of
    a supported format version, all files present with the recorded size and sha256, target
    kind runnable on `device` ("cpu", "cuda" or "cuda:N"), and the CPU features the kernels
    need present on this host (refusing rather than crashing on an illegal instruction).
    `check_hashes=False` skips hashing, for large artifacts from a trusted source.

    Raises ArtifactError for a damaged or foreign artifact, InputError for a bad `device`."""
    root = Path(path)
    kind, index = _parse_device(device)
    manifest = verify(root, check_host=False, check_hashes=check_hashes)
    check_target(manifest, kind)
    check_elf_machine(root / KERNELS)

    tvm = _tvm.tvm()
    if manifest.tvm_version != tvm.__version__:
        warnings.warn(
            f"{root} was built with TVM {manifest.tvm_version} but TVM {tvm.__version__} is "
            f"running; if loading or running fails, recompile the model",
            RuntimeWarning,
            stacklevel=2,
        )
    dev = tvm.cpu(index) if kind == "cpu" else tvm.cuda(index)
    if not dev.exist:
        raise ArtifactError(f"the artifact needs device {kind}:{index}, which this host lacks")
    try:
        lib = tvm.runtime.load_module(str(root / KERNELS))
        vm = tvm.runtime.vm.VirtualMachine(lib, dev)
        vm["main"]  # fail here, not at the first call, if there is no `main`
    except Exception as e:  # TVM raises several error types for a library it cannot load
        raise ArtifactError(f"{KERNELS} in {root} could not be loaded: {e}") from None
    return CompiledModel(root, manifest, vm, _load_weights(root / WEIGHTS, manifest, dev), dev)


def _load_weights(path: Path, manifest: Manifest, dev: Any) -> list[Any]:
    """Weights as TVM tensors on `dev`, in params order, read one at a time so the peak memory
    is the weights plus one tensor, not twice the weights."""
    from safetensors import safe_open  # noqa: PLC0415

    tvm = _tvm.tvm()
    out = []
    with safe_open(str(path), framework="numpy") as f:
        for name in manifest.params:
            # tvm.runtime.tensor copies into a fresh 64-byte-aligned buffer, which the kernels
            # need; the numpy array safetensors returns has no such guarantee.
            out.append(tvm.runtime.tensor(np.ascontiguousarray(f.get_tensor(name)), dev))
    return out
