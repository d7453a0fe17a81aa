"""Tiny random-weight sparse-MoE blocks of the Hugging Face transformers families (no network).

`FAMILIES[name]` is (experts implementations transformers offers for the family, builder); the
builder takes the experts implementation and returns the block in eval mode with every parameter
and buffer drawn at random (transformers leaves many `torch.empty`, and zero-initialised biases
would hide whether a bias is used). `skewed_tokens(block, n)` gives inputs that send every token
to the same expert first (load imbalance).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

H, I, E, K = 32, 48, 8, 2
ALL_IMPLS = ("eager", "grouped_mm", "batched_mm")
EAGER = ("eager",)


def _init(block: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in [*block.named_parameters(), *block.named_buffers()]:
            if not t.is_floating_point():
                continue
            if t.dim() == 1:
                std = 0.5 if "correction" in name else 0.1
            else:  # about unit-scale activations whichever way the weight is laid out
                std = 1.2 * (t.shape[-1] * t.shape[-2]) ** -0.25
            t.copy_(torch.randn(t.shape, generator=gen) * std)
    return block.eval()


def _mixtral(impl: str) -> nn.Module:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E,
                        num_experts_per_tok=K, experts_implementation=impl)
    return MixtralSparseMoeBlock(cfg)


def _qwen2_moe(impl: str) -> nn.Module:
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    cfg = Qwen2MoeConfig(hidden_size=H, moe_intermediate_size=I, shared_expert_intermediate_size=40,
                         num_experts=E, num_experts_per_tok=K, norm_topk_prob=False,
                         experts_implementation=impl)
    return Qwen2MoeSparseMoeBlock(cfg)


def _qwen3_moe(impl: str) -> nn.Module:
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E,
                         num_experts_per_tok=K, norm_topk_prob=True, experts_implementation=impl)
    return Qwen3MoeSparseMoeBlock(cfg)


def _olmoe(impl: str) -> nn.Module:
    from transformers import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

    cfg = OlmoeConfig(hidden_size=H, intermediate_size=I, num_experts=E, num_experts_per_tok=K,
                      experts_implementation=impl)
    return OlmoeSparseMoeBlock(cfg)


def _phimoe(impl: str) -> nn.Module:
    from transformers import PhimoeConfig
    from transformers.models.phimoe.modeling_phimoe import PhimoeSparseMoeBlock

    cfg = PhimoeConfig(hidden_size=H, intermediate_size=I, num_local_experts=E,
                       num_experts_per_tok=K, router_jitter_noise=0.1,
                       experts_implementation=impl)
    return PhimoeSparseMoeBlock(cfg)


def _granitemoe(impl: str) -> nn.Module:
    from transformers import GraniteMoeConfig
    from transformers.models.granitemoe.modeling_granitemoe import GraniteMoeMoE

    cfg = GraniteMoeConfig(hidden_size=H, intermediate_size=I, num_local_experts=E,
                           num_experts_per_tok=K, experts_implementation=impl)
    return GraniteMoeMoE(cfg)


def _deepseek_v2(impl: str) -> nn.Module:
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe

    cfg = DeepseekV2Config(hidden_size=H, moe_intermediate_size=I, n_routed_experts=E,
                           num_experts_per_tok=K, n_shared_experts=1,
                           topk_method="group_limited_greedy", n_group=4, topk_group=2,
                           routed_scaling_factor=1.5, experts_implementation=impl)
    return DeepseekV2Moe(cfg)


def _deepseek_v3(impl: str) -> nn.Module:
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    cfg = DeepseekV3Config(hidden_size=H, moe_intermediate_size=I, n_routed_experts=E,
                           num_experts_per_tok=K, n_shared_experts=1, n_group=4, topk_group=2,
                           routed_scaling_factor=2.5, norm_topk_prob=True,
                           experts_implementation=impl)
    return DeepseekV3MoE(cfg)


def _llama4(impl: str) -> nn.Module:
    from transformers import Llama4TextConfig
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    cfg = Llama4TextConfig(hidden_size=H, intermediate_size=I, num_local_experts=E,
                           num_experts_per_tok=1)
    return Llama4TextMoe(cfg)


def _gpt_oss(impl: str) -> nn.Module:
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    cfg = GptOssConfig(hidden_size=H, intermediate_size=I, num_local_experts=E,
                       num_experts_per_tok=K, swiglu_limit=1.5, experts_implementation=impl)
    return GptOssMLP(cfg)


def _switch(impl: str) -> nn.Module:
    from transformers import SwitchTransformersConfig
    from transformers.models.switch_transformers.modeling_switch_transformers import (
        SwitchTransformersSparseMLP,
    )

    cfg = SwitchTransformersConfig(d_model=H, d_ff=I, num_experts=E, expert_capacity=24)
    return SwitchTransformersSparseMLP(cfg)


def _dbrx(impl: str) -> nn.Module:
    from transformers import DbrxConfig
    from transformers.models.dbrx.modeling_dbrx import DbrxFFN

    cfg = DbrxConfig(d_model=H, ffn_config={"ffn_hidden_size": I, "moe_num_experts": E,
                                            "moe_top_k": K})
    return DbrxFFN(cfg)


def _jetmoe(impl: str) -> nn.Module:
    from transformers import JetMoeConfig
    from transformers.models.jetmoe.modeling_jetmoe import JetMoeMoE

    cfg = JetMoeConfig(hidden_size=H, intermediate_size=I, num_local_experts=E,
                       num_experts_per_tok=K)
    return JetMoeMoE(cfg)


FAMILIES: dict[str, tuple[tuple[str, ...], Callable[[str], nn.Module]]] = {
    "mixtral": (ALL_IMPLS, _mixtral),
    "qwen2_moe": (ALL_IMPLS, _qwen2_moe),
    "qwen3_moe": (ALL_IMPLS, _qwen3_moe),
    "olmoe": (ALL_IMPLS, _olmoe),
    "phimoe": (ALL_IMPLS, _phimoe),
    "granitemoe": (ALL_IMPLS, _granitemoe),
    "deepseek_v2": (ALL_IMPLS, _deepseek_v2),
    "deepseek_v3": (ALL_IMPLS, _deepseek_v3),
    "llama4": (EAGER, _llama4),
    "gpt_oss": (ALL_IMPLS, _gpt_oss),
    "switch_transformers": (EAGER, _switch),
    "dbrx": (EAGER, _dbrx),
    "jetmoe": (EAGER, _jetmoe),
}


def build(family: str, impl: str = "eager", seed: int = 0) -> nn.Module:
    """The family's block with random weights, running the experts with `impl`."""
    return _init(FAMILIES[family][1](impl), seed)


def offers_experts_implementations(block: nn.Module) -> bool:
    """Whether transformers lets this block's experts switch implementation (the experts class
    is wrapped by `use_experts_implementation`)."""
    return any(hasattr(m, "_is_expert_parallel") for m in block.modules())


def set_experts_implementation(block: nn.Module, impl: str) -> None:
    """Switch the experts implementation of an already built block (config is shared)."""
    for m in block.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_experts_implementation"):
            cfg._experts_implementation = impl


def skewed_tokens(block: nn.Module, n: int, seed: int = 1) -> torch.Tensor:
    """[n, H] tokens that all lean towards one direction, so that they pick the same experts."""
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(H, generator=gen)
    return 2.0 * direction / direction.norm() * H ** 0.5 + 0.3 * torch.randn(n, H, generator=gen)


def reference(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """transformers' own output for x [T, H] (blocks take [batch, seq, H]), as [T, H]."""
    with torch.no_grad():
        out = block(x[None])
    out = out[0] if isinstance(out, tuple) else out
    return out.reshape(x.shape)


def reference_bsh(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """transformers' output (the first of a tuple) for x [B, S, H], in the shape the block
    returns. Some blocks fail on an empty batch (DBRX: `view(0, -1, H)`); their output for it
    is the empty tensor of the shape they return for one sequence, with the batch taken away."""
    with torch.no_grad():
        try:
            out = block(x)
        except RuntimeError:
            if x.numel():
                raise
            one = block(torch.zeros(1, *x.shape[1:]))
            one = one[0] if isinstance(one, tuple) else one
            return torch.zeros((0, *one.shape[1:]) if one.dim() == 3 else (0, one.shape[-1]))
    return out[0] if isinstance(out, tuple) else out
