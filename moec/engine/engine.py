"""`Engine`: continuous batching over a generation artifact's paged KV cache.

One `Engine.step()` is one call of the compiled step (moec.runtime.step.StepModel.step):

1. Every running request that is decoding gets its next token into the step (one row each);
   its cache grows by one slot, taking a new block when it crosses a block boundary. When the
   pool has no free block, the most recently admitted request is preempted: its blocks are
   freed and it goes back to the front of the queue, to be recomputed (prompt and output so
   far) when blocks free up (vLLM's recompute preemption). Nothing it produced is lost and no
   token changes: greedy results are the same as without preemption.
2. The rest of the step's token budget (the artifact's `max_step_tokens`) goes to prompts:
   first the running requests whose prompt is partly prefilled, then waiting requests, admitted
   while fewer than `max_batch` run and the pool has blocks for their whole prompt. A prompt
   longer than the budget is prefilled in chunks over several steps (chunked prefill), so
   decoding requests are never stalled for a whole long prompt.
3. Requests whose last prompt chunk or decode token ran get their next token sampled
   (moec.engine.sampling); a request finishes on an EOS / stop token, a stop string, its
   `max_new_tokens`, or the model's context limit, and its blocks return to the pool.

A step whose rows are all decode tokens runs the artifact's `decode` entry point (its attention
splits long contexts across threads); any other step runs `main`.

Thread safety: `add`, `abort` and `step` take one lock; the server drives `step` from its own
thread while handlers add and abort requests.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moec.engine.kv_pool import KVPool, PoolFull, parse_bytes
from moec.engine.sampling import SamplingParams, sample
from moec.engine.tokenizer import IncrementalDecoder, Tokenizer
from moec.errors import InputError
from moec.runtime.step import StepModel

DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_SEQ_LEN = 4096
DEFAULT_KV_FRACTION = 0.25  # of the available memory, when kv_cache= is not given


@dataclass
class Request:
    """One prompt being generated. `output` holds the generated token ids."""

    id: int
    prompt: list[int]
    params: SamplingParams
    output: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""  # generated text (with a tokenizer), stop strings cut off
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length", "abort"
    blocks: list[int] = field(default_factory=list)
    cached: int = 0  # tokens whose keys/values are in the cache
    arrival: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    on_token: Callable[[Request, int, str], None] | None = None
    rng: np.random.Generator | None = None
    detok: IncrementalDecoder | None = None
    held: str = ""  # text withheld while it could still become a stop string
    stop_ids: frozenset[int] = frozenset()

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output


class Engine:
    """Generation over a `StepModel` (see the module doc).

    kv_cache: the KV cache size, bytes or a string like "2GB" (default: enough for `max_batch`
    sequences of `max_seq_len` tokens, capped at a quarter of the available memory).
    max_batch: most requests running at once. max_seq_len: longest sequence (prompt + output;
    default the model's context, capped at 4096)."""

    def __init__(self, model: StepModel, *, tokenizer: Tokenizer | None = None,
                 kv_cache: str | int | None = None, max_batch: int = DEFAULT_MAX_BATCH,
                 max_seq_len: int | None = None,
                 default_params: dict[str, Any] | None = None) -> None:
        g = model.geometry
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise InputError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        limit = g.max_position or DEFAULT_MAX_SEQ_LEN
        if max_seq_len is None:
            max_seq_len = min(limit, DEFAULT_MAX_SEQ_LEN)
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or \
                not 1 <= max_seq_len <= limit:
            raise InputError(f"max_seq_len must be an integer in 1..{limit} (the model's "
                             f"context), got {max_seq_len!r}")
        per_block = g.block_bytes()
        if kv_cache is None:
            want = max_batch * -(-max_seq_len // g.block_size) * per_block
            avail = _available_memory()
            nbytes = min(want, int(avail * DEFAULT_KV_FRACTION)) if avail else want
        else:
            nbytes = parse_bytes(kv_cache)
        num_blocks = nbytes // per_block
        if num_blocks < 1:
            raise InputError(f"kv_cache={kv_cache!r} is smaller than one KV block "
                             f"({per_block} bytes: {g.layers} layers, {g.block_size} tokens)")
        self.model, self.geometry, self.tokenizer = model, g, tokenizer
        # with experts under a budget, a step carries no more tokens than the cache can hold
        # the experts of (moec.runtime.expert_cache.ExpertCache.max_step_tokens)
        cache = getattr(model, "expert_cache", None)
        cap = cache.max_step_tokens() if cache is not None else None
        self.step_tokens = g.max_step_tokens if cap is None else min(g.max_step_tokens, cap)
        if cap is not None:
            max_batch = min(max_batch, cap)
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.pool = KVPool(int(num_blocks), g.block_size)
        self.caches = model.new_caches(int(num_blocks))
        self.default_params = dict(default_params or {})
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._ids = itertools.count()
        self._lock = threading.RLock()
        self.stats = {"steps": 0, "decode_steps": 0, "prefill_tokens": 0, "decode_tokens": 0,
                      "preemptions": 0}
        eos = list(g.eos_token_ids) or (tokenizer.eos_token_ids() if tokenizer else [])
        self.eos_ids = frozenset(eos)
        # called with (request, its logits row) before each sample: inspection and tests
        self.on_logits: Callable[[Request, np.ndarray], None] | None = None

    # ------------------------------------------------------------------ requests
    def params(self, **kwargs: Any) -> SamplingParams:
        """SamplingParams from the engine's defaults (the checkpoint's generation_config)
        overridden by `kwargs`; unknown names raise InputError."""
        unknown = sorted(set(kwargs) - set(SamplingParams.names()))
        if unknown:
            raise InputError(f"unknown sampling parameter(s) {', '.join(unknown)}; known: "
                             f"{', '.join(SamplingParams.names())}")
        merged = {**self.default_params, **{k: v for k, v in kwargs.items() if v is not None}}
        return SamplingParams(**merged)

    def add(self, prompt: Sequence[int], params: SamplingParams,
            on_token: Callable[[Request, int, str], None] | None = None) -> Request:
        """Queue a prompt (token ids). Raises InputError for a prompt that can never run."""
        ids = [int(i) for i in prompt]
        g = self.geometry
        if not ids:
            raise InputError("empty prompt: give at least one token (for text, a tokenizer "
                             "that adds a BOS token, or some text)")
        bad = [i for i in ids if not 0 <= i < g.vocab_size]
        if bad:
            raise InputError(f"prompt token id {bad[0]} is outside the vocabulary "
                             f"(0..{g.vocab_size - 1})")
        if len(ids) >= self.max_seq_len:
            raise InputError(f"prompt of {len(ids)} tokens is too long: the longest sequence "
                             f"is {self.max_seq_len} tokens (max_seq_len), prompt and output")
        if self.pool.blocks_for(len(ids) + 1) > self.pool.num_blocks:
            raise InputError(f"prompt of {len(ids)} tokens does not fit the KV cache "
                             f"({self.pool.num_blocks} blocks of {g.block_size} tokens); "
                             f"load with a larger kv_cache=")
        if params.stop and self.tokenizer is None:
            raise InputError("stop strings need a tokenizer, and this artifact has none")
        req = Request(next(self._ids), ids, params, on_token=on_token)
        req.rng = np.random.default_rng(params.seed)
        req.stop_ids = frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos else self.eos_ids)
        if self.tokenizer is not None:
            req.detok = IncrementalDecoder(self.tokenizer)
        with self._lock:
            if params.max_new_tokens == 0:
                self._finish(req, "length")
            else:
                self.waiting.append(req)
        return req

    def abort(self, req: Request) -> None:
        """Stop a request now (its blocks return to the pool)."""
        with self._lock:
            if req.finished:
                return
            if req in self.waiting:
                self.waiting.remove(req)
            if req in self.running:
                self.running.remove(req)
            self._finish(req, "abort")

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ one step
    def step(self) -> list[Request]:
        """Run one batched model call; returns the requests that got a token."""
        with self._lock:
            plan = self._schedule()
            if not plan:
                return []
            return self._run(plan)

    def _schedule(self) -> list[tuple[Request, int]]:
        """(request, tokens to feed) of this step, in row order."""
        budget = self.step_tokens
        plan: list[tuple[Request, int]] = []
        # 1. decode rows (and partly prefilled prompts continue below)
        for req in list(self.running):
            if req not in self.running or len(req.tokens) - req.cached != 1:
                continue
            if not self._reserve(req, req.cached + 1, plan):
                continue
            plan.append((req, 1))
            budget -= 1
        # 2. prompt chunks: running requests first, then admissions
        for req in list(self.running):
            pending = len(req.tokens) - req.cached
            if req not in self.running or pending <= 1 or any(r is req for r, _ in plan):
                continue
            n = min(pending, budget)
            if n <= 0:
                break
            if not self._reserve(req, req.cached + n, plan):
                continue
            plan.append((req, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_batch:
            req = self.waiting[0]
            pending = len(req.tokens) - req.cached
            # keep one block per running request in reserve for its decode growth, so that
            # an admission does not preempt at the next step (FCFS: no overtaking)
            if self.pool.blocks_for(len(req.tokens) + 1) > self.pool.num_free - len(
                    self.running):
                break
            self.waiting.popleft()
            self.running.append(req)
            n = min(pending, budget)
            self.pool.grow(req.blocks, req.cached + n)
            plan.append((req, n))
            budget -= n
        return plan

    def _reserve(self, req: Request, tokens: int, plan: list[tuple[Request, int]]) -> bool:
        """Grow req's blocks to hold `tokens`, preempting the latest admitted other requests
        (not yet in `plan`) while the pool is short. False if req itself was preempted."""
        while True:
            try:
                self.pool.grow(req.blocks, tokens)
                return True
            except PoolFull:
                victims = [r for r in reversed(self.running)
                           if all(r is not p for p, _ in plan)]
                victim = victims[0]
                self._preempt(victim)
                if victim is req:
                    return False

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.pool.release(req.blocks)
        req.cached = 0
        self.waiting.appendleft(req)
        self.stats["preemptions"] += 1

    def _run(self, plan: list[tuple[Request, int]]) -> list[Request]:
        g = self.geometry
        bs = g.block_size
        ids, pos, slots, q_start, q_len, kv_len, rows, samplers = [], [], [], [], [], [], [], []
        t = 0
        for req, n in plan:
            toks = req.tokens
            p = np.arange(req.cached, req.cached + n)
            ids.append(np.asarray(toks[req.cached:req.cached + n], np.int64))
            pos.append(p)
            blocks = np.asarray(req.blocks, np.int64)
            slots.append(blocks[p // bs] * bs + p % bs)
            q_start.append(t)
            q_len.append(n)
            kv_len.append(req.cached + n)
            if req.cached + n == len(toks):  # the last prompt chunk, or a decode token
                rows.append(t + n - 1)
                samplers.append(req)
            t += n
        mb = max(len(r.blocks) for r, _ in plan)
        table = np.zeros((len(plan), mb), np.int32)
        for i, (req, _) in enumerate(plan):
            table[i, :len(req.blocks)] = req.blocks
        decode = all(n == 1 for _, n in plan)
        logits = self.model.step(
            self.caches, ids=np.concatenate(ids), positions=np.concatenate(pos),
            q_start=q_start, q_len=q_len, kv_len=kv_len, block_table=table,
            slots=np.concatenate(slots), logits_rows=rows or [0], decode=decode)
        if logits.dtype != np.float32:  # half models: sample from float32
            logits = logits.astype(np.float32)
        self.stats["steps"] += 1
        self.stats["decode_steps"] += decode
        for req, n in plan:
            req.cached += n
            if n == 1 and len(req.output) and req.cached == len(req.tokens):
                self.stats["decode_tokens"] += 1
            else:
                self.stats["prefill_tokens"] += n
        now = time.perf_counter()
        for row, req in enumerate(samplers):
            if self.on_logits is not None:
                self.on_logits(req, logits[row])
            seen = np.asarray(req.tokens, np.int64) if req.params.repetition_penalty != 1 \
                else np.empty(0, np.int64)
            assert req.rng is not None
            tok, lp = sample(logits[row], req.params, req.rng, seen)
            if req.first_token_time is None:
                req.first_token_time = now
            self._append(req, tok, lp)
        return samplers

    def _append(self, req: Request, tok: int, lp: float | None) -> None:
        req.output.append(tok)
        if lp is not None:
            req.logprobs.append(lp)
        reason, delta = None, ""
        if tok in req.stop_ids:
            reason = "stop"  # EOS / stop tokens end the request and are not text
        else:
            delta = req.detok.push(tok) if req.detok is not None else ""
            if req.params.stop:
                delta, hit = self._stop_strings(req, delta)
                reason = "stop" if hit else None
            else:
                req.text += delta
        if reason is None and (len(req.output) >= req.params.max_new_tokens
                               or len(req.tokens) >= self.max_seq_len):
            reason = "length"
        if reason is not None and req.held:  # no stop string came: release the held text
            req.text += req.held
            delta += req.held
            req.held = ""
        if reason is not None:
            if req in self.running:
                self.running.remove(req)
            self._finish(req, reason, notify=False)
        if req.on_token is not None:
            req.on_token(req, tok, delta)

    def _stop_strings(self, req: Request, delta: str) -> tuple[str, bool]:
        """Release text up to a stop string; hold back a tail that could start one."""
        pending = req.held + delta
        for s in req.params.stop:
            i = pending.find(s)
            if i >= 0:
                out = pending[:i]
                req.text += out
                req.held = ""
                return out, True
        keep = max((len(s) - 1 for s in req.params.stop), default=0)
        cut = len(pending)
        for k in range(min(keep, len(pending)), 0, -1):
            if any(s.startswith(pending[-k:]) for s in req.params.stop):
                cut = len(pending) - k
                break
        out, req.held = pending[:cut], pending[cut:]
        req.text += out
        return out, False

    def _finish(self, req: Request, reason: str, notify: bool = True) -> None:
        """Mark `req` finished and free its blocks; `notify` calls its on_token with token -1
        (a finish that no token brought: an abort, or max_new_tokens=0)."""
        req.finished, req.finish_reason = True, reason
        self.pool.release(req.blocks)
        if notify and req.on_token is not None:
            req.on_token(req, -1, "")

    # ------------------------------------------------------------------ drive
    def run_until_done(self, reqs: Sequence[Request]) -> None:
        while not all(r.finished for r in reqs):
            if not self.step() and not self.has_work():
                break


def _available_memory() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # psutil missing or unreadable /proc: no cap
        return None
