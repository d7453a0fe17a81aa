"""The sampler (moec/engine/sampling.py) against the definitions of its filters.

On a fixed logit vector, 40 000 draws per setting are compared with the distribution written
out here from the definitions (softmax of logits / T; top-k keeps the k largest; top-p the
smallest most-likely set reaching p; min-p the tokens at least min_p times the top one): a
chi-square test at p = 0.001 (Wilson-Hilferty critical value), and excluded tokens never
drawn. Seeds reproduce; parameters are validated."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moec.engine.sampling import SamplingParams, apply_repetition_penalty, sample
from moec.errors import InputError

LOGITS = np.array([2.0, 1.5, 1.2, 0.3, 0.0, -0.5, -1.0, -3.0, 0.9, 1.9], np.float32)
N = 40_000


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _expected(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    p = _softmax(LOGITS.astype(np.float64) / temperature)
    keep = np.ones(len(p), bool)
    order = np.argsort(-p)
    if top_k:
        keep[order[top_k:]] = False
    p = np.where(keep, p, 0)
    p /= p.sum()
    if top_p < 1:
        mass, kept = 0.0, np.zeros(len(p), bool)
        for i in np.argsort(-p):
            kept[i] = True
            mass += p[i]
            if mass >= top_p:
                break
        p = np.where(kept, p, 0)
        p /= p.sum()
    if min_p:
        p = np.where(p >= min_p * p.max(), p, 0)
        p /= p.sum()
    return p


def _chi2_critical(df: int, z: float = 3.0902) -> float:  # z: the 0.999 normal quantile
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


SETTINGS = [dict(temperature=1.0), dict(temperature=0.7), dict(temperature=1.5, top_k=3),
            dict(temperature=1.0, top_p=0.8), dict(temperature=1.0, min_p=0.2),
            dict(temperature=0.8, top_k=6, top_p=0.9, min_p=0.05)]


@pytest.mark.parametrize("kw", SETTINGS, ids=lambda kw: ",".join(f"{k}={v}"
                                                                 for k, v in kw.items()))
def test_distribution_matches_the_definition(kw):
    p = SamplingParams(**kw, seed=0)
    rng = np.random.default_rng(p.seed)
    counts = np.zeros(len(LOGITS))
    empty = np.empty(0, np.int64)
    for _ in range(N):
        counts[sample(LOGITS, p, rng, empty)[0]] += 1
    want = _expected(**kw)
    assert np.all(counts[want == 0] == 0), "a filtered-out token was drawn"
    live = want > 0
    exp = want[live] * N
    chi2 = float(((counts[live] - exp) ** 2 / exp).sum())
    df = int(live.sum()) - 1
    if df:
        assert chi2 < _chi2_critical(df), f"chi2 {chi2:.1f} with {df} dof"


def test_greedy_is_argmax_and_seeds_reproduce():
    empty = np.empty(0, np.int64)
    assert sample(LOGITS, SamplingParams(), np.random.default_rng(), empty)[0] == 0
    p = SamplingParams(temperature=1.0, seed=5)
    a = [sample(LOGITS, p, r, empty)[0] for r in [np.random.default_rng(5)] for _ in range(50)]
    b = [sample(LOGITS, p, r, empty)[0] for r in [np.random.default_rng(5)] for _ in range(50)]
    assert a == b


def test_repetition_penalty_definition():
    seen = np.array([0, 5, 5, 7])
    out = apply_repetition_penalty(LOGITS, seen, 2.0)
    want = LOGITS.copy()
    want[0] /= 2  # positive: divided
    want[5] *= 2  # negative: multiplied
    want[7] *= 2
    np.testing.assert_array_equal(out, want)
    tok, _ = sample(LOGITS, SamplingParams(repetition_penalty=3.0), np.random.default_rng(),
                    np.array([0]))
    assert tok == 9  # 2.0 / 3 < 1.9


def test_logprob_is_of_the_raw_logits():
    _, lp = sample(LOGITS, SamplingParams(temperature=0.5, logprobs=True, seed=1),
                   np.random.default_rng(1), np.empty(0, np.int64))
    assert lp is not None and lp <= 0


@pytest.mark.parametrize("bad", [dict(temperature=-0.1), dict(temperature=float("nan")),
                                 dict(top_p=1.5), dict(top_p=0.0), dict(top_k=-1),
                                 dict(min_p=-0.1), dict(repetition_penalty=-1),
                                 dict(max_new_tokens=1.5), dict(seed=-3), dict(stop=[""]),
                                 dict(stop_token_ids=[-1])])
def test_bad_parameters_are_input_errors(bad):
    with pytest.raises(InputError):
        SamplingParams(**bad)
