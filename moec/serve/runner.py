"""The engine thread: the only thread that touches the `Engine`.

HTTP handlers run on the asyncio event loop and never take the engine's lock: they build a
`Job` (one HTTP request: its prompts, n choices each, their SamplingParams) and hand it to
`EngineRunner.submit`, which puts it in an inbox and wakes the engine thread. Between two
steps the engine thread adds the inbox's jobs to the engine (admission control: at most
`max_batch + max_queue` sequences outstanding, beyond that the job is refused with
`QueueFull`), applies cancellations, runs `Engine.step()`, and passes the step's tokens to the
event loop in one `call_soon_threadsafe` per step. With nothing to do it sleeps on an Event
(no spinning); `submit` and `cancel` wake it.

A step that raises (a kernel failure) fails the jobs in flight with that error, frees their
cache blocks, and the thread goes on serving.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moec.engine.engine import Engine, Request
from moec.engine.sampling import SamplingParams, log_softmax
from moec.errors import InputError
from moec.serve.metrics import Metrics

log = logging.getLogger("moec.serve")

DEFAULT_MAX_QUEUE = 256  # sequences waiting beyond the running batch before 503
DEFAULT_TIMEOUT = 600.0  # seconds a request may take, queueing included


class QueueFull(Exception):
    """The server has `max_batch + max_queue` sequences outstanding (HTTP 503)."""


class EngineStopped(Exception):
    """The engine thread is not running (the server is stopping; HTTP 503)."""


@dataclass
class Event:
    """A token of choice `index` (token -1: a finish without a token), the text it released,
    its log-probability and top alternatives [(token, logprob)] when asked for."""

    index: int
    token: int
    text: str
    logprob: float | None
    top: list[tuple[int, float]] | None
    finished: bool
    finish_reason: str | None


@dataclass(eq=False)
class Job:
    """One HTTP generation request: `prompts[i // n]` generates choice i with `params[i]`."""

    prompts: list[list[int]]
    params: list[SamplingParams]
    top_logprobs: int = 0
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)
    arrival: float = field(default_factory=time.perf_counter)
    queue: asyncio.Queue[list[Event]] = field(default_factory=asyncio.Queue)
    admitted: asyncio.Future[None] | None = None
    error: str | None = None  # set when the engine failed under this job
    outcome: str | None = None  # set by the handler when it answers (metrics)
    reqs: list[Request] = field(default_factory=list)
    unfinished: int = 0  # engine thread only
    _last: dict[int, float] = field(default_factory=dict)  # choice -> its last token's time
    _pending: list[Event] = field(default_factory=list)

    @property
    def n_choices(self) -> int:
        return len(self.params)

    def prompt_of(self, choice: int) -> list[int]:
        return self.prompts[choice * len(self.prompts) // len(self.params)]

    async def events(self):
        """Batches of events as the engine produces them."""
        while True:
            yield await self.queue.get()


class EngineRunner:
    """Owns the engine thread (see the module doc). `start()`, then `submit` / `cancel` from
    the event loop; `stop()` ends the thread (requests in flight are aborted)."""

    def __init__(self, engine: Engine, metrics: Metrics, max_queue: int) -> None:
        self.engine, self.metrics, self.max_queue = engine, metrics, max_queue
        self._inbox: deque[tuple[str, Job]] = deque()
        self._wake = threading.Event()
        self._stop = False
        self._jobs: set[Job] = set()
        self._top: dict[int, list[tuple[int, float]]] = {}  # request id -> top logprobs
        self._want_top: dict[int, int] = {}  # request id -> how many
        self.thread = threading.Thread(target=self._loop, name="moec-engine", daemon=True)
        self._dirty: list[Job] = []  # jobs with events not yet delivered
        self.failures = 0
        engine.on_logits = self._on_logits

    # ------------------------------------------------------------------ event loop side
    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop = True
        self._wake.set()
        if self.thread.is_alive():
            self.thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and not self._stop

    async def submit(self, job: Job) -> None:
        """Queue `job` with the engine; returns once it is admitted. Raises QueueFull, or the
        engine's InputError for a prompt that can never run (too long for the context), or
        EngineStopped."""
        if not self.alive:
            raise EngineStopped()
        job.admitted = job.loop.create_future()
        self._inbox.append(("add", job))
        self._wake.set()
        try:
            await job.admitted
        except asyncio.CancelledError:  # the client left while the job was being added
            self.cancel(job)
            raise

    def cancel(self, job: Job) -> None:
        """Abort a job's unfinished requests (client gone, timeout); safe to call twice."""
        self._inbox.append(("cancel", job))
        self._wake.set()

    # ------------------------------------------------------------------ engine thread
    def _loop(self) -> None:
        eng = self.engine
        while not self._stop:
            self._wake.clear()
            self._drain_inbox()
            if eng.has_work():
                try:
                    eng.step()
                except Exception as e:  # a kernel failure: fail what is in flight, go on
                    log.exception("engine step failed")
                    self._fail_all(f"the engine failed: {type(e).__name__}: {e}")
                self._flush()
            else:
                self._flush()
                self._wake.wait(1.0)
        for job in list(self._jobs):  # stopping: free everything
            self._abort(job)
        self._flush()

    def _drain_inbox(self) -> None:
        while self._inbox:
            what, job = self._inbox.popleft()
            try:
                if what == "add":
                    self._add(job)
                else:
                    self._abort(job)
            except Exception as e:  # a bug: answer the job rather than hang it
                log.exception("the engine thread failed on a request")
                job.error = f"internal error: {type(e).__name__}: {e}"
                self._jobs.discard(job)
                self._resolve(job, e)

    def _add(self, job: Job) -> None:
        eng = self.engine
        limit = eng.max_batch + self.max_queue
        if job.n_choices > limit:
            self._resolve(job, InputError(
                f"this request asks for {job.n_choices} sequences (prompts x n); the server "
                f"runs at most {limit} at once (--max-batch + --max-queue)"))
            return
        if len(eng.running) + len(eng.waiting) + job.n_choices > limit:
            self._resolve(job, QueueFull())
            return
        job.unfinished = job.n_choices
        self._jobs.add(job)
        try:
            for i, p in enumerate(job.params):
                req = eng.add(job.prompt_of(i), p, on_token=self._on_token_of(job, i))
                job.reqs.append(req)
                if job.top_logprobs:
                    self._want_top[req.id] = job.top_logprobs
        except Exception as e:  # InputError: a prompt that can never run
            self._abort(job)
            job._pending.clear()
            self._resolve(job, e)
            return
        self.metrics.prompt(sum(len(p) for p in job.prompts))
        self._resolve(job, None)

    def _abort(self, job: Job) -> None:
        for r in job.reqs:
            if not r.finished:
                self.engine.abort(r)
        self._jobs.discard(job)

    def _fail_all(self, message: str) -> None:
        self.failures += 1
        for job in list(self._jobs):
            job.error = message
            self._abort(job)
        for r in list(self.engine.running) + list(self.engine.waiting):
            self.engine.abort(r)  # requests of no job (cannot happen; never leak blocks)

    def _on_logits(self, req: Request, logits: np.ndarray) -> None:
        k = self._want_top.get(req.id)
        if k:
            lp = log_softmax(logits.astype(np.float64))
            top = np.argsort(-lp, kind="stable")[:k]
            self._top[req.id] = [(int(t), float(lp[t])) for t in top]

    def _on_token_of(self, job: Job, index: int):
        def on_token(req: Request, tok: int, text: str) -> None:
            now = time.perf_counter()
            lp = top = None
            if tok >= 0:
                if req.params.logprobs and req.logprobs:
                    lp = req.logprobs[-1]
                top = self._top.pop(req.id, None)
                last = job._last.get(index)
                self.metrics.token(now - job.arrival if last is None else None,
                                   None if last is None else now - last)
                job._last[index] = now
            job._pending.append(Event(index, tok, text, lp, top, req.finished,
                                      req.finish_reason))
            if req.finished:
                self._want_top.pop(req.id, None)
                self._top.pop(req.id, None)
                if req.finish_reason in ("stop", "length"):
                    self.metrics.finish(req.finish_reason)
                job.unfinished -= 1
                if job.unfinished <= 0:
                    self._jobs.discard(job)
            if job not in self._dirty:
                self._dirty.append(job)
        return on_token

    def _flush(self) -> None:
        if not self._dirty:
            return
        batches = [(job, job._pending) for job in self._dirty]
        for job in self._dirty:
            job._pending = []
        self._dirty = []
        by_loop: dict[Any, list] = {}
        for job, evs in batches:
            by_loop.setdefault(job.loop, []).append((job.queue, evs))
        for loop, items in by_loop.items():
            _call(loop, _deliver, items)

    def _resolve(self, job: Job, exc: BaseException | None) -> None:
        self._flush()  # events of a max_tokens=0 job come before its admission
        assert job.admitted is not None
        _call(job.loop, _settle, job.admitted, exc)


def _call(loop: asyncio.AbstractEventLoop, fn, *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop is closed: the server is gone
        pass


def _deliver(items: list) -> None:
    for queue, evs in items:
        queue.put_nowait(evs)


def _settle(fut: asyncio.Future, exc: BaseException | None) -> None:
    if fut.done():  # the handler gave up waiting (client gone)
        return
    if exc is None:
        fut.set_result(None)
    else:
        fut.set_exception(exc)
