"""Named pipelines, grouped in phases. `moec compile --pipeline NAME`, or inside a pass list:
`--passes default,+my-pass`."""

PIPELINES: dict[str, str] = {
    # the full MoE pipeline: routing, then dispatch layout, then kernels-shaped ops
    "default": ",".join([
        "canonicalize",
        # phase 1: gating
        "fuse-gating",
        # phase 2: dispatch in expert-sorted tiles
        "reorder-dispatch",
        # phase 3: expert GEMMs and the combine
        "tile-expert-gemm",
        "fuse-combine",
        # phase 4: the rest of the model (rotary embeddings)
        "fuse-rope",
        "canonicalize",
    ]),
    # nothing but clean-up: lowers only graphs that are already in kernel form
    "none": "canonicalize",
}
