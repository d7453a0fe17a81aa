"""CUDA graphs for moec calls on torch CUDA tensors: capture one call, replay it.

A decode step of an MoE layer is a handful of small kernels whose launch overhead is a large
part of its time; a CUDA graph replays them with one launch. TVM 0.27's own graph rewrite
(`RewriteCUDAGraph`) captures nothing in moec's modules, whose token dimension is dynamic, so
moec captures at the torch level instead: `tvm_ffi.use_torch_stream(torch.cuda.graph(g))`
makes TVM launch its kernels on the capturing stream. The Relax VM allocates its buffers from a
pool; the warm-up call before the capture leaves that pool holding exactly the blocks the call
needs, so the captured call allocates nothing (torch's capture would reject a cudaMalloc).

    step = moec.runtime.cuda_graph.capture(model, x_static)   # x_static: torch CUDA tensor
    y = step(x_new)        # copies x_new into x_static's buffer, replays, returns the output

The returned outputs are the graph's own buffers, overwritten by the next replay (clone them to
keep them). Shapes are fixed at capture: capture once per token count you serve (decode: a few
small counts). Not thread-safe: one graph, one set of buffers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from moec.errors import ExecutionError, InputError
from moec.runtime.inputs import is_torch_tensor, torch_module


def _stream_context(torch: Any, graph: Any) -> Any:
    import tvm_ffi  # noqa: PLC0415

    use = getattr(tvm_ffi, "use_torch_stream", None)
    if use is None:  # tvm_ffi was imported before torch: it has no torch integration
        raise ExecutionError("CUDA graph capture needs tvm_ffi's torch integration: import torch "
                             "before moec (or tvm) in this process")
    return use(torch.cuda.graph(graph))


def capture(fn: Callable[..., Any], *static_inputs: Any, warmup: int = 1
            ) -> Callable[..., Any]:
    """Capture `fn(*static_inputs)` (a CompiledModel, or any callable of torch CUDA tensors that
    runs TVM kernels) into a CUDA graph and return a function that replays it on new inputs of
    the same shapes and dtypes."""
    torch = torch_module()
    if torch is None or not static_inputs or not all(
            is_torch_tensor(x) and x.is_cuda for x in static_inputs):
        raise InputError("CUDA graph capture needs torch CUDA tensors as inputs")
    static = [x.clone() for x in static_inputs]
    for _ in range(max(1, warmup)):  # fills the VM's buffer pool for these shapes
        fn(*static)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with _stream_context(torch, graph):
            outputs = fn(*static)
    except Exception as e:  # torch raises RuntimeError for an illegal call during capture
        raise ExecutionError(f"CUDA graph capture failed: {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}") from e

    def replay(*inputs: Any) -> Any:
        if len(inputs) != len(static):
            raise InputError(f"the graph was captured with {len(static)} input(s), got "
                             f"{len(inputs)}")
        for i, (buf, x) in enumerate(zip(static, inputs, strict=True)):
            if tuple(x.shape) != tuple(buf.shape) or x.dtype != buf.dtype:
                raise InputError(f"input {i} is {tuple(x.shape)} {x.dtype}; the graph was "
                                 f"captured for {tuple(buf.shape)} {buf.dtype}: capture another")
            buf.copy_(x)
        graph.replay()
        return outputs

    replay.graph = graph  # type: ignore[attr-defined]  (keeps it alive with the function)
    return replay


def stream_context(inputs: Sequence[Any]) -> Any:
    """A context that makes TVM launch on torch's current CUDA stream when the inputs are torch
    CUDA tensors (so that a call orders correctly with the caller's stream), else a no-op."""
    import contextlib  # noqa: PLC0415

    if not inputs or not is_torch_tensor(inputs[0]) or not inputs[0].is_cuda:
        return contextlib.nullcontext()
    import tvm_ffi  # noqa: PLC0415

    use = getattr(tvm_ffi, "use_torch_stream", None)
    return use() if use is not None else contextlib.nullcontext()
