"""Tiny random-weight causal LMs of every MoE family moec generates with, for the tests and
benchmarks/hf_generate_report.py: `config(family)` and `model(family, seed)`."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

V = 128
COMMON = dict(vocab_size=V, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
              num_hidden_layers=2, max_position_embeddings=512, tie_word_embeddings=False,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "phimoe", "granitemoe",
            "deepseek_v2", "deepseek_v3", "llama4_text", "gpt_oss", "dbrx", "jetmoe")
GENERATING = tuple(f for f in FAMILIES if f != "jetmoe")  # JetMoE: MoA attention, refused


ROPE_VARIANTS = {  # rope_parameters of the rotary variants the families' configs use
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 128},
}


def config(family: str) -> transformers.PretrainedConfig:
    """`family`, or `qwen3_moe:<rope variant>` (ROPE_VARIANTS) for a rotary variant."""
    t = transformers
    if ":" in family:
        base, rope = family.split(":")
        cfg = config(base)
        cfg.rope_parameters = {**ROPE_VARIANTS[rope], "rope_theta": 10000.0}
        return cfg
    if family == "mixtral":
        return t.MixtralConfig(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
                               **COMMON)
    if family == "qwen2_moe":
        return t.Qwen2MoeConfig(moe_intermediate_size=24, shared_expert_intermediate_size=40,
                                intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                                **COMMON)
    if family == "qwen3_moe":  # q/k RMSNorm per head, head_dim != hidden / heads
        return t.Qwen3MoeConfig(moe_intermediate_size=24, intermediate_size=64, num_experts=8,
                                num_experts_per_tok=2, head_dim=16, norm_topk_prob=True,
                                **COMMON)
    if family == "olmoe":
        return t.OlmoeConfig(intermediate_size=24, num_experts=8, num_experts_per_tok=2,
                             **COMMON)
    if family == "phimoe":
        return t.PhimoeConfig(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
                              **COMMON)
    if family == "granitemoe":
        return t.GraniteMoeConfig(intermediate_size=48, num_local_experts=4,
                                  num_experts_per_tok=2, **COMMON)
    if family == "deepseek_v2":
        return t.DeepseekV2Config(
            moe_intermediate_size=24, intermediate_size=64, n_routed_experts=8,
            num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
            n_shared_experts=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
            qk_nope_head_dim=8, v_head_dim=12, topk_method="group_limited_greedy",
            **{**COMMON, "num_key_value_heads": 4})
    if family == "deepseek_v3":  # MLA: q/kv LoRA, rope on a split of the head dim, Dv != Dqk
        return t.DeepseekV3Config(
            moe_intermediate_size=24, intermediate_size=64, n_routed_experts=8,
            num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
            n_shared_experts=1, routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=24,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12,
            **{**COMMON, "num_key_value_heads": 4})
    if family == "llama4_text":  # 4 layers: chunked attention on 0-2, NoPE layer 3
        return t.Llama4TextConfig(intermediate_size=48, intermediate_size_mlp=64,
                                  num_local_experts=4, num_experts_per_tok=1, head_dim=8,
                                  attention_chunk_size=16, floor_scale=160,
                                  **{**COMMON, "num_hidden_layers": 4})
    if family == "gpt_oss":  # sinks, alternating sliding-window layers
        return t.GptOssConfig(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                              head_dim=8, sliding_window=8, **COMMON)
    if family == "dbrx":
        return t.DbrxConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=512, vocab_size=V,
                            attn_config={"kv_n_heads": 2, "clip_qkv": 8.0, "rope_theta": 10000.0},
                            ffn_config={"ffn_hidden_size": 48, "moe_num_experts": 4,
                                        "moe_top_k": 2},
                            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                            pad_token_id=0)
    if family == "jetmoe":
        return t.JetMoeConfig(hidden_size=32, num_hidden_layers=2, num_key_value_heads=2,
                              kv_channels=8, intermediate_size=48, num_local_experts=4,
                              num_experts_per_tok=2, vocab_size=V, max_position_embeddings=512,
                              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    raise KeyError(family)


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights of a trained model's scale (random init leaves norms at 1 and some biases at
    0, which would hide mistakes)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if not t.is_floating_point() or "inv_freq" in name:
                continue
            if "norm" in name or "layernorm" in name:
                t.copy_(1.0 + 0.1 * torch.randn(t.shape, generator=gen))
            elif t.dim() == 1:
                t.copy_(0.5 * torch.randn(t.shape, generator=gen))
            else:
                t.copy_(torch.randn(t.shape, generator=gen) * t.shape[-1] ** -0.5)
    return model.eval()


def model(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomize(transformers.AutoModelForCausalLM.from_config(config(family)), seed)


MAX_TOKENS = 64  # prompts longer than this are prefilled in chunks


def compile_family(family: str, tmp: Path, **kw):
    """(transformers model, artifact path) of a family's tiny checkpoint."""
    import moec

    m = model(family)
    m.save_pretrained(tmp / "ckpt")
    out = tmp / "model.moec"
    moec.compile(str(tmp / "ckpt"), max_tokens=kw.pop("max_tokens", MAX_TOKENS), **kw).save(out)
    return m, out
