"""CUDA kernel library: the builders of `moec.codegen.kernels` (same names, signatures and
`Kernel` results) for NVIDIA GPUs, plus `build_cuda` to compile a module to an nvcc fatbin.

| builder | kernel |
|---|---|
| elementwise_unary / _binary | fused injective loop, 256 threads per block |
| softmax, reduce, rmsnorm, layernorm | last axis: block per row, warp-shuffle allreduce; |
| | other axes: thread per row |
| topk | warp per row, k argmax passes |
| router | 4 tokens per block: logits, scoring, (grouped) top-k, renormalisation |
| align | one block: atomics count, __match_any_sync ranks place stably |
| grouped_matmul, linear | tile x N-block per thread block, gather fused into the shared |
| | memory load, WMMA tensor cores for fp16/bf16 (SIMT for float32) |
| permute, combine | fused injective gather / weighted gather-sum |

`define_*` functions return the unscheduled te definitions, which also build for the CPU: the
tests check them against the reference (the CUDA schedules are semantics-preserving
transformations of them)."""

from moec.codegen.cuda.base import Kernel
from moec.codegen.cuda.build import build_cuda, has_mma, ptxas_report
from moec.codegen.cuda.dispatch import align, combine, permute, unpermute
from moec.codegen.cuda.elementwise import elementwise_binary, elementwise_unary
from moec.codegen.cuda.gemm import grouped_matmul, linear
from moec.codegen.cuda.reduction import layernorm, reduce, rmsnorm, softmax
from moec.codegen.cuda.routing import router, topk

__all__ = ["Kernel", "align", "build_cuda", "combine", "elementwise_binary", "elementwise_unary",
           "grouped_matmul", "has_mma", "layernorm", "linear", "permute", "ptxas_report",
           "reduce", "rmsnorm", "router", "softmax", "topk", "unpermute"]
