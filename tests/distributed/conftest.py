"""Artifacts of the expert-parallel tests, compiled once per session (with ep=True).

- `two_layer`: two decoder layers, 4 experts, top-2, uniform (random) routing.
- `skewed`: one decoder layer, 6 experts (uneven over 4 ranks: 2, 2, 1, 1), top-2, with the
  router biased so that every token picks experts 0 and 1: only rank 0 receives rows.
- `quantized`: `two_layer`'s model with int4 experts (moe.grouped_matmul_q).
- `whole_lm`: a tiny random Mixtral causal LM (2 layers, attention, 4 experts) saved with
  transformers and compiled from its checkpoint folder (ids [T] -> logits); None without
  transformers (a test extra).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import moec
from moec.models.reference import DecoderLayer, demo_model, skew_router

HIDDEN = 64


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(3)
            self.first = DecoderLayer(HIDDEN, 96, 4, 2)
            self.second = DecoderLayer(HIDDEN, 96, 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


def skewed_model() -> nn.Module:
    module, _ = demo_model(seed=2, hidden=HIDDEN, intermediate=96, experts=6, top_k=2)
    skew_router(module, expert=0, margin=30.0)
    with torch.no_grad():
        module.mlp.gate.bias[1] = 20.0  # second choice: expert 1, for every token
    return module


@pytest.fixture(scope="session")
def two_layer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    art = moec.compile(TwoLayers().eval(), (torch.randn(8, HIDDEN),), max_tokens=256, ep=True)
    return art.save(tmp_path_factory.mktemp("ep") / "two_layer.moec")


@pytest.fixture(scope="session")
def skewed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    art = moec.compile(skewed_model(), (torch.randn(8, HIDDEN),), max_tokens=256, ep=True)
    return art.save(tmp_path_factory.mktemp("ep") / "skewed.moec")


@pytest.fixture(scope="session")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`two_layer`'s model with int4 experts in groups of 32 (scales and zero points sharded
    with their experts)."""
    art = moec.compile(TwoLayers().eval(), (torch.randn(8, HIDDEN),), max_tokens=256, ep=True,
                       quantize="int4-g32")
    return art.save(tmp_path_factory.mktemp("ep") / "quantized.moec")


VOCAB = 96


@pytest.fixture(scope="session")
def whole_lm(tmp_path_factory: pytest.TempPathFactory) -> Path | None:
    try:
        import transformers
    except ImportError:
        return None
    cfg = transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2, max_position_embeddings=128, tie_word_embeddings=False,
        intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    folder = tmp_path_factory.mktemp("ep") / "mixtral_ckpt"
    model.save_pretrained(folder)
    art = moec.compile(str(folder), max_tokens=64, ep=True)
    return art.save(tmp_path_factory.mktemp("ep") / "whole_lm.moec")
