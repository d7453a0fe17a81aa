"""Generation of every MoE family that generates, against transformers' own `generate`.

For each family's tiny random checkpoint (saved with save_pretrained, compiled from the folder
with max_tokens=64, so the 100-token prompt is prefilled in two chunks):
- greedy output is token-for-token what `generate(do_sample=False)` gives, for 32 new tokens,
  for a batch of 4 prompts of 1, 7, 33 and 100 tokens and for each prompt alone (stopping at
  EOS the same way);
- the logits of every step are within 1e-4 (relative to the row's largest) of the float64
  logits of the same model along the same tokens (transformers run in float64): moec and
  transformers both compute in float32 and each carries its own rounding (transformers' fp32
  logits themselves sit up to 3e-5 from the fp64 ones here; moec's fused kernels round in
  another order, e.g. the rotary embedding with FMAs), so the float64 model is the reference
  both are held to;
- the plain forward (model(ids), chunked steps on a temporary cache) equals transformers'
  forward of the whole sequence.
JetMoE (mixture-of-attention heads) is refused with an error naming the module.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from families import GENERATING, V, compile_family
from families import model as family_model

import moec
from moec.errors import UnsupportedError

PROMPT_LENS = (1, 7, 33, 100)
NEW = 32
REL = 1e-4


FAST = ("mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss")  # the must-generate four;
# the other families with -m slow (the default run stays near 20 minutes on 2 cores)


@pytest.fixture(scope="module", params=[f if f in FAST else pytest.param(f, marks=pytest.mark.slow)
                                        for f in GENERATING])
def compiled(request, tmp_path_factory):
    fam = request.param
    m, path = compile_family(fam, tmp_path_factory.mktemp(fam))
    return fam, m, moec.load(path)


@pytest.fixture(scope="module")
def model64(compiled):
    m = family_model(compiled[0]).double()
    for mod in m.modules():  # torch's grouped GEMM has no float64: the plain expert loop
        cfg = getattr(mod, "config", None)
        if cfg is not None and hasattr(cfg, "_experts_implementation"):
            cfg._experts_implementation = "eager"
    return m


def _prompts(fam: str) -> list[list[int]]:
    rng = np.random.default_rng(sum(map(ord, fam)))
    return [[int(t) for t in rng.integers(3, V, n)] for n in PROMPT_LENS]


def _reference(m, m64, prompt):
    """transformers' greedy tokens (float32), and the float64 logits of every step along
    them (one forward of the whole sequence)."""
    with torch.no_grad():
        seq = m.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False)[0]
        toks = seq[len(prompt):].tolist()
        lg = m64(seq[None]).logits[0].numpy()
    return toks, [lg[len(prompt) - 1 + i] for i in range(len(toks))]


def test_greedy_batch_matches_transformers(compiled, model64):
    fam, m, lm = compiled
    prompts = _prompts(fam)
    seen: dict[int, list[np.ndarray]] = {}
    lm.engine.on_logits = lambda req, row: seen.setdefault(req.id, []).append(row.copy())
    try:
        outs = lm.generate(prompts, max_new_tokens=NEW)
    finally:
        lm.engine.on_logits = None
    ids = sorted(seen)
    for p, o, rid in zip(prompts, outs, ids, strict=True):
        ref, ref_logits = _reference(m, model64, p)
        assert o.token_ids == ref, f"{fam}, prompt of {len(p)}: {o.token_ids} != {ref}"
        assert o.finish_reason == ("stop" if len(ref) < NEW else "length")
        for step, (got, want) in enumerate(zip(seen[rid], ref_logits, strict=True)):
            err = np.abs(got - want).max() / np.abs(want).max()
            assert err <= REL, f"{fam}, prompt of {len(p)}, step {step}: rel err {err:.3g}"


def test_greedy_alone_matches_batch(compiled):
    fam, m, lm = compiled
    prompts = _prompts(fam)
    batch = lm.generate(prompts, max_new_tokens=NEW)
    for p, b in zip(prompts, batch, strict=True):
        assert lm.generate(p, max_new_tokens=NEW).token_ids == b.token_ids


def test_forward_matches_transformers(compiled):
    fam, m, lm = compiled
    ids = np.array(_prompts(fam)[3] + _prompts(fam)[2])  # 133 tokens: three steps of <= 64
    with torch.no_grad():
        ref = m(torch.from_numpy(ids)[None]).logits[0].numpy()
    got = lm(ids)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() / np.abs(ref).max() <= REL


def test_jetmoe_is_refused_by_name(tmp_path):
    with pytest.raises(UnsupportedError, match="JetMoeMoA"):
        compile_family("jetmoe", tmp_path)


@pytest.mark.parametrize("rope", [pytest.param("linear", marks=pytest.mark.slow), "dynamic",
                                  "yarn", pytest.param("llama3", marks=pytest.mark.slow)])
def test_rotary_variants_generate_like_transformers(rope, tmp_path):
    """The rotary scalings of the families' configs (Qwen3-MoE with each): greedy tokens equal
    to transformers' for a batch, and the plain forward within 1e-4 of its logits. Dynamic NTK
    is exact within max_position_embeddings, where it equals the default rotary; the artifact
    refuses positions beyond it (its max_position)."""
    fam = f"qwen3_moe:{rope}"
    m, path = compile_family(fam, tmp_path)
    lm = moec.load(path)
    prompts = _prompts(fam)[:3]
    outs = lm.generate(prompts, max_new_tokens=16)
    for p, o in zip(prompts, outs, strict=True):
        with torch.no_grad():
            ref = m.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False)
        assert o.token_ids == ref[0, len(p):].tolist(), f"{rope}, prompt of {len(p)}"
    ids = np.array(_prompts(fam)[3])
    with torch.no_grad():
        want = m(torch.from_numpy(ids)[None]).logits[0].numpy()
    assert np.abs(lm(ids) - want).max() / np.abs(want).max() <= REL
    assert lm.step_model.geometry.max_position == m.config.max_position_embeddings


def test_offloaded_generation_is_bitwise_resident(compiled):
    """Every family runs with its routed experts under a budget of one layer's top-k experts
    (expert offload, moec/runtime/expert_cache.py) and gives the resident model's tokens and
    logits bit for bit (the same kernels read the same bytes)."""
    fam, _, lm = compiled
    path = lm.step_model.path
    probe = moec.load(path, expert_budget=1 << 40).step_model.expert_cache
    small = moec.load(path, expert_budget=probe.min_budget)
    cache = small.step_model.expert_cache
    assert cache.max_step_tokens() is not None  # the budget binds: a few tokens per step
    prompts = _prompts(fam)[:3]
    want = [o.token_ids for o in lm.generate(prompts, max_new_tokens=8)]
    assert [o.token_ids for o in small.generate(prompts, max_new_tokens=8)] == want
    ids = np.array(_prompts(fam)[3])
    assert np.array_equal(small(ids), lm(ids))
    assert cache.stats.evictions > 0
