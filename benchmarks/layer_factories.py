"""`moec compile` / `moec tune` factories for the `moec bench` layer shapes:

    moec tune benchmarks/layer_factories.py:mixtral -o moec/tuning/znver3.json
    moec compile benchmarks/layer_factories.py:qwen3 -o qwen3_layer.moec
"""

from __future__ import annotations

import torch

from moec.bench.layer import SHAPES, build_block


def _make(name: str):
    shape = SHAPES[name]
    return build_block(shape), (torch.randn(5, shape.hidden),)


def mixtral():
    return _make("mixtral")


def qwen3():
    return _make("qwen3")


def deepseek_v3():
    return _make("deepseek-v3")


def _make_bf16(name: str):
    """The same layer as a bf16 block (its weights rounded, as a bf16 checkpoint holds them)."""
    shape = SHAPES[name]
    return build_block(shape, 0, "bfloat16"), (torch.randn(5, shape.hidden).bfloat16(),)


def mixtral_bf16():
    return _make_bf16("mixtral")


def qwen3_bf16():
    return _make_bf16("qwen3")


def deepseek_v3_bf16():
    return _make_bf16("deepseek-v3")
