"""The few CUDA driver calls the GPU expert tier needs (moec.runtime.expert_store), via ctypes.

The device tier of the expert cache keeps each expert weight as one reserved range of device
virtual addresses and maps physical device memory only under the experts that are resident
(CUDA's virtual memory management: cuMemAddressReserve, cuMemCreate, cuMemMap, cuMemSetAccess,
cuMemUnmap), so the kernels read experts at fixed addresses, as on a CPU. The slow tier is pinned
host memory (cuMemHostAlloc); a load is an asynchronous host-to-device copy on a non-blocking
stream of the loading thread, waited for before the layer runs.

Everything runs in the device's primary context, the one TVM's runtime uses. `libcuda.so.1`
comes with the NVIDIA driver; `CudaDriver(lib=...)` loads another file with the same symbols
(the tests run this module against an emulation of these calls over host memory,
tests/runtime/fake_libcuda.c, which checks the preconditions the real driver documents).
"""

from __future__ import annotations

import ctypes
import threading
from ctypes import POINTER, byref, c_char_p, c_int, c_size_t, c_uint, c_ulonglong, c_void_p

from moec.errors import ExecutionError

CU_MEM_ALLOCATION_TYPE_PINNED = 1
CU_MEM_LOCATION_TYPE_DEVICE = 1
CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3
CU_MEM_ALLOC_GRANULARITY_MINIMUM = 0
CU_STREAM_NON_BLOCKING = 1


class CUmemLocation(ctypes.Structure):
    _fields_ = [("type", c_int), ("id", c_int)]


class _AllocFlags(ctypes.Structure):
    _fields_ = [("compressionType", ctypes.c_ubyte), ("gpuDirectRDMACapable", ctypes.c_ubyte),
                ("usage", ctypes.c_ushort), ("reserved", ctypes.c_ubyte * 4)]


class CUmemAllocationProp(ctypes.Structure):
    _fields_ = [("type", c_int), ("requestedHandleTypes", c_int), ("location", CUmemLocation),
                ("win32HandleMetaData", c_void_p), ("allocFlags", _AllocFlags)]


class CUmemAccessDesc(ctypes.Structure):
    _fields_ = [("location", CUmemLocation), ("flags", c_int)]


# name -> argument types (every call returns a CUresult, an int); versioned names as cuda.h
# #defines them
_SIGNATURES: dict[str, list] = {
    "cuInit": [c_uint],
    "cuDeviceGet": [POINTER(c_int), c_int],
    "cuDevicePrimaryCtxRetain": [POINTER(c_void_p), c_int],
    "cuCtxSetCurrent": [c_void_p],
    "cuCtxSynchronize": [],
    "cuGetErrorString": [c_int, POINTER(c_char_p)],
    "cuMemGetInfo_v2": [POINTER(c_size_t), POINTER(c_size_t)],
    "cuMemGetAllocationGranularity": [POINTER(c_size_t), POINTER(CUmemAllocationProp), c_int],
    "cuMemAddressReserve": [POINTER(c_ulonglong), c_size_t, c_size_t, c_ulonglong,
                            c_ulonglong],
    "cuMemAddressFree": [c_ulonglong, c_size_t],
    "cuMemCreate": [POINTER(c_ulonglong), c_size_t, POINTER(CUmemAllocationProp), c_ulonglong],
    "cuMemRelease": [c_ulonglong],
    "cuMemMap": [c_ulonglong, c_size_t, c_size_t, c_ulonglong, c_ulonglong],
    "cuMemUnmap": [c_ulonglong, c_size_t],
    "cuMemSetAccess": [c_ulonglong, c_size_t, POINTER(CUmemAccessDesc), c_size_t],
    "cuMemHostAlloc": [POINTER(c_void_p), c_size_t, c_uint],
    "cuMemFreeHost": [c_void_p],
    "cuStreamCreate": [POINTER(c_void_p), c_uint],
    "cuStreamSynchronize": [c_void_p],
    "cuMemcpyHtoDAsync_v2": [c_ulonglong, c_void_p, c_size_t, c_void_p],
    "cuMemcpyDtoH_v2": [c_void_p, c_ulonglong, c_size_t],
}


class CudaDriver:
    """Device `device_id`'s primary context, and the calls the expert tier makes in it. Every
    failing call raises ExecutionError naming the call and the driver's message."""

    def __init__(self, device_id: int = 0, lib: str = "libcuda.so.1") -> None:
        try:
            self._lib = ctypes.CDLL(lib)
        except OSError as e:
            raise ExecutionError(f"the GPU expert tier needs the NVIDIA driver ({lib}: {e})"
                                 ) from None
        for name, args in _SIGNATURES.items():
            try:
                fn = getattr(self._lib, name)
            except AttributeError:
                raise ExecutionError(f"{lib} has no {name}: the GPU expert tier needs CUDA's "
                                     f"virtual memory management (driver 10.2 or newer)"
                                     ) from None
            fn.argtypes, fn.restype = args, c_int
        self.device_id = int(device_id)
        self._call("cuInit", 0)
        dev = c_int()
        self._call("cuDeviceGet", byref(dev), self.device_id)
        self._ctx = c_void_p()
        self._call("cuDevicePrimaryCtxRetain", byref(self._ctx), dev.value)
        self._local = threading.local()
        self._enter()
        self._loc = CUmemLocation(CU_MEM_LOCATION_TYPE_DEVICE, self.device_id)
        self._prop = CUmemAllocationProp(type=CU_MEM_ALLOCATION_TYPE_PINNED, location=self._loc)
        self._access = CUmemAccessDesc(self._loc, CU_MEM_ACCESS_FLAGS_PROT_READWRITE)
        g = c_size_t()
        self._call("cuMemGetAllocationGranularity", byref(g), byref(self._prop),
                   CU_MEM_ALLOC_GRANULARITY_MINIMUM)
        self.granularity = int(g.value)

    def _call(self, name: str, *args: object) -> None:
        rc = getattr(self._lib, name)(*args)
        if rc:
            msg = c_char_p()
            self._lib.cuGetErrorString(rc, byref(msg))
            text = msg.value.decode(errors="replace") if msg.value else "unknown error"
            raise ExecutionError(f"CUDA driver call {name} failed: {text} (CUresult {rc})")

    def _enter(self) -> None:
        """Make the primary context current in the calling thread (once per thread)."""
        if getattr(self._local, "ctx", None) is None:
            self._call("cuCtxSetCurrent", self._ctx)
            self._local.ctx = self._ctx

    # -------------------------------------------------------------- address space
    def reserve(self, size: int) -> int:
        """A range of `size` device virtual addresses (a multiple of the granularity)."""
        self._enter()
        ptr = c_ulonglong()
        self._call("cuMemAddressReserve", byref(ptr), size, self.granularity, 0, 0)
        return int(ptr.value)

    def free_address(self, ptr: int, size: int) -> None:
        self._enter()
        self._call("cuMemAddressFree", ptr, size)

    def create(self, size: int) -> int:
        """A physical allocation of `size` bytes of device memory (a handle)."""
        self._enter()
        h = c_ulonglong()
        self._call("cuMemCreate", byref(h), size, byref(self._prop), 0)
        return int(h.value)

    def release(self, handle: int) -> None:
        self._enter()
        self._call("cuMemRelease", handle)

    def map(self, ptr: int, size: int, handle: int) -> None:
        """Map the physical allocation `handle` at `ptr`, readable and writable by the device."""
        self._enter()
        self._call("cuMemMap", ptr, size, 0, handle, 0)
        self._call("cuMemSetAccess", ptr, size, byref(self._access), 1)

    def unmap(self, ptr: int, size: int) -> None:
        self._enter()
        self._call("cuMemUnmap", ptr, size)

    # -------------------------------------------------------------- host memory, copies
    def host_alloc(self, size: int) -> int:
        """`size` bytes of pinned (page-locked) host memory."""
        self._enter()
        p = c_void_p()
        self._call("cuMemHostAlloc", byref(p), size, 0)
        return int(p.value or 0)

    def free_host(self, ptr: int) -> None:
        self._enter()
        self._call("cuMemFreeHost", c_void_p(ptr))

    def copy_to_device(self, dst: int, src: int, size: int) -> None:
        """Copy `size` bytes from pinned host `src` to device `dst` on this thread's own
        non-blocking stream, and wait for it (other threads' copies and the model's kernels
        proceed meanwhile)."""
        self._enter()
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = c_void_p()
            self._call("cuStreamCreate", byref(stream), CU_STREAM_NON_BLOCKING)
            self._local.stream = stream
        self._call("cuMemcpyHtoDAsync_v2", dst, c_void_p(src), size, stream)
        self._call("cuStreamSynchronize", stream)

    def copy_to_host(self, dst: int, src: int, size: int) -> None:
        """Copy `size` bytes from device `src` to host `dst` (synchronous; for checks)."""
        self._enter()
        self._call("cuMemcpyDtoH_v2", c_void_p(dst), src, size)

    def synchronize(self) -> None:
        """Wait for all work in the context (before memory the kernels may read is unmapped)."""
        self._enter()
        self._call("cuCtxSynchronize")

    def mem_info(self) -> tuple[int, int]:
        """(free, total) device memory in bytes."""
        self._enter()
        free, total = c_size_t(), c_size_t()
        self._call("cuMemGetInfo_v2", byref(free), byref(total))
        return int(free.value), int(total.value)
