"""Whole causal LMs from a checkpoint folder: tiny random-weight Mixtral, Qwen3-MoE and
DeepSeek-V3 (MLA attention, dense first layer, grouped sigmoid routing) are saved with
`save_pretrained`, compiled from the folder (ids [T] -> logits [T, vocab]) and compared with
transformers' own logits. One compile per family (module-scoped)."""

from __future__ import annotations

import numpy as np
import pytest
import torch  # a hard dependency of moec

transformers = pytest.importorskip("transformers")

import moec  # noqa: E402
from moec.cli import main  # noqa: E402

V, MAX_TOKENS = 96, 64
TOKENS = (1, 5, 33)
COMMON = dict(vocab_size=V, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
              num_hidden_layers=2, max_position_embeddings=256, tie_word_embeddings=False)


def _config(family: str):
    if family == "mixtral":
        return transformers.MixtralConfig(intermediate_size=48, num_local_experts=4,
                                          num_experts_per_tok=2, **COMMON)
    if family == "qwen3_moe":  # q/k RMSNorm per head, head_dim != hidden / heads
        return transformers.Qwen3MoeConfig(moe_intermediate_size=48, intermediate_size=64,
                                           num_experts=4, num_experts_per_tok=2, head_dim=16,
                                           norm_topk_prob=True, **COMMON)
    if family == "deepseek_v3":  # MLA: q/kv LoRA, rope on a split of the head dim, Dv != Dqk
        return transformers.DeepseekV3Config(
            moe_intermediate_size=48, intermediate_size=64, n_routed_experts=8,
            num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
            n_shared_experts=1, routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=24,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12,
            **{**COMMON, "num_key_value_heads": 4})
    raise KeyError(family)


def _randomize(model, seed: int):
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


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe", "deepseek_v3"])
def compiled(request, tmp_path_factory):
    family = request.param
    tmp = tmp_path_factory.mktemp(family)
    torch.manual_seed(0)
    model = _randomize(transformers.AutoModelForCausalLM.from_config(_config(family)), 0)
    model.save_pretrained(tmp / "ckpt")
    out = tmp / "model.moec"
    if family == "mixtral":  # through the command line
        assert main(["compile", str(tmp / "ckpt"), "-o", str(out),
                     "--max-tokens", str(MAX_TOKENS)]) == 0
    else:
        moec.compile(str(tmp / "ckpt"), max_tokens=MAX_TOKENS).save(out)
    return family, model, out


def _logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids)[None]).logits[0].numpy()


@pytest.mark.parametrize("n", TOKENS)
def test_logits_match_transformers(compiled, n):
    family, model, path = compiled
    ids = np.random.default_rng(n).integers(0, V, n).astype(np.int64)
    got = moec.load(path)(ids)
    got = got[0] if isinstance(got, (list, tuple)) else got
    want = _logits(model, ids)
    assert got.shape == (n, V)
    err = float(np.abs(got - want).max() / np.abs(want).max())
    print(f"{family} T={n}: max rel err {err:.2e}")
    assert err <= 1e-4, f"{family}, {n} tokens: max rel err {err:.2e}"


def test_artifact_ir_has_fused_attention(compiled):
    """A checkpoint folder compiles to the generation step: paged attention per layer."""
    _, model, path = compiled
    ir = (path / "model.ir").read_text()
    layers = model.config.num_hidden_layers
    assert ir.count("core.paged_attention(") == layers
    assert "core.embedding(" in ir


def test_no_generate_compiles_the_plain_forward(tmp_path):
    """generate=False: ids [T] -> logits [T, vocab] without a cache, one core.attention per
    layer, and the same logits."""
    torch.manual_seed(0)
    model = _randomize(transformers.AutoModelForCausalLM.from_config(_config("qwen3_moe")), 0)
    model.save_pretrained(tmp_path / "ckpt")
    art = moec.compile(str(tmp_path / "ckpt"), max_tokens=MAX_TOKENS, generate=False)
    assert art.ir_text.count("core.attention(") == model.config.num_hidden_layers
    assert "generation" not in art.meta
    ids = np.random.default_rng(3).integers(0, V, 9).astype(np.int64)
    compiled = art.load_model()
    got = compiled(ids)
    want = _logits(model, ids)
    assert float(np.abs(got - want).max() / np.abs(want).max()) <= 1e-4
    # ids outside the vocabulary are refused, as transformers refuses them, never clamped to
    # the last (or first) row of the embedding
    from moec.errors import InputError

    for bad in (V, 600, 10**9, -1):
        with pytest.raises(InputError, match=rf"holds {bad}, outside \[0, {V}\)"):
            compiled(np.array([3, bad, 5], np.int64))
    with pytest.raises(InputError, match=f"outside \\[0, {V}\\)"):
        compiled(torch.tensor([V]))
    assert art.meta["input_ranges"] == {art.signature.inputs[0].name: [0, V]}


def test_run_tokens_prints_top(compiled, capsys):
    _, model, path = compiled
    assert main(["run", str(path), "--tokens", "3 1 4 1 5", "--top", "3"]) == 0
    text = capsys.readouterr().out
    want = _logits(model, np.array([3, 1, 4, 1, 5]))[-1].argsort()[::-1][:3]
    listed = [int(line.split()[0]) for line in text.splitlines()[1:4]]
    assert listed == [int(t) for t in want]


def test_not_a_checkpoint(tmp_path):
    from moec.errors import InputError
    from moec.frontend.hf_model import from_checkpoint

    with pytest.raises(InputError, match="no config.json"):
        from_checkpoint(tmp_path)


@pytest.mark.parametrize("family", ["qwen3_moe", pytest.param("deepseek_v3", marks=pytest.mark.slow)])
def test_bf16_checkpoint_compiles_for_the_cpu(tmp_path, family):
    """A checkpoint saved in bfloat16 (as most are) compiles from its folder for the CPU: the
    activations run in float32 on the bf16 weights (widen-activations) and the logits come
    out in the checkpoint's dtype. They are the float32 model's logits on the same bf16
    weights, rounded once to bf16: within half a bf16 unit in the last place (2^-8 relative)
    plus float32 noise (1e-5 of the largest logit)."""
    torch.manual_seed(0)
    model = _randomize(transformers.AutoModelForCausalLM.from_config(_config(family)), 0)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "model.moec"
    assert main(["compile", str(tmp_path / "ckpt"), "-o", str(out),
                 "--max-tokens", str(MAX_TOKENS)]) == 0
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "ckpt"), dtype=torch.float32, local_files_only=True).eval()
    compiled = moec.load(out)
    for n in TOKENS:
        ids = np.random.default_rng(n).integers(0, V, n).astype(np.int64)
        got = compiled(ids)
        got = got[0] if isinstance(got, (list, tuple)) else got
        assert got.dtype.name == "bfloat16" and got.shape == (n, V)
        got = got.astype(np.float32)
        want = _logits(ref, ids)
        bad = np.abs(got - want) > 2.0 ** -8 * np.abs(want) + 1e-5 * np.abs(want).max()
        assert not bad.any(), f"{family} T={n}: {int(bad.sum())} logits off by more than " \
                              f"the bf16 rounding of the float32 result"
