"""CUDA kernel library: the builders of `moec.codegen.kernels` (same names, signatures and
`Kernel` results) for NVIDIA GPUs, plus `build_cuda` to compile a module to an nvcc fatbin.

| builder | kernel |
|---|---|
| elementwise_unary / _binary | fused injective loop, 256 threads per block |
| softmax, reduce, rmsnorm, layernorm | last axis: block per row, warp-shuffle allreduce; |
| | other axes: thread per row |
| topk | warp per row, k argmax passes |
| router | 4 tokens per block: logits, scoring, (grouped) top-k, renormalisation; |
| | sparsemixer: k warp-argmax rounds, each with a softmax over the near experts |
| capacity | one block walks the slots in order: per-expert running counts plus per-warp |
| | counts and __match_any_sync ranks give each slot's rank (token dropping) |
| align | one block: atomics count, __match_any_sync ranks place stably |
| grouped_matmul, linear | tile x N-block per thread block, gather fused into the shared |
| | memory load, WMMA tensor cores for fp16/bf16 (SIMT for float32) |
| grouped_matmul_quant | grouped_matmul's schedule; int8/int4 weights dequantised into the |
| | shared-memory B tile per K step (per-channel scales in the epilogue) |
| permute, combine | fused injective gather / weighted gather-sum |
| embedding, arange, unary_trig, | whole-model ops (nn.py): fused injective loops, 256 threads per |
| permute_dims, slice_axis, concat2, broadcast_to | block |
| attention | causal GQA flash attention (flash_attention.py): block per 64 query rows of a |
| | head, K/V tiles in shared memory, online float32 softmax; WMMA tensor |
| | cores for fp16/bf16 head dims in 16s (S and P.V), SIMT otherwise |
| cache_write | paged KV cache write in place (paged_attention.py, exported by nn.py like |
| | the other whole-model builders): thread per element |
| paged_attention | attention over the paged cache (paged_attention.py), SIMT, float32 |
| | online softmax: general step kernel (block per query tile x kv head, K / V |
| | tiles in shared memory) and decode kernel (block per sequence x kv head x |
| | split of the context, warps on alternate key tiles, log-sum-exp merge) |

`define_*` functions return the unscheduled te definitions, which also build for the CPU: the
tests check them against the reference (the CUDA schedules are semantics-preserving
transformations of them)."""

from moec.codegen.cuda.base import Kernel
from moec.codegen.cuda.build import build_cuda, has_mma, ptxas_report
from moec.codegen.cuda.dispatch import align, combine, permute, unpermute
from moec.codegen.cuda.elementwise import elementwise_binary, elementwise_unary
from moec.codegen.cuda.gemm import grouped_matmul, linear
from moec.codegen.cuda.gemm_quant import grouped_matmul_quant
from moec.codegen.cuda.nn import (
    arange,
    attention,
    broadcast_to,
    concat2,
    embedding,
    permute_dims,
    slice_axis,
    unary_trig,
)
from moec.codegen.cuda.reduction import layernorm, reduce, rmsnorm, softmax
from moec.codegen.cuda.routing import capacity, router, topk

__all__ = ["Kernel", "align", "arange", "attention", "broadcast_to", "build_cuda", "capacity",
           "combine", "concat2", "elementwise_binary", "elementwise_unary", "embedding",
           "grouped_matmul", "grouped_matmul_quant", "has_mma", "layernorm", "linear", "permute",
           "permute_dims", "ptxas_report", "reduce", "rmsnorm", "router", "slice_axis", "softmax",
           "topk", "unary_trig", "unpermute"]
