"""`moec.runtime.load` and `CompiledModel`: a verified artifact, loaded and callable."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
import warnings
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from moec.errors import ArtifactError, ExecutionError, InputError
from moec.runtime import _tvm, archive
from moec.runtime.cpu import check_elf_machine
from moec.runtime.cuda_graph import stream_context
from moec.runtime.inputs import (
    add_batch,
    batch_left_out,
    bind_inputs,
    check_inputs,
    check_ranges,
    is_torch_tensor,
    numpy_dtype,
    on_cpu,
    to_tvm,
    torch_module,
    unbatch_outputs,
)
from moec.runtime.kernels import check_kernel_params, open_kernels
from moec.runtime.manifest import Manifest, Signature
from moec.runtime.verify import KERNELS, WEIGHTS, as_path, check_target, verify

_DEVICE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")
WEIGHT_MODES = ("copy", "mmap")  # moec.load(weights=...)
EXPERT_SOURCES = ("auto", "host", "disk")  # moec.load(expert_source=...), with expert_budget
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

    Thread safety: any number of threads may call one model at once and each gets the
    results a serial call would give (tests/reliability/test_concurrency.py), but the kernel
    runs themselves are serialised by a per-model lock: a Relax VM keeps per-call state (its
    register file) and is not safe to enter from two threads. Input conversion and output
    wrapping happen outside the lock. The kernels are multi-threaded already (TVM's thread
    pool, TVM_NUM_THREADS), so once a model is large enough to keep those threads busy,
    serialising costs little; to run calls truly in parallel, load the artifact once per
    thread (each load has its own VM and weights). Measurements: docs/security.md.

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

    def __call__(self, *inputs: Any, **named: Any) -> Any:
        """Run the model; see the class docstring for what inputs and outputs can be. Inputs
        may also be given by name, `model(x=a)`."""
        sig = self._manifest.signature
        inputs = bind_inputs(sig, inputs, named)
        lead = batch_left_out(sig, inputs)
        if lead is not None:  # [S, H] for [B, S, H]: one sequence
            inputs = tuple(
                add_batch(x) if spec.shape[0] == lead else x
                for spec, x in zip(sig.inputs, inputs, strict=True)
            )
        check_inputs(sig, inputs)
        check_ranges(sig, inputs, self._manifest.meta.get("input_ranges"))
        args = [
            to_tvm(spec, x, self._tvm, self._device)
            for spec, x in zip(sig.inputs, inputs, strict=True)
        ]
        with self._lock, stream_context(inputs):
            try:
                result = self._main(*args, *self._weights)
            except Exception as e:  # TVM raises ValueError, RuntimeError, tvm.error.*
                raise _call_error(self._path, e) from None
        outs = [result] if isinstance(result, self._tvm.runtime.Tensor) else list(result)
        # A graph may return an input or a weight unchanged; handing out a view of it would let
        # the caller's writes reach the weights, so such outputs are copied.
        shared = self._weight_ptrs | {a.data_ptr() for a in args}
        as_torch = bool(inputs) and is_torch_tensor(inputs[0])
        converted = tuple(
            self._wrap(o, copy=o.data_ptr() in shared and o.numel() > 0, as_torch=as_torch)
            for o in outs
        )
        if lead is not None:
            converted = tuple(unbatch_outputs(sig, lead, converted))
        return converted[0] if len(converted) == 1 else converted

    def cuda_graph(self, *example_inputs: Any) -> Any:
        """A CUDA graph of one call at the shapes of `example_inputs` (torch CUDA tensors): the
        returned function copies its inputs into the graph's buffers and replays the captured
        kernels with one launch, returning the graph's output buffers (overwritten by the next
        replay). For decode-sized calls, where launch overhead dominates; one graph per token
        count. See moec/runtime/cuda_graph.py."""
        from moec.runtime.cuda_graph import capture  # noqa: PLC0415

        if on_cpu(self._device):
            raise InputError("cuda_graph needs a model loaded with device='cuda'")
        return capture(self, *example_inputs)

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


def _call_error(path: Path, e: Exception) -> Exception:
    """The moec error for an exception the VM raised on inputs that `check_inputs` accepted."""
    text = str(e)
    lines = text.strip().splitlines()
    first = next((line for line in lines if "Check failed" in line), lines[0] if lines else "")
    if "ErrorContext(fn=main" in text or "Invoking function main expects" in text:
        # The VM's own argument checks: the manifest's signature and the kernels disagree,
        # which only an edited or damaged artifact can cause (the inputs match the manifest).
        return ArtifactError(
            f"{KERNELS} in {path} rejected inputs that match the manifest's signature "
            f"({type(e).__name__}: {first[:300]}); the manifest and the kernels disagree: the "
            f"artifact was edited or damaged, recompile the model"
        )
    return ExecutionError(f"running {path} failed: {type(e).__name__}: {first[:500]}")


def load(
    path: str | os.PathLike[str],
    device: Any = "cpu",
    *,
    check_hashes: bool = True,
    ep_group: Any = None,
    weights: str = "copy",
    expert_budget: str | int | None = None,
    expert_policy: str = "adaptive",
    prefetch: bool = False,
    expert_source: str = "auto",
) -> CompiledModel:
    """Load an artifact folder (`NAME.moec/`) and return a callable `CompiledModel`.

    Before any native code is loaded it runs every check of `verify`: manifest present and of
    a supported format version, all files present with the recorded size and sha256, target
    kind runnable on `device` ("cpu", "cuda" or "cuda:N"), and the CPU features the kernels
    need present on this host (refusing rather than crashing on an illegal instruction).
    `check_hashes=False` skips hashing, for large artifacts from a trusted source.

    Loading an artifact loads its native code (kernels.so) into this process: trust artifacts
    as you would trust a shared library (docs/security.md). `path` may also be a single-file
    archive `NAME.moec.tar` (`moec.runtime.archive`), extracted safely into a private temporary
    folder that is deleted when the model is garbage collected.

    `ep_group` (a torch.distributed process group): load expert-parallel instead, this rank's
    shard only; collective over the group (moec.distributed.load_ep, an `EPModel`).

    `weights` (CPU): "copy" (default) reads weights.safetensors once into this process's own
    memory, where the kernels read them fastest (Qwen3-30B-A3B's grouped GEMMs measured 8-34%
    slower on the mapped file here, smaller layers the same); "mmap" keeps them as views of a
    copy-on-write mapping of the file: loading reads nothing up front, and processes loading
    the same artifact share the page cache's copy (docs/security.md). On a GPU weights are
    always copied to the device; with `ep_group` they are always mapped (ranks on one host
    share the file's pages).

    `expert_budget` (generation artifacts): keep at most this many bytes of the routed experts
    in memory ("3GB", or bytes), loaded as layers route to them (moec.runtime.expert_cache;
    `expert_policy` "adaptive", "lru" or "lfu", `prefetch` by pre-gating, off by default). On
    a CPU the others stay in the weights file; on a GPU the budget is device memory and every
    expert is kept in pinned host memory (moec.runtime.expert_store). The outputs are bitwise
    those of the fully resident model. `expert_source`: where the experts not in the budget
    are read from: "disk" (the weights file; the only choice on a CPU) or, on a GPU, "host"
    (pinned host memory holding every expert, filled at load; "auto" picks it there) or
    "disk" (through a small pinned staging buffer: experts larger than host memory too).

    Raises ArtifactError for a damaged or foreign artifact, InputError for a bad `device` or
    `weights`."""
    if weights not in WEIGHT_MODES:
        raise InputError(f"moec.load: weights={weights!r}; want one of {WEIGHT_MODES}")
    if ep_group is not None:
        from moec.distributed import load_ep  # noqa: PLC0415  (imports torch)

        return load_ep(path, ep_group, device, check_hashes=check_hashes)
    root = as_path(path)
    kind, index = _parse_device(device)
    offload = None
    if expert_budget is not None:
        from moec.engine.kv_pool import parse_bytes  # noqa: PLC0415

        if expert_source not in EXPERT_SOURCES:
            raise InputError(f"expert_source={expert_source!r}; want one of {EXPERT_SOURCES}")
        if expert_source == "host" and kind == "cpu":
            raise InputError("expert_source='host' is for GPUs (pinned host memory behind "
                             "device memory); on a CPU the experts outside the budget are read "
                             "from the weights file: use 'disk' or 'auto'")
        offload = (parse_bytes(expert_budget), expert_policy, bool(prefetch), expert_source)
    if archive.is_archive(root):
        return _load_archive(root, device, check_hashes, weights, offload)
    manifest = verify(root, check_host=False, check_hashes=check_hashes)
    for spec in (*manifest.signature.inputs, *manifest.signature.outputs):
        if not _known_dtype(spec.dtype):
            raise ArtifactError(
                f"{root}: manifest.json: signature dtype {spec.dtype!r} of {spec.name!r} is not "
                f"a tensor dtype this runtime knows"
            )
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
    _tvm.ensure_device_runtime(kind)
    dev = tvm.cpu(index) if kind == "cpu" else tvm.cuda(index)
    if not dev.exist:
        raise ArtifactError(f"the artifact needs device {kind}:{index}, which this host lacks")
    gen = manifest.meta.get("generation")
    if isinstance(gen, dict) and gen.get("offload"):
        # the offload entry points call it; the VM resolves it when it is made
        from moec.runtime.expert_cache import register_fetch  # noqa: PLC0415

        register_fetch()
    # A private copy of the verified code, unloaded with the model (moec/runtime/kernels.py).
    lib = open_kernels(root / KERNELS, manifest.files[KERNELS], check_hash=check_hashes)
    try:
        vm = tvm.runtime.vm.VirtualMachine(lib, dev)
        vm["main"]  # fail here, not at the first call, if there is no `main`
        arity = vm._get_function_arity("main")
    except Exception as e:  # TVM raises several error types for a library it cannot load
        raise ArtifactError(f"{KERNELS} in {root} could not be loaded: {e}") from None
    expected = len(manifest.signature.inputs) + len(manifest.params)
    if arity != expected:
        raise ArtifactError(
            f"{KERNELS} in {root}: main takes {arity} arguments but the manifest lists "
            f"{len(manifest.signature.inputs)} input(s) and {len(manifest.params)} weight(s); "
            f"the manifest and the kernels disagree: the artifact was edited or damaged"
        )
    check_kernel_params(lib, root, manifest)
    cache = None
    try:
        if offload is not None:
            from moec.runtime.expert_cache import load_offloaded  # noqa: PLC0415

            params, cache = load_offloaded(root / WEIGHTS, manifest, dev, *offload)
        else:
            params = _load_weights(root / WEIGHTS, manifest, dev, copy=weights == "copy")
    except (InputError, ArtifactError):
        raise
    except Exception as e:  # safetensors' SafetensorError, OSError, TVM allocation errors
        raise ArtifactError(f"{WEIGHTS} in {root} could not be loaded: {e}") from None
    if offload is not None and not isinstance(manifest.meta.get("generation"), dict):
        raise InputError("expert_budget applies to generation artifacts (causal LMs compiled "
                         "from a checkpoint folder)")
    if isinstance(manifest.meta.get("generation"), dict):  # a causal LM: main + decode
        from moec.runtime.step import StepModel  # noqa: PLC0415

        try:
            return StepModel(root, manifest, vm, params, dev, expert_cache=cache)
        except (KeyError, AttributeError, RuntimeError) as e:
            raise ArtifactError(f"{KERNELS} in {root}: the generation entry points could not "
                                f"be loaded ({e}); recompile the model") from None
    return CompiledModel(root, manifest, vm, params, dev)


def _known_dtype(name: str) -> bool:
    # Canonical names only ("float32", "bfloat16"): numpy also parses "f4", "O" or "i4,f4".
    try:
        dt = numpy_dtype(name)
    except (InputError, TypeError, ValueError):
        return False
    # bool, ints, floats; or one of ml_dtypes' floats (bfloat16, float8_*: numpy kind "V").
    plain = dt.kind in "biuf" or (dt.kind == "V" and dt.type.__module__.startswith("ml_dtypes"))
    return plain and dt.name == name


def _load_archive(path: Path, device: Any, check_hashes: bool, weights: str,
                  offload: tuple | None = None) -> CompiledModel:
    tmp = tempfile.mkdtemp(prefix="moec-")
    try:
        extra = {} if offload is None else dict(zip(
            ("expert_budget", "expert_policy", "prefetch", "expert_source"), offload,
            strict=True))
        model = load(archive.unpack(path, tmp), device, check_hashes=check_hashes,
                     weights=weights, **extra)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # The kernels stay mapped after their file is deleted; the folder goes with the model.
    weakref.finalize(model, shutil.rmtree, tmp, ignore_errors=True)
    return model


def _load_weights(path: Path, manifest: Manifest, dev: Any, copy: bool) -> list[Any]:
    """Weights as TVM tensors on `dev`, in params order: on a CPU a private copy, or views of
    the memory-mapped file (one copy, in the page cache), see moec/runtime/weights.py."""
    from moec.runtime.weights import load_mapped  # noqa: PLC0415

    return load_mapped(path, manifest.params, dev, copy=copy)
