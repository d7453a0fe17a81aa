"""weights.safetensors with every tensor 64-byte aligned, and loading it memory-mapped.

The file is plain safetensors (any safetensors reader opens it): the header is padded with
spaces and, where a tensor would start off a 64-byte boundary, a `__pad__.<i>` u8 tensor fills
the gap (the format forbids holes between tensors). Aligned, a weight can be handed to TVM
as a view of the mapped file (DLPack): loading reads nothing up front, the page cache holds
the only copy, and processes that load the same artifact (expert-parallel ranks) share it.
The mapping is copy-on-write, so nothing a process does reaches the file.

Files from before alignment, or weights going to a GPU, are copied once into TVM memory, and so
are all weights when `moec.load` is asked to (`weights="copy"`, its default on a CPU): the
grouped GEMMs read a private anonymous copy 8-34% faster than the mapped page cache here
(Qwen3-30B-A3B gate/up GEMM, 1 to 2048 tokens, both kinds interleaved in one process; the
smaller bench layers measured the same either way).
"""

from __future__ import annotations

import json
import mmap
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moec.errors import ArtifactError

ALIGN = 64  # TVM's DLPack import wants 64-byte aligned data
PAD_PREFIX = "__pad__."

DTYPE_NAMES = {  # safetensors dtype code -> numpy/TVM dtype name
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
    "I32": "int32", "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32",
    "U16": "uint16", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2"}
_DTYPES = DTYPE_NAMES  # the name other runtime modules import
_CODES = {v: k for k, v in DTYPE_NAMES.items()}


def _np_dtype(name: str) -> np.dtype:
    if name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        import ml_dtypes  # noqa: PLC0415

        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name)


def save_aligned(weights: Mapping[str, np.ndarray], path: str | Path) -> None:
    """Write `weights` (in their order) as safetensors with every tensor's data at a multiple
    of ALIGN bytes from the start of the file."""
    arrays = {n: np.ascontiguousarray(a) for n, a in weights.items()}
    for n, a in arrays.items():
        if n.startswith(PAD_PREFIX):
            raise ArtifactError(f"weight name {n!r} is reserved for padding")
        if a.dtype.name not in _CODES:
            raise ArtifactError(f"weight {n!r}: dtype {a.dtype} has no safetensors code")
    # offsets relative to the data start, which is itself aligned (header padded below)
    header: dict[str, Any] = {}
    layout: list[tuple[int, np.ndarray | None]] = []  # (padding bytes before, array)
    pos = 0
    for i, (n, a) in enumerate(arrays.items()):
        gap = (-pos) % ALIGN
        if gap:
            header[f"{PAD_PREFIX}{i}"] = {"dtype": "U8", "shape": [gap],
                                          "data_offsets": [pos, pos + gap]}
            pos += gap
        header[n] = {"dtype": _CODES[a.dtype.name], "shape": list(a.shape),
                     "data_offsets": [pos, pos + a.nbytes]}
        layout.append((gap, a))
        pos += a.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((-(8 + len(text))) % ALIGN)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for gap, a in layout:
            f.write(b"\0" * gap)
            f.write(memoryview(a.reshape(-1).view(np.uint8)))


def _header(path: Path) -> tuple[dict[str, Any], int, int]:
    """(tensor entries, data start, file size), checked against the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ArtifactError(f"{path.name}: shorter than a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100 << 20):
            raise ArtifactError(f"{path.name}: header length {n} exceeds the file")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError) as e:  # incl. UnicodeDecodeError, huge ints
            raise ArtifactError(f"{path.name}: the safetensors header is not JSON "
                                f"({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(header, dict) or not all(isinstance(v, dict) for v in header.values()):
        raise ArtifactError(f"{path.name}: the safetensors header is not an object of tensor "
                            f"entries")
    header.pop("__metadata__", None)
    return header, 8 + n, size


def read_header(path: str | Path) -> tuple[dict[str, Any], int]:
    """The tensor entries of the safetensors file `path` (no `__metadata__`) and the size of its
    data section, in bytes; ArtifactError when the header cannot be read."""
    path = Path(path)
    try:
        header, start, size = _header(path)
    except OSError as e:
        raise ArtifactError(f"{path.name} cannot be read ({e})") from None
    return header, size - start


def tensor_entries(path: str | Path) -> tuple[dict[str, tuple[np.dtype, tuple[int, ...], int]],
                                              int]:
    """name -> (dtype, shape, file offset) of every weight of the safetensors file `path`
    (padding left out), in file order, and the file's size; ArtifactError on a bad entry."""
    path = Path(path)
    header, start, size = _header(path)
    out = {}
    for name, entry in header.items():
        if name.startswith(PAD_PREFIX):
            continue
        try:
            dt = _np_dtype(DTYPE_NAMES[entry["dtype"]])
            shape = tuple(int(d) for d in entry["shape"])
            lo, hi = (start + int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ArtifactError(f"{path.name}: bad header entry for {name!r}: {entry}") from None
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        if hi - lo != nbytes or lo < start or hi > size:
            raise ArtifactError(f"{path.name}: weight {name!r} spans bytes {lo}..{hi} of "
                                f"{size}, but {entry['dtype']}{list(shape)} needs {nbytes}")
        out[name] = (dt, shape, lo)
    return out, size


def mapped_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """Every weight of the safetensors file `path` (padding left out) as a numpy view of one
    copy-on-write mapping of the file, in file order."""
    entries, size = tensor_entries(path)
    mapped = np.memmap(path, dtype=np.uint8, mode="c") if size else np.zeros(0, np.uint8)
    out = {}
    for name, (dt, shape, lo) in entries.items():
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        out[name] = (mapped[lo:lo + nbytes] if nbytes else np.zeros(0, np.uint8)
                     ).view(dt).reshape(shape)
    return out


def read_copies(path: str | Path, names: Sequence[str]) -> list[np.ndarray]:
    """The weights `names` of the safetensors file `path`, read (pread) into one anonymous
    mapping, each 64-byte aligned.

    Why not `np.array(a)` or `tvm.runtime.tensor(a)`: those allocate with malloc, and glibc
    keeps freed blocks of a few MB in its heap (its mmap threshold grows to 32 MB once a large
    block is freed), so a process that loads and unloads models grew by about the weights'
    size per cycle (docs/security.md, "Memory over time"). A mapping of our own is returned to
    the system as soon as the last tensor viewing it is freed.

    Reading instead of copying from a mapping of the file keeps the file's pages out of the
    process's resident set: a copied model peaked at twice its weights while the whole file
    was mapped. The pages read are dropped from the page cache as each tensor is done, so the
    weights are in memory once, not twice."""
    import os  # noqa: PLC0415

    path = Path(path)
    entries, _ = tensor_entries(path)
    for name in names:
        if name not in entries:
            raise ArtifactError(f"{path.name} has no weight {name!r}")
    sel = [entries[n] for n in names]
    sizes = [int(np.prod(shape, dtype=np.int64)) * dt.itemsize for dt, shape, _ in sel]
    offsets, total = [], 0
    for n in sizes:
        offsets.append(total)
        total += -(-n // ALIGN) * ALIGN
    buf = np.frombuffer(mmap.mmap(-1, total), dtype=np.uint8) if total else None
    out = []
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise ArtifactError(f"{path.name} cannot be read ({e})") from None
    try:
        for (dt, shape, lo), n, off in zip(sel, sizes, offsets, strict=True):
            if n == 0:
                out.append(np.empty(shape, dt))
                continue
            dst = buf[off:off + n]
            view, done = memoryview(dst), 0
            while done < n:
                got = os.preadv(fd, [view[done:]], lo + done)
                if got <= 0:
                    raise ArtifactError(f"{path.name} ends inside weight at byte {lo + done}")
                done += got
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, lo, n, os.POSIX_FADV_DONTNEED)
            out.append(dst.view(dt).reshape(shape))
    except OSError as e:
        raise ArtifactError(f"{path.name} cannot be read ({e})") from None
    finally:
        os.close(fd)
    return out


def to_tvm(view: np.ndarray, dev: Any, copy: bool = False) -> Any:
    """`view` as a TVM tensor on `dev`: zero-copy on a CPU when it is contiguous and aligned
    and `copy` is false, else one copy into memory TVM allocates."""
    import tvm  # noqa: PLC0415  (moec.runtime imports TVM lazily)

    on_cpu = int(dev.dlpack_device_type()) == 1  # kDLCPU
    plain = view.dtype.kind != "V"  # bfloat16 / float8: numpy's DLPack takes plain dtypes only
    bits = view if plain else view.view(f"u{view.dtype.itemsize}")
    if (on_cpu and not copy and view.nbytes and view.flags.c_contiguous
            and view.ctypes.data % ALIGN == 0):
        t = tvm.runtime.from_dlpack(bits)
    elif plain:
        return tvm.runtime.tensor(np.ascontiguousarray(view), dev)
    else:
        t = tvm.runtime.tensor(np.ascontiguousarray(bits), dev)
    return t if plain else t._create_view(view.shape, view.dtype.name)


def load_mapped(path: str | Path, names: Sequence[str], dev: Any, copy: bool = False
                ) -> list[Any]:
    """The tensors `names` of the safetensors file `path` as TVM tensors on `dev`: on a CPU,
    aligned ones are views of a copy-on-write mapping of the file (no copy) unless `copy`,
    others are copied once; on a GPU each is copied once from the mapping to the device."""
    on_cpu = int(dev.dlpack_device_type()) == 1
    if copy and on_cpu:
        return [to_tvm(a, dev) for a in read_copies(path, names)]
    arrays = mapped_arrays(path)
    for name in names:
        if name not in arrays:
            raise ArtifactError(f"{Path(path).name} has no weight {name!r}")
    out = [to_tvm(arrays[name], dev, copy) for name in names]
    if not on_cpu:
        del arrays  # nothing maps the file any more: drop its pages from the page cache, so
        drop_cached(path)  # the weights are in memory once, not twice
    return out


def drop_cached(path: str | Path) -> None:
    """Ask the kernel to drop `path`'s clean, unmapped pages from the page cache (a hint; pages
    that other processes map stay). Without it a copied model holds its weights twice until
    the kernel reclaims the cache (a Qwen3-30B-A3B layer: 2.4 GB more)."""
    import os

    # No gc.collect() here: the caller dropped its views of the mapping (plain references,
    # no cycles), and a full collection cost 40-200 ms per load in a large process.
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass
    finally:
        os.close(fd)
