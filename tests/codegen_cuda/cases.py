"""Representative kernels of the CUDA library (Mixtral/DeepSeek-like shapes, shrunk where the
size does not change the generated code), shared by the build, CPU and GPU tests."""

from __future__ import annotations

from moec.codegen import cuda as C
from moec.codegen.cuda.base import Kernel

# DeepSeek-V2-Lite-like expert block: 64 experts, top-6, H=2048, I=1408
E, K_TOP, H, I, BM = 64, 6, 2048, 1408, 64


def kernel_set(dtype: str) -> list[Kernel]:
    """One kernel per builder (and per distinct schedule) in `dtype`."""
    return [
        C.elementwise_unary("silu", ("T", 1024), dtype),
        C.elementwise_unary("gelu", ("T", 1024), dtype, approximate="tanh"),
        C.elementwise_unary("cast", ("T", 1024), dtype, to="float32"),
        C.elementwise_binary("mul", ("T", 1024), (1024,), dtype),
        C.softmax(("T", 64), -1, dtype),
        C.reduce("sum", ("T", 8, 256), 1, False, dtype),
        C.rmsnorm(("T", H), 1e-6, dtype),
        C.layernorm(("T", 1024), 1e-5, dtype),
        C.topk(("T", E), K_TOP, dtype),
        C.linear("T", H, 1024, dtype, True),
        C.router(H, E, K_TOP, "softmax", "score_topk", False, 1.0, False, 1, 1, "max", dtype),
        C.router(H, 256, 8, "sigmoid", "score_topk", True, 2.5, True, 8, 4, "top2_sum", dtype),
        C.align(E, K_TOP, BM),
        C.grouped_matmul(E, I, H, BM, K_TOP, True, "silu_mul", dtype),
        C.grouped_matmul(E, H, I, BM, K_TOP, False, "none", dtype),
        # decode-size tiles, GPT-OSS's biased clamped SwiGLU
        C.grouped_matmul(8, 512, 256, 16, 2, True, "clamped_swiglu_mul", dtype, bias=True),
        C.permute(H, K_TOP, dtype),
        C.unpermute(H, K_TOP, dtype),
        C.combine(H, K_TOP, dtype),
    ]


def float32_set() -> list[Kernel]:
    """The float32 kernels whose schedules differ from fp16/bf16 (SIMT GEMMs)."""
    return [
        C.grouped_matmul(E, I, H, BM, K_TOP, True, "silu_mul", "float32"),
        C.linear("T", H, 1024, "float32", False),
        C.router(H, E, K_TOP, "softmax", "topk_score", False, 1.0, False, 1, 1, "max",
                 "float32"),
        C.softmax(("T", 64), 0, "float32"),
    ]


def sm80_set() -> list[Kernel]:
    return [
        C.grouped_matmul(E, I, H, BM, K_TOP, True, "silu_mul", "bfloat16"),
        C.router(H, E, K_TOP, "softmax", "score_topk", True, 1.0, False, 1, 1, "max",
                 "bfloat16"),
        C.align(E, K_TOP, BM),
    ]
