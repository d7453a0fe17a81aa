"""The engine on one tiny compiled Mixtral: scheduling (continuous batching, chunked prefill,
preemption when the KV pool is full), sampling reproducibility, stop conditions, streaming,
and the errors of bad requests, which leave the other requests of a batch unaffected."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from families import V  # noqa: I001

import moec
from moec.engine import Engine, SamplingParams
from moec.engine.sampling import log_softmax
from moec.errors import InputError

NEW = 24


def _prompts(n: int, seed: int = 0, lens=(3, 17, 40, 70, 5, 1, 29, 64)) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, V, lens[i % len(lens)])] for i in range(n)]


@pytest.fixture(scope="module")
def lm(mixtral):
    return moec.load(mixtral[1])


def _greedy_ref(m, prompt, new=NEW):
    with torch.no_grad():
        return m.generate(torch.tensor([prompt]), max_new_tokens=new,
                          do_sample=False)[0, len(prompt):].tolist()


def test_a_small_pool_preempts_and_gives_the_same_tokens(mixtral):
    m, path = mixtral
    prompts = _prompts(8)
    roomy = moec.load(path, max_batch=8).generate(prompts, max_new_tokens=NEW, ignore_eos=True)
    # 12 blocks of 16 tokens cannot hold 8 sequences of up to 94 tokens: requests wait for
    # blocks and running ones are preempted and recomputed
    tight = moec.load(path, max_batch=8, kv_cache=12 * _block_bytes(path))
    outs = tight.generate(prompts, max_new_tokens=NEW, ignore_eos=True)
    assert [o.token_ids for o in outs] == [o.token_ids for o in roomy]
    assert tight.engine.stats["preemptions"] > 0
    assert tight.engine.pool.num_free == tight.engine.pool.num_blocks  # all returned


def _block_bytes(path) -> int:
    return moec.load(path).step_model.geometry.block_bytes()


def test_requests_joining_mid_generation_match_alone(mixtral, lm):
    m, _ = mixtral
    eng = lm.engine
    prompts = _prompts(5, seed=3)
    p = eng.params(max_new_tokens=NEW)
    reqs = [eng.add(prompts[0], p)]
    for i in range(1, 5):  # a new request every few steps, some decoding, some prefilling
        for _ in range(3):
            eng.step()
        reqs.append(eng.add(prompts[i], p))
    eng.run_until_done(reqs)
    for pr, r in zip(prompts, reqs, strict=True):
        assert r.output == _greedy_ref(m, pr)


def test_decode_after_prefill_equals_the_no_cache_forward(lm):
    prompt = _prompts(1, seed=5, lens=(45,))[0]
    rows = []
    lm.engine.on_logits = lambda req, row: rows.append(row.copy())
    try:
        out = lm.generate(prompt, max_new_tokens=8, ignore_eos=True)
    finally:
        lm.engine.on_logits = None
    full = lm(np.array(prompt + out.token_ids))  # one forward, no cache kept
    for i, row in enumerate(rows):
        want = full[len(prompt) - 1 + i]
        assert np.abs(row - want).max() <= 1e-5 * np.abs(want).max()


def test_seeded_sampling_is_reproducible_and_batch_independent(lm):
    prompts = _prompts(4, seed=7)
    kw = dict(max_new_tokens=NEW, temperature=0.9, top_p=0.95, top_k=40, seed=123,
              ignore_eos=True)
    a = lm.generate(prompts, **kw)
    b = lm.generate(prompts, **kw)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    alone = lm.generate(prompts[2], **kw)  # same seed, other batch: same tokens
    assert alone.token_ids == a[2].token_ids
    other = lm.generate(prompts, **{**kw, "seed": 124})
    assert [o.token_ids for o in other] != [o.token_ids for o in a]


def test_logprobs_are_the_models_log_softmax(lm):
    prompt = _prompts(1, seed=9)[0]
    out = lm.generate(prompt, max_new_tokens=6, logprobs=True, ignore_eos=True)
    full = lm(np.array(prompt + out.token_ids))
    for i, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
        want = log_softmax(full[len(prompt) - 1 + i].astype(np.float64))[tok]
        assert abs(lp - want) < 1e-4


def test_stop_token_ids_and_max_new_tokens(mixtral, lm):
    m, _ = mixtral
    prompt = _prompts(1, seed=11)[0]
    ref = _greedy_ref(m, prompt)
    stop = ref[5]
    out = lm.generate(prompt, max_new_tokens=NEW, stop_token_ids=[stop])
    assert out.token_ids == ref[:ref.index(stop) + 1] and out.finish_reason == "stop"
    out = lm.generate(prompt, max_new_tokens=3)
    assert out.token_ids == ref[:3] and out.finish_reason == "length"
    out = lm.generate(prompt, max_new_tokens=0)
    assert out.token_ids == [] and out.finish_reason == "length"


def test_stream_yields_the_generated_tokens(lm):
    prompts = _prompts(3, seed=13)
    outs = lm.generate(prompts, max_new_tokens=10)
    got: dict[int, list[int]] = {0: [], 1: [], 2: []}
    finished = set()
    for ev in lm.stream(prompts, max_new_tokens=10):
        if ev.token >= 0:
            got[ev.index].append(ev.token)
        if ev.finished:
            finished.add(ev.index)
    assert finished == {0, 1, 2}
    assert [got[i] for i in range(3)] == [o.token_ids for o in outs]


def test_bad_requests_are_clear_errors_and_leave_the_others_alone(mixtral, lm):
    m, _ = mixtral
    eng = lm.engine
    good = _prompts(2, seed=17)
    reqs = [eng.add(p, eng.params(max_new_tokens=NEW)) for p in good]
    eng.step()
    with pytest.raises(InputError, match="empty prompt"):
        eng.add([], eng.params())
    with pytest.raises(InputError, match="too long"):
        eng.add([5] * eng.max_seq_len, eng.params())
    with pytest.raises(InputError, match="outside the vocabulary"):
        eng.add([5, V + 3], eng.params())
    for bad in ({"temperature": -1}, {"top_p": 0}, {"top_k": -2}, {"min_p": 1.0},
                {"repetition_penalty": 0}, {"max_new_tokens": -1}, {"seed": "x"},
                {"stop_token_ids": ["a"]}, {"nucleus": 0.9}):
        with pytest.raises(InputError):
            eng.params(**bad)
    with pytest.raises(InputError, match="stop strings need a tokenizer"):
        eng.add([5, 6], eng.params(stop=["x"]))
    eng.run_until_done(reqs)
    for p, r in zip(good, reqs, strict=True):
        assert r.output == _greedy_ref(m, p)


def test_pool_and_load_options_are_checked(mixtral):
    path = mixtral[1]
    with pytest.raises(InputError, match="smaller than one KV block"):
        moec.load(path, kv_cache=100).generate([5, 6])
    with pytest.raises(InputError, match="memory size"):
        moec.load(path, kv_cache="lots").generate([5, 6])
    with pytest.raises(InputError, match="max_batch"):
        moec.load(path, max_batch=0).generate([5, 6])
    with pytest.raises(InputError, match="max_seq_len"):
        moec.load(path, max_seq_len=10**9).generate([5, 6])
    small = moec.load(path, kv_cache=2 * _block_bytes(path))
    with pytest.raises(InputError, match="does not fit the KV cache"):
        small.generate([5] * 40)
    assert small.generate([5] * 20, max_new_tokens=4).token_ids  # fits: 2 blocks


def test_engine_steps_pick_the_decode_entry_point(lm):
    eng = Engine(lm.step_model, max_batch=4)
    reqs = [eng.add(p, SamplingParams(max_new_tokens=5, ignore_eos=True))
            for p in _prompts(3, seed=19)]
    eng.run_until_done(reqs)
    # one prefill step for the three prompts, then 4 decode steps
    assert eng.stats["steps"] == 5 and eng.stats["decode_steps"] == 4


def test_mla_caches_the_latents(tmp_path):
    """DeepSeek-V3: the cache holds the compressed latent and the rope key (one kv head of
    kv_lora_rank + rope dims; values kv_lora_rank), not H expanded heads."""
    from families import compile_family

    m, path = compile_family("deepseek_v3", tmp_path)
    g = moec.load(path).step_model.geometry
    cfg = m.config
    assert (g.kv_heads, g.k_dim, g.v_dim) == (1, cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                                              cfg.kv_lora_rank)
    assert "core.linear_heads" in (path / "model.ir").read_text()


def test_bench_times_the_plain_forward(mixtral, tmp_path, capsys):
    """`moec bench ARTIFACT` on a generation artifact times its plain forward (one sequence of
    T token ids, a prefill on a fresh cache) instead of failing on its [T] input."""
    import json

    from moec.cli import main

    out = tmp_path / "b.json"
    assert main(["bench", str(mixtral[1]), "--tokens", "1", "70", "--warmup", "0", "--repeat",
                 "2", "--json", str(out)]) == 0
    assert "plain forward of one sequence" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert [r["tokens"] for r in report["ranks"][0]["runs"]] == [1, 70]  # 70: two chunks
    assert all(r["total"] > 0 for r in report["ranks"][0]["runs"])
    assert "prefill" in report["calls"]
