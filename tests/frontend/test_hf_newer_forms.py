"""transformers (5.23) MoE blocks with the forms of issue 17 §2 items 4 and 6, compiled against
transformers' own eager output (fp32, max relative error <= 1e-4) at T = 0, 1, 37 and on skewed
tokens: HY-V4's and DeepSeek-V4's experts clamp without alpha and +1 (silu(min(g, L)) *
clamp(u, -L, L)); LongCat-Flash routes to E FFN experts and Z zero-computation (identity) experts whose gate/up
weight is allocated for all E + Z. Tiny configs, random weights (hf_families._init)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is a test extra")

from hf_families import H, I, _init, skewed_tokens  # noqa: E402

from moec.frontend import find_moe_blocks  # noqa: E402


def _hy_v4() -> torch.nn.Module:
    from transformers.models.hy_v4.modeling_hy_v4 import HYV4MoE

    cfg = transformers.HYV4Config(hidden_size=H, moe_intermediate_size=I, n_routed_experts=8,
                                  num_local_experts=8, num_experts_per_tok=2, swiglu_limit=0.8,
                                  experts_implementation="eager")
    return _init(HYV4MoE(cfg), 0)


def _deepseek_v4() -> torch.nn.Module:
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4SparseMoeBlock

    cfg = transformers.DeepseekV4Config(hidden_size=H, intermediate_size=I,
                                        moe_intermediate_size=I, n_routed_experts=8,
                                        num_local_experts=8, num_experts_per_tok=2,
                                        swiglu_limit=0.8, mlp_layer_types=["moe"],
                                        num_hidden_layers=1, experts_implementation="eager")
    return _init(DeepseekV4SparseMoeBlock(cfg, 0), 2)


def _longcat_flash() -> torch.nn.Module:
    from transformers.models.longcat_flash.modeling_longcat_flash import LongcatFlashMoE

    cfg = transformers.LongcatFlashConfig(hidden_size=H, expert_ffn_hidden_size=I,
                                          n_routed_experts=8, zero_expert_num=2, moe_topk=2,
                                          routed_scaling_factor=1.5)
    return _init(LongcatFlashMoE(cfg), 1)


BLOCKS = {
    "hy_v4": (_hy_v4, dict(activation="clamped_swiglu", alpha=1.0, limit=0.8, offset=0.0)),
    # its shared expert clamps too (traced as core ops)
    "deepseek_v4": (_deepseek_v4, dict(activation="clamped_swiglu", alpha=1.0, limit=0.8,
                                       offset=0.0, scoring="sqrt_softplus")),
    "longcat_flash": (_longcat_flash, dict(identity_experts=2, k=2, scale=1.5,
                                           select_bias_name="router.e_score_correction_bias")),
}


@pytest.mark.parametrize("family", list(BLOCKS))
def test_newer_family_compiles_and_matches_transformers(family):
    import moec

    make, want = BLOCKS[family]
    block = make()
    ((_, spec),) = find_moe_blocks(block)
    for attr, value in want.items():
        assert getattr(spec, attr) == value, (family, attr, getattr(spec, attr))
    model = moec.compile(block, (torch.randn(2, 8, H),), max_tokens=64).load_model()
    gen = torch.Generator().manual_seed(3)
    inputs = [torch.randn(1, t, H, generator=gen) for t in (0, 1, 37)]
    inputs.append(skewed_tokens(block, 24)[None])
    for x in inputs:
        with torch.no_grad():
            want_y = block(x).numpy()
        got = model(x).numpy()
        assert got.shape == want_y.shape
        if want_y.size:
            err = float(np.abs(got - want_y).max() / np.abs(want_y).max())
            assert err <= 1e-4, (family, x.shape, err)
