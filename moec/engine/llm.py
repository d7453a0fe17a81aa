"""`LanguageModel`: what `moec.load` returns for a generation artifact (a causal LM compiled
from a checkpoint folder): generate, stream and chat, on top of the Engine.

    model = moec.load("qwen.moec", kv_cache="2GB", max_batch=16)
    out = model.generate("The capital of France is", max_new_tokens=32)
    print(out.text)
    for ev in model.stream(["a", "b"], temperature=0.7, seed=1):  # tokens as they come
        print(ev.index, ev.text, end="")
    logits = model(ids)                     # the plain forward: [T, vocab]

Defaults: greedy, unless the checkpoint's generation_config.json says do_sample (then its
temperature, top_k and top_p), as transformers' `generate` does; every SamplingParams field
can be passed by name.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from moec.engine.engine import Engine, Request
from moec.engine.sampling import SamplingParams
from moec.engine.tokenizer import Tokenizer
from moec.errors import InputError
from moec.runtime.step import StepModel


@dataclass
class Completion:
    """One finished generation."""

    text: str | None  # None without a tokenizer
    token_ids: list[int]
    finish_reason: str  # "stop", "length", "abort"
    prompt_token_ids: list[int]
    logprobs: list[float] | None = None
    time_to_first_token: float | None = None  # seconds from submission

    def __str__(self) -> str:
        return self.text if self.text is not None else str(self.token_ids)


@dataclass
class StreamEvent:
    """A new token of prompt `index` (token -1 with `finished` when a request ends without
    one), and the text it completed (may be empty: see IncrementalDecoder)."""

    index: int
    token: int
    text: str
    finished: bool
    finish_reason: str | None


class LanguageModel:
    """A loaded generation artifact: `generate`, `stream`, `chat`, and `model(ids)` for the
    plain forward. The KV cache is allocated at the first generation."""

    def __init__(self, step_model: StepModel, *, kv_cache: str | int | None = None,
                 max_batch: int | None = None, max_seq_len: int | None = None) -> None:
        self.step_model = step_model
        self.tokenizer = Tokenizer.from_folder(step_model.path)
        self._engine_args = {"kv_cache": kv_cache, "max_seq_len": max_seq_len,
                             **({"max_batch": max_batch} if max_batch is not None else {})}
        self._engine: Engine | None = None
        self.default_params = _generation_defaults(step_model.path)

    # ------------------------------------------------------------------ plain model
    def __call__(self, *inputs: Any) -> Any:
        return self.step_model(*inputs)

    def __getattr__(self, name: str) -> Any:  # signature, manifest, path, device, geometry
        return getattr(self.step_model, name)

    def __repr__(self) -> str:
        g = self.step_model.geometry
        return (f"LanguageModel({str(self.step_model.path)!r}, {g.layers} layers, vocab "
                f"{g.vocab_size}, tokenizer={'yes' if self.tokenizer else 'no'})")

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = Engine(self.step_model, tokenizer=self.tokenizer,
                                  default_params=self.default_params, **self._engine_args)
        return self._engine

    # ------------------------------------------------------------------ generation
    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids of a prompt (text through the tokenizer, with its special tokens)."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InputError("this artifact has no tokenizer (no tokenizer.json in the "
                                 "checkpoint folder): pass token ids instead of text")
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, np.ndarray):
            if prompt.ndim != 1 or prompt.dtype.kind not in "iu":
                raise InputError(f"token ids must be a 1-D integer array, got {prompt.dtype} "
                                 f"{prompt.shape}")
            return [int(i) for i in prompt]
        if isinstance(prompt, (list, tuple)) and all(
                isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in prompt):
            return [int(i) for i in prompt]
        raise InputError(f"a prompt must be a string or a list of token ids, got "
                         f"{type(prompt).__name__}")

    def _batch(self, prompts: Any) -> tuple[list[list[int]], bool]:
        single = isinstance(prompts, (str, np.ndarray)) or (
            isinstance(prompts, (list, tuple)) and bool(prompts)
            and all(isinstance(i, (int, np.integer)) and not isinstance(i, bool)
                    for i in prompts))
        items = [prompts] if single else list(prompts)
        if not items:
            raise InputError("no prompts given")
        return [self.encode(p) for p in items], single

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, on_token=None
               ) -> Request:
        """Queue one prompt with the engine (the server's entry point)."""
        return self.engine.add(prompt_ids, params, on_token=on_token)

    def generate(self, prompts: Any, **sampling: Any) -> Completion | list[Completion]:
        """Generate for one prompt (text or token ids) or a list of them, batched. Keyword
        arguments are SamplingParams fields (max_new_tokens, temperature, top_k, top_p,
        min_p, repetition_penalty, seed, stop_token_ids, stop, ignore_eos, logprobs)."""
        batch, single = self._batch(prompts)
        eng = self.engine
        params = eng.params(**sampling)
        reqs = [eng.add(ids, params) for ids in batch]
        try:
            eng.run_until_done(reqs)
        finally:
            for r in reqs:
                if not r.finished:
                    eng.abort(r)
        outs = [self._completion(r) for r in reqs]
        return outs[0] if single else outs

    def stream(self, prompts: Any, **sampling: Any) -> Iterator[StreamEvent]:
        """Generate like `generate`, yielding each new token as it comes."""
        batch, _ = self._batch(prompts)
        eng = self.engine
        params = eng.params(**sampling)
        events: list[StreamEvent] = []
        index: dict[int, int] = {}

        def on_token(req: Request, tok: int, text: str) -> None:
            events.append(StreamEvent(index[req.id], tok, text, req.finished,
                                      req.finish_reason))

        reqs = []
        try:
            for i, ids in enumerate(batch):
                r = eng.add(ids, params, on_token=None)
                index[r.id] = i
                r.on_token = on_token
                reqs.append(r)
                if r.finished:  # max_new_tokens=0
                    on_token(r, -1, "")
            while not all(r.finished for r in reqs):
                eng.step()
                yield from events
                events.clear()
            yield from events
        finally:
            for r in reqs:
                if not r.finished:
                    eng.abort(r)

    def chat(self, messages: Sequence[dict[str, Any]], **sampling: Any) -> Completion:
        """Reply to a conversation, rendered with the model's chat template."""
        if self.tokenizer is None:
            raise InputError("this artifact has no tokenizer, so it cannot chat")
        return self.generate(self.tokenizer.encode_chat(messages), **sampling)

    def _completion(self, r: Request) -> Completion:
        ttft = None if r.first_token_time is None else r.first_token_time - r.arrival
        return Completion(
            text=r.text if self.tokenizer is not None else None, token_ids=list(r.output),
            finish_reason=r.finish_reason or "abort", prompt_token_ids=list(r.prompt),
            logprobs=list(r.logprobs) if r.params.logprobs else None,
            time_to_first_token=ttft)


def _generation_defaults(folder: Any) -> dict[str, Any]:
    """SamplingParams defaults from the artifact's generation_config.json (transformers'
    rule: sampling only if do_sample)."""
    from pathlib import Path

    p = Path(folder) / "generation_config.json"
    if not p.is_file():
        return {}
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    out: dict[str, Any] = {}
    if cfg.get("do_sample"):
        for key in ("temperature", "top_k", "top_p"):
            if isinstance(cfg.get(key), (int, float)) and not isinstance(cfg.get(key), bool):
                out[key] = cfg[key]
        out.setdefault("temperature", 1.0)
    rp = cfg.get("repetition_penalty")
    if isinstance(rp, (int, float)) and not isinstance(rp, bool) and rp > 0:
        out["repetition_penalty"] = float(rp)
    return out
