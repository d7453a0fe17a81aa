"""Imports every built-in pass so that they register themselves."""

from moec.passes import (  # noqa: F401
    canonicalize,
    cap_topk,
    fuse_combine,
    fuse_gating,
    fuse_rope,
    offload_experts,
    prune_experts,
    quantize_experts,
    quantize_linears,
    reorder_dispatch,
    tile_expert_gemm,
    widen_activations,
)
