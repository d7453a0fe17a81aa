"""Where the expert cache (moec.runtime.expert_cache) keeps experts: the memory tiers.

A store holds every routed expert weight of a loaded artifact at a fixed address that the
kernels are given once, and makes an expert's bytes present there (`load`) or absent (`evict`)
as the cache decides. The cache charges each expert `charge(ranges)` bytes against the budget;
a store guarantees that the memory it holds for experts never exceeds the sum of the charges
of the experts loaded or loading.

- `MappedFileStore` (CPU): the experts are views of a private mapping of the weights file;
  a load reads the expert's bytes into their place with pread and drops the page cache's copy,
  an eviction discards the pages (madvise DONTNEED). Charge: the expert's bytes.
- `DeviceStore` (GPU): each expert weight is a reserved range of device virtual addresses
  (moec.runtime.cuda_driver) with physical device memory mapped only under resident experts,
  in granules of the driver's allocation granularity (2 MiB on current GPUs); the slow tier is
  pinned host memory holding every expert, filled from the weights file at load, or with
  `from_disk` the weights file itself (for experts that do not fit in host memory either: a
  load reads the expert through a small pinned staging buffer per loading thread and drops the
  page cache's copy); a load maps the expert's granules and copies its bytes host-to-device.
  Experts of one weight are packed back to back, so neighbours may share a granule: a
  granule is mapped while any expert touching it is, and each expert is charged every granule
  it touches (at most two more than its bytes need per weight; small experts pay
  proportionally more). Physical granules are
  recycled, so the device memory held is the most ever mapped at once, within the budget.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from moec.errors import ArtifactError, ExecutionError

PAGE = mmap.PAGESIZE
Ranges = list[tuple[int, int]]  # (file offset, bytes) of each of an expert's weight slices


def pread_all(fd: int, dst: memoryview, off: int, path: Path) -> None:
    """Fill `dst` with the file's bytes from `off` (pread until done)."""
    got, n = 0, len(dst)
    while got < n:
        k = os.preadv(fd, [dst[got:]], off + got)
        if k <= 0:
            raise ArtifactError(f"{path.name}: short read at byte {off + got}")
        got += k


class MappedFileStore:
    """The experts as views of a private mapping of the weights file (module doc)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        try:  # no readahead: a read brings in its expert's bytes only, which load then drops
            # from the page cache (readahead beyond them stayed cached, outside the budget)
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_RANDOM)
        except OSError:
            pass
        size = os.fstat(self._fd).st_size
        self._map = mmap.mmap(self._fd, size, flags=mmap.MAP_PRIVATE,
                              prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._buf = np.frombuffer(self._map, dtype=np.uint8)

    def address_range(self) -> tuple[int, int]:
        """[start, end) of the mapping in this process's address space (where the experts'
        resident pages are: for memory accounting)."""
        base = int(self._buf.ctypes.data)
        return base, base + -(-len(self._buf) // PAGE) * PAGE  # whole pages, as mapped

    def charge(self, ranges: Ranges) -> int:
        return sum(n for _, n in ranges)

    def view(self, lo: int, hi: int) -> np.ndarray:
        """File bytes [lo, hi) in the private mapping (nothing is read)."""
        return self._buf[lo:hi]

    def tensor(self, lo: int, hi: int, shape: tuple[int, ...], dtype: np.dtype, dev: Any
               ) -> Any:
        from moec.runtime.weights import to_tvm  # noqa: PLC0415

        return to_tvm(self.view(lo, hi).view(dtype).reshape(shape), dev, copy=False)

    def load(self, ranges: Ranges) -> None:
        for off, n in ranges:
            pread_all(self._fd, memoryview(self._map)[off:off + n], off, self.path)
            try:  # the page cache's copy is not ours to keep: the budget is what we hold
                os.posix_fadvise(self._fd, off, n, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass

    def evict(self, ranges: Ranges) -> None:
        for off, n in ranges:
            lo = -(-off // PAGE) * PAGE  # only pages entirely inside the expert's bytes
            hi = (off + n) // PAGE * PAGE
            if hi > lo:
                self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def close(self) -> None:
        pass  # the mapping lives as long as the tensors that view it


class _Weight:
    """One expert weight in the device store: file bytes [lo, hi), a reserved device range at
    `base`, its pinned host copy at `host`."""

    def __init__(self, lo: int, hi: int, base: int, reserved: int, host: int) -> None:
        self.lo, self.hi, self.base, self.reserved, self.host = lo, hi, base, reserved, host


STAGING = 8 << 20  # bytes of pinned host memory per loading thread (from_disk)


class DeviceStore:
    """The experts in device memory under a budget, pinned host memory or the weights file
    behind (module doc). `driver`: a moec.runtime.cuda_driver.CudaDriver (or an object with
    its methods)."""

    def __init__(self, driver: Any, path: Path, spans: dict[str, tuple[int, int]],
                 from_disk: bool = False) -> None:
        self.driver, self.path, self.from_disk = driver, Path(path), bool(from_disk)
        self._fd = -1
        self._local = threading.local()
        self._staging: list[int] = []  # every loading thread's buffer (from_disk)
        self.granule = int(driver.granularity)
        self._weights: dict[str, _Weight] = {}
        self._order: list[_Weight] = []  # by file offset, for locating a range
        self._starts: list[int] = []  # their first bytes
        self._lock = threading.Lock()
        self._mapped: dict[tuple[int, int], list[int]] = {}  # (weight, granule) -> [handle, n]
        self._free: list[int] = []  # physical granules not mapped now, for reuse
        self.handles = 0  # physical granules made (device memory held: handles * granule)
        self.peak_mapped = 0
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
            if self.from_disk:
                try:  # no readahead: a read brings in its expert's bytes only
                    os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_RANDOM)
                except OSError:
                    pass
            for name, (lo, hi) in sorted(spans.items(), key=lambda kv: kv[1]):
                n = hi - lo
                reserved = -(-n // self.granule) * self.granule
                w = _Weight(lo, hi, driver.reserve(reserved), reserved, 0)
                self._weights[name] = w
                self._order.append(w)
                self._starts.append(lo)
                if not self.from_disk:
                    w.host = driver.host_alloc(n)
                    self._pread(w.host, lo, n)
        except BaseException:
            self.close()
            raise

    def _pread(self, dst: int, off: int, n: int) -> None:
        pread_all(self._fd, memoryview((ctypes.c_ubyte * n).from_address(dst)).cast("B"), off,
                  self.path)

    def _from_file(self, dst: int, off: int, n: int) -> None:
        """Copy file bytes [off, off + n) to device `dst` through this thread's staging
        buffer, then drop the page cache's copy (the host keeps none of the experts)."""
        stage = getattr(self._local, "stage", None)
        if stage is None:
            stage = self._local.stage = self.driver.host_alloc(STAGING)
            with self._lock:
                self._staging.append(stage)
        done = 0
        while done < n:
            k = min(STAGING, n - done)
            self._pread(stage, off + done, k)
            self.driver.copy_to_device(dst + done, stage, k)
            done += k
        try:
            os.posix_fadvise(self._fd, off, n, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass

    def _granules(self, ranges: Ranges) -> set[tuple[int, int]]:
        out = set()
        for off, n in ranges:
            i = self._locate(off, n)
            rel = off - self._order[i].lo
            out.update((i, g) for g in range(rel // self.granule,
                                             -(-(rel + n) // self.granule)))
        return out

    def _locate(self, off: int, n: int) -> int:
        i = bisect.bisect_right(self._starts, off) - 1  # the weights by file offset
        if i >= 0 and off + n <= self._order[i].hi:
            return i
        raise ArtifactError(f"{self.path.name}: bytes {off}..{off + n} are in no expert weight")

    def charge(self, ranges: Ranges) -> int:
        return len(self._granules(ranges)) * self.granule

    def tensor(self, lo: int, hi: int, shape: tuple[int, ...], dtype: np.dtype, dev: Any
               ) -> Any:
        w = self._order[self._locate(lo, hi - lo)]
        return dlpack_tensor(w.base, hi - lo, shape, dtype, dev)

    def load(self, ranges: Ranges) -> None:
        d, g = self.driver, self.granule
        with self._lock:
            for i, j in sorted(self._granules(ranges)):
                slot = self._mapped.get((i, j))
                if slot is None:
                    if self._free:
                        h = self._free.pop()
                    else:
                        h = d.create(g)
                        self.handles += 1
                    d.map(self._order[i].base + j * g, g, h)
                    slot = self._mapped[(i, j)] = [h, 0]
                slot[1] += 1
            self.peak_mapped = max(self.peak_mapped, len(self._mapped))
        for off, n in ranges:  # outside the lock: another expert's copy may run meanwhile
            w = self._order[self._locate(off, n)]
            if self.from_disk:
                self._from_file(w.base + off - w.lo, off, n)
            else:
                d.copy_to_device(w.base + off - w.lo, w.host + off - w.lo, n)

    def evict(self, ranges: Ranges) -> None:
        d, g = self.driver, self.granule
        with self._lock:
            gone = []
            for key in self._granules(ranges):
                slot = self._mapped[key]
                slot[1] -= 1
                if slot[1] == 0:
                    gone.append(key)
            if gone:
                d.synchronize()  # no kernel still reading what is unmapped
            for i, j in gone:
                d.unmap(self._order[i].base + j * g, g)
                self._free.append(self._mapped.pop((i, j))[0])

    def close(self) -> None:
        """Unmap and free everything; nothing may run on the tensors over the reserved ranges
        afterwards. Best effort: a driver call that fails (e.g. at interpreter exit, after the
        driver has shut down, when the context's memory goes anyway) does not stop the rest."""
        d, g = self.driver, self.granule

        def attempt(fn: Any, *args: Any) -> None:
            try:
                fn(*args)
            except ExecutionError:
                pass

        with self._lock:
            for (i, j), (h, _) in self._mapped.items():
                attempt(d.unmap, self._order[i].base + j * g, g)
                self._free.append(h)
            self._mapped.clear()
            for h in self._free:
                attempt(d.release, h)
            self._free.clear()
            for w in self._order:
                if w.host:
                    attempt(d.free_host, w.host)
                attempt(d.free_address, w.base, w.reserved)
            self._order.clear()
            self._starts.clear()
            self._weights.clear()
            for stage in self._staging:
                attempt(d.free_host, stage)
            self._staging.clear()
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


# ---------------------------------------------------------------------------- DLPack


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", _DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


_DELETER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p),
                ("deleter", _DELETER)]


_KEEP: dict[int, Any] = {}  # managed tensors handed out, alive until their consumer lets go


@_DELETER
def _release(managed: int) -> None:
    _KEEP.pop(int(managed or 0), None)


class _Exporter:
    """A DLPack producer over raw memory the caller keeps alive (uint8, one dimension)."""

    def __init__(self, ptr: int, nbytes: int, device_type: int, device_id: int) -> None:
        self.ptr, self.nbytes, self.dev = ptr, nbytes, (device_type, device_id)

    def __dlpack_device__(self) -> tuple[int, int]:
        return self.dev

    def __dlpack__(self, stream: Any = None, **_: Any) -> Any:
        shape = (ctypes.c_int64 * 1)(self.nbytes)
        m = _DLManagedTensor()
        m.dl_tensor = _DLTensor(ctypes.c_void_p(self.ptr), _DLDevice(*self.dev), 1,
                                _DLDataType(1, 8, 1), shape, None, 0)  # kDLUInt, 8 bits
        m.deleter = _release
        _KEEP[ctypes.addressof(m)] = (m, shape)
        new = ctypes.pythonapi.PyCapsule_New
        new.restype, new.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_char_p,
                                                       ctypes.c_void_p]
        return new(ctypes.addressof(m), b"dltensor", None)


def dlpack_tensor(ptr: int, nbytes: int, shape: tuple[int, ...], dtype: np.dtype, dev: Any
                  ) -> Any:
    """A TVM tensor of `shape` and `dtype` over `nbytes` of memory at `ptr` on `dev` (no copy;
    the memory must outlive the tensor)."""
    import tvm  # noqa: PLC0415  (moec.runtime imports TVM lazily)

    exporter = _Exporter(ptr, nbytes, int(dev.dlpack_device_type()), int(dev.index))
    t = tvm.runtime.from_dlpack(exporter)
    return t._create_view(tuple(int(s) for s in shape), np.dtype(dtype).name)
