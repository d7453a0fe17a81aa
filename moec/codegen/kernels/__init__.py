"""moec's CPU kernel library: TVM kernel builders for the LLVM target.

Each builder takes plain Python arguments (static sizes as ints, symbolic sizes as names of int64
dims, dtype strings) and returns a `Kernel`: a destination-passing-style `tirx.PrimFunc` (inputs,
then outputs), its name, and the offline transforms its constant weights need.

| builder | args of the kernel |
|---|---|
| elementwise_unary(op, shape, dtype, **attrs) | x, y |
| elementwise_binary(op, shape_a, shape_b, dtype) | a, b, y |
| softmax(shape, axis, dtype) / reduce(op, shape, axis, keepdim, dtype) | x, y |
| rmsnorm(shape, eps, dtype) / layernorm(shape, eps, dtype) | x, w, [b], y |
| topk(shape, k, dtype) | x, values, indices |
| linear(M, K, N, dtype, bias) | x, w_packed, [b], y |
| router(H, E, k, scoring, order, norm_topk, scale, has_bias, ...) | x, w, [logit_bias], |
| | [bias], weights, ids |
| align(E, k, block_m) | ids, sorted_ids, tile_expert, slot_row |
| permute(H, k, dtype) | x, sorted_ids, xs |
| grouped_matmul(E, N, K, block_m, top_k, gather, activation, ...) | x, w, [w2], [b, b2], |
| | sorted_ids, tile_expert, out |
| combine(H, k, dtype) | y, weights, slot_row, out |
"""

from moec.codegen.kernels.base import Kernel
from moec.codegen.kernels.elementwise import elementwise_binary, elementwise_unary
from moec.codegen.kernels.grouped_matmul import grouped_matmul
from moec.codegen.kernels.grouped_matmul_quant import grouped_matmul_quant
from moec.codegen.kernels.linear import linear
from moec.codegen.kernels.reduction import layernorm, reduce, rmsnorm, softmax
from moec.codegen.kernels.router import router
from moec.codegen.kernels.routing import (
    align,
    align_sizes,
    capacity,
    combine,
    permute,
    unpermute,
)
from moec.codegen.kernels.topk import topk

__all__ = [
    "Kernel",
    "align",
    "align_sizes",
    "capacity",
    "combine",
    "elementwise_binary",
    "elementwise_unary",
    "grouped_matmul",
    "grouped_matmul_quant",
    "layernorm",
    "linear",
    "permute",
    "unpermute",
    "reduce",
    "rmsnorm",
    "router",
    "softmax",
    "topk",
]
