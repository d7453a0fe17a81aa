"""`moec compile` / `moec tune` factories for the `moec bench` layer shapes:

    moec tune benchmarks/layer_factories.py:mixtral -o moec/tuning/znver3.json
    moec compile benchmarks/layer_factories.py:qwen3 -o qwen3_layer.moec
"""

from __future__ import annotations

import torch

from moec.bench.layer import SHAPES, build_block


def _make(name: str, dtype: str = "float32"):
    """The layer's block in `dtype` (bfloat16: its weights rounded, as a bf16 checkpoint holds
    them) and an example input."""
    shape = SHAPES[name]
    return (build_block(shape, 0, dtype),
            (torch.randn(5, shape.hidden).to(getattr(torch, dtype)),))


def mixtral():
    return _make("mixtral")


def qwen3():
    return _make("qwen3")


def deepseek_v3():
    return _make("deepseek-v3")



def mixtral_bf16():
    return _make("mixtral", "bfloat16")


def qwen3_bf16():
    return _make("qwen3", "bfloat16")


def deepseek_v3_bf16():
    return _make("deepseek-v3", "bfloat16")
