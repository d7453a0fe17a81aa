"""Shared fixtures of the kernel tests: compile a set of kernels once, call them on numpy arrays."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pytest
import tvm

from moec.codegen.kernels import Kernel
from moec.codegen.target import host_target


class KernelLib:
    """Kernels compiled together into one module (one `tvm.compile`, ~1 s for a test file).

    `lib(kernel, *inputs, outs=[(shape, dtype), ...], fill=None)` applies the kernel's
    arg_transforms to the inputs, copies every array into a fresh `tvm.runtime.tensor` (64-byte
    aligned; a numpy view may not be), runs it and returns the outputs as numpy arrays. Outputs
    start as `fill` when given (to see which rows a kernel leaves alone), else uninitialised."""

    def __init__(self, kernels: Iterable[Kernel]) -> None:
        self.kernels = {k.name: k for k in kernels}
        mod = tvm.IRModule({name: k.func for name, k in self.kernels.items()})
        self.ex = tvm.compile(mod, target=host_target())
        self.dev = tvm.cpu()

    def __call__(
        self,
        kernel: Kernel,
        *inputs: np.ndarray,
        outs: Sequence[tuple[tuple[int, ...], str]],
        fill: float | None = None,
    ) -> list[np.ndarray]:
        assert kernel.name in self.kernels, f"{kernel.name} was not compiled into this library"
        args = []
        for i, a in enumerate(inputs):
            fn = kernel.arg_transforms.get(i)
            args.append(tvm.runtime.tensor(np.ascontiguousarray(fn(a) if fn else a), self.dev))
        out_t = []
        for shape, dtype in outs:
            if fill is None:
                out_t.append(tvm.runtime.empty(shape, dtype, self.dev))
            else:
                out_t.append(tvm.runtime.tensor(np.full(shape, fill, dtype), self.dev))
        self.ex[kernel.name](*args, *out_t)
        return [o.numpy() for o in out_t]


@pytest.fixture(scope="session")
def kernel_lib() -> type[KernelLib]:
    return KernelLib
