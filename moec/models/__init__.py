"""Small reference MoE models in plain torch (demo, tests, benchmarks)."""

from moec.models.reference import (
    DecoderLayer,
    MoEBlock,
    RMSNorm,
    StackedExperts,
    StackedMoEBlock,
    SwiGLUExpert,
    demo_model,
    skew_router,
)

__all__ = ["DecoderLayer", "MoEBlock", "RMSNorm", "StackedExperts", "StackedMoEBlock",
           "SwiGLUExpert", "demo_model", "skew_router"]
