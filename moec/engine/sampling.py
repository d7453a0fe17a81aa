"""Sampling parameters and the numpy sampler (no torch).

Per request, in this order (transformers' and vLLM's order): repetition penalty on the logits
of every token seen (prompt and output: a positive logit is divided by the penalty, a negative
one multiplied), then greedy argmax when temperature is 0, else temperature, top-k, top-p
(nucleus: the smallest set of most likely tokens whose probability reaches top_p), min-p
(tokens below min_p times the top probability), and a draw from the renormalised distribution
with the request's own generator (`seed`: the same seed gives the same tokens, whatever else is
in the batch). `logprobs` reports the chosen token's log-probability under the model's own
distribution (log-softmax of the raw logits, before penalties and temperature), as vLLM does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from moec.errors import InputError


@dataclass(frozen=True)
class SamplingParams:
    """How one request generates. Invalid values raise InputError when constructed."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings (need a tokenizer)
    ignore_eos: bool = False
    logprobs: bool = False
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        def bad(name: str, want: str) -> InputError:
            return InputError(f"sampling parameter {name}={getattr(self, name)!r}: {want}")

        def is_int(v: Any) -> bool:
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return (is_int(v) or isinstance(v, (float, np.floating))) and math.isfinite(v)

        if not is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            raise bad("max_new_tokens", "want an integer >= 0")
        if not is_num(self.temperature) or self.temperature < 0:
            raise bad("temperature", "want a number >= 0 (0 is greedy)")
        if not is_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", "want an integer >= 0 (0 is off)")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "want a number in (0, 1]")
        if not is_num(self.min_p) or not 0 <= self.min_p < 1:
            raise bad("min_p", "want a number in [0, 1)")
        if not is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "want a number > 0 (1 is off)")
        if self.seed is not None and (not is_int(self.seed) or self.seed < 0):
            raise bad("seed", "want an integer >= 0 or None")
        stop_ids = self.stop_token_ids
        if isinstance(stop_ids, (int, np.integer)):
            stop_ids = (stop_ids,)
        if not all(is_int(i) and i >= 0 for i in stop_ids):
            raise bad("stop_token_ids", "want token ids (integers >= 0)")
        object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in stop_ids))
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if not all(isinstance(s, str) and s for s in stop):
            raise bad("stop", "want non-empty strings")
        object.__setattr__(self, "stop", stop)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.name != "extra")


def log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float
                             ) -> np.ndarray:
    if penalty == 1.0 or not len(seen):
        return logits
    out = logits.copy()
    ids = np.unique(seen)
    v = out[ids]
    out[ids] = np.where(v > 0, v / penalty, v * penalty)
    return out


def probabilities(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    """The distribution a non-greedy request draws from (float64, sums to 1)."""
    x = logits.astype(np.float64) / p.temperature
    if p.top_k and p.top_k < len(x):
        kth = np.partition(x, -p.top_k)[-p.top_k]
        x = np.where(x >= kth, x, -np.inf)
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    if p.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cum = np.cumsum(probs[order])
        # keep the smallest prefix whose mass reaches top_p (at least one token)
        keep = int(np.searchsorted(cum, p.top_p - 1e-12)) + 1
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[:keep]] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    if p.min_p > 0:
        probs = np.where(probs >= p.min_p * probs.max(), probs, 0.0)
        probs /= probs.sum()
    return probs


def sample(logits: np.ndarray, p: SamplingParams, rng: np.random.Generator,
           seen: np.ndarray) -> tuple[int, float | None]:
    """(token, its log-probability if `p.logprobs`) for one row of logits."""
    x = apply_repetition_penalty(logits, seen, p.repetition_penalty)
    if p.greedy:
        tok = int(np.argmax(x))
    else:
        probs = probabilities(x, p)
        cdf = np.cumsum(probs)
        tok = int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"),
                      len(cdf) - 1))
        while probs[tok] == 0 and tok > 0:  # float edge: never return an excluded token
            tok -= 1
    lp = float(log_softmax(logits.astype(np.float64))[tok]) if p.logprobs else None
    return tok, lp
