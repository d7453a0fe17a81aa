"""POST /v1/completions and /v1/chat/completions: a request becomes a `Job` for the engine
thread; the handler then only waits for its events and writes them out, whole (one JSON
response) or as they come (server-sent events, `data: {chunk}` lines ending with
`data: [DONE]`), as the OpenAI API defines both.

A request that ends early is cancelled in the engine (its cache blocks freed): the client
disconnected (streaming or not), or it ran past the server's per-request timeout (504, or an
error event on a stream).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from moec.errors import InputError
from moec.serve.protocol import ApiError, ChatCompletionRequest, CompletionRequest, parse
from moec.serve.runner import EngineStopped, Event, Job, QueueFull
from moec.serve.sse import EventStream


class _Timeout(Exception):
    pass


@dataclass
class _Choice:
    """What one choice has produced so far."""

    text: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    # (token text, logprob, top alternatives [(text, logprob)], its offset in the text)
    logprobs: list[tuple[str, float, list[tuple[str, float]], int]] = field(
        default_factory=list)
    chars: int = 0  # length of the token texts so far
    finish_reason: str | None = None


class Generation:
    """The two generation endpoints over one server state (moec.serve.app.ServerState)."""

    def __init__(self, state: Any) -> None:
        self.s = state

    # ------------------------------------------------------------------ requests
    async def completions(self, request: Request) -> Response:
        return await self._handle(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._handle(request, chat=True)

    async def _handle(self, request: Request, chat: bool) -> Response:
        s = self.s
        arrival = time.perf_counter()
        if s.draining:
            raise ApiError(503, "the server is shutting down", type="server_error",
                           code="shutting_down")
        try:
            raw = await request.body()
        except ClientDisconnect:  # left while sending the body: nothing to answer
            return Response(status_code=499)
        try:
            body = parse(ChatCompletionRequest if chat else CompletionRequest, raw)
            self._check_model(body.model)
            prompts = self._chat_prompt(body) if chat else self._prompts(body)
            job = self._job(body, prompts, chat)
        except ApiError:
            s.metrics.outcome("invalid")
            raise
        job.arrival = arrival  # time to first token and the timeout count from here
        try:
            await s.runner.submit(job)
        except QueueFull:
            s.metrics.outcome("rejected")
            raise ApiError(503, "the server is at capacity (its request queue is full); "
                           "retry later", type="server_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except EngineStopped:
            s.metrics.outcome("error")
            raise ApiError(503, "the engine is not running (the server is stopping)",
                           type="server_error", code="engine_stopped") from None
        except InputError as e:
            s.metrics.outcome("invalid")
            raise ApiError(400, str(e), param="messages" if chat else "prompt",
                           code="context_length_exceeded" if "too long" in str(e)
                           else None) from None
        meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "object": ("chat.completion" if chat else "text_completion")
                + (".chunk" if chat and body.stream else ""),
                "created": int(time.time()), "model": s.model_name}
        if body.stream:
            return EventStream(self._stream(job, body, chat, meta),
                               on_close=lambda: self._closed(job))
        return await self._respond(request, job, body, chat, meta)

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.s.model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves "
                           f"{self.s.model_name!r} (GET /v1/models)", param="model",
                           code="model_not_found")

    def _prompts(self, body: CompletionRequest) -> list[list[int]]:
        p = body.prompt
        items: list[Any] = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) \
            else list(p)
        if not items:
            raise ApiError(400, "prompt: give at least one prompt", param="prompt")
        out = []
        for item in items:
            if isinstance(item, str):
                if self.s.tokenizer is None:
                    raise ApiError(400, "this model has no tokenizer (no tokenizer.json in its "
                                   "checkpoint folder): send the prompt as token ids",
                                   param="prompt")
                item = self.s.tokenizer.encode(item)
            out.append(list(item))
        return out

    def _chat_prompt(self, body: ChatCompletionRequest) -> list[list[int]]:
        tok = self.s.tokenizer
        if tok is None or tok.chat_template is None:
            raise ApiError(400, "this model has no chat template (its checkpoint folder had "
                           "none): use /v1/completions", param="messages")
        messages = [{"role": m.role, "content": m.text(i),
                     **({"name": m.name} if m.name else {})}
                    for i, m in enumerate(body.messages)]
        try:
            return [tok.encode_chat(messages, add_generation_prompt=body.add_generation_prompt)]
        except InputError as e:
            raise ApiError(400, str(e), param="messages") from None

    def _job(self, body: Any, prompts: list[list[int]], chat: bool) -> Job:
        eng = self.s.engine
        max_new = body.max_new_tokens if chat else body.max_tokens
        kw = body.sampling(eng.max_seq_len if max_new is None else max_new)
        want_lp = body.logprobs if chat else body.logprobs is not None
        top = (body.top_logprobs or 0) if chat else (body.logprobs or 0)
        params = []
        try:
            for _ in prompts:
                for j in range(body.n):
                    seed = None if body.seed is None else body.seed + j
                    params.append(eng.params(**{**kw, "seed": seed, "logprobs": want_lp}))
        except InputError as e:
            raise ApiError(400, str(e)) from None
        return Job(prompts, params, top_logprobs=top)

    # ------------------------------------------------------------------ answers
    def _closed(self, job: Job) -> None:
        """The stream ended: finished, timed out, or the client left before the end."""
        if job.outcome is None:
            self._end(job, "cancelled")

    async def _events(self, job: Job) -> AsyncIterator[Event]:
        """The job's events until every choice finished; _Timeout past the deadline."""
        timeout = self.s.request_timeout
        left = job.n_choices
        while left:
            if timeout:
                remaining = job.arrival + timeout - time.perf_counter()
                try:
                    batch = await asyncio.wait_for(job.queue.get(), max(remaining, 0))
                except asyncio.TimeoutError:  # TimeoutError since 3.11; 3.10 differs
                    raise _Timeout from None
            else:
                batch = await job.queue.get()
            for ev in batch:
                if ev.finished:
                    left -= 1
                yield ev

    def _end(self, job: Job, outcome: str) -> None:
        job.outcome = outcome
        if outcome != "success":
            self.s.runner.cancel(job)
        self.s.metrics.outcome(outcome, time.perf_counter() - job.arrival
                               if outcome == "success" else None)

    async def _respond(self, request: Request, job: Job, body: Any, chat: bool,
                       meta: dict[str, Any]) -> Response:
        choices = [_Choice() for _ in range(job.n_choices)]

        async def collect() -> None:
            async for ev in self._events(job):
                self._record(choices[ev.index], ev)

        task = asyncio.ensure_future(collect())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not task.done():  # the client left
            task.cancel()
            self._end(job, "cancelled")
            return Response(status_code=499)
        try:
            task.result()
        except _Timeout:
            self._end(job, "timeout")
            raise ApiError(504, f"the request ran past the server's timeout "
                           f"({self.s.request_timeout:g} s)", type="server_error",
                           code="timeout") from None
        if job.error:
            self._end(job, "error")
            raise ApiError(500, job.error, type="server_error")
        self._end(job, "success")
        out = {**meta, "choices": [self._choice(job, i, c, body, chat)
                                   for i, c in enumerate(choices)],
               "usage": self._usage(job, choices)}
        return JSONResponse(out)

    def _record(self, c: _Choice, ev: Event) -> list[tuple]:
        """Add an event to its choice; returns its logprob entry ([] or one)."""
        entry = []
        if ev.token >= 0:
            if ev.logprob is not None:
                piece = self._piece(c.tokens, ev.token)
                top = [(self._piece(c.tokens, a), b) for a, b in ev.top or ()]
                entry = [(piece, ev.logprob, top, c.chars)]
                c.chars += len(piece)
                c.logprobs += entry
            c.tokens.append(ev.token)
        if ev.text:
            c.text.append(ev.text)
        if ev.finished:
            c.finish_reason = ev.finish_reason
        return entry

    def _usage(self, job: Job, choices: list[_Choice]) -> dict[str, int]:
        p = sum(len(x) for x in job.prompts)
        g = sum(len(c.tokens) for c in choices)
        return {"prompt_tokens": p, "completion_tokens": g, "total_tokens": p + g}

    def _choice(self, job: Job, i: int, c: _Choice, body: Any, chat: bool) -> dict[str, Any]:
        text = "".join(c.text)
        out: dict[str, Any] = {"index": i}
        if chat:
            out["message"] = {"role": "assistant", "content": text}
            out["logprobs"] = self._chat_logprobs(c.logprobs) if body.logprobs else None
        else:
            out["text"] = text
            out["logprobs"] = self._completion_logprobs(c.logprobs, body.logprobs) \
                if body.logprobs is not None else None
        out["finish_reason"] = c.finish_reason
        if body.return_token_ids:
            out["token_ids"] = c.tokens
            out["prompt_token_ids"] = job.prompt_of(i)
        return out

    async def _stream(self, job: Job, body: Any, chat: bool, meta: dict[str, Any]
                      ) -> AsyncIterator[bytes]:
        choices = [_Choice() for _ in range(job.n_choices)]

        def chunk(items: list[dict[str, Any]], **extra: Any) -> bytes:
            return _sse({**meta, "choices": items, **extra})

        if chat:
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                          "logprobs": None, "finish_reason": None}
                         for i in range(job.n_choices)])
        try:
            async for ev in self._events(job):
                lp = self._record(choices[ev.index], ev)
                if not (ev.text or lp or ev.finished):
                    continue
                if ev.finished and job.error:
                    continue
                item: dict[str, Any] = {"index": ev.index}
                if chat:
                    item["delta"] = {"content": ev.text} if ev.text else {}
                    item["logprobs"] = self._chat_logprobs(lp) if lp else None
                else:
                    item["text"] = ev.text
                    item["logprobs"] = self._completion_logprobs(lp, body.logprobs) \
                        if lp else None
                item["finish_reason"] = ev.finish_reason if ev.finished else None
                if body.return_token_ids and ev.token >= 0:
                    item["token_ids"] = [ev.token]
                yield chunk([item])
        except _Timeout:
            self._end(job, "timeout")
            yield _sse(ApiError(504, f"the request ran past the server's timeout "
                                f"({self.s.request_timeout:g} s)", type="server_error",
                                code="timeout").body())
            return
        if job.error:
            self._end(job, "error")
            yield _sse(ApiError(500, job.error, type="server_error").body())
            return
        self._end(job, "success")
        if body.stream_options is not None and body.stream_options.include_usage:
            yield chunk([], usage=self._usage(job, choices))
        yield b"data: [DONE]\n\n"

    # ------------------------------------------------------------------ logprobs
    def _piece(self, before: list[int], token: int) -> str:
        """The text `token` adds after the tokens `before` (decoded with up to 4 of them as
        context, so that pieces concatenate to the text: a word-start marker becomes a
        space, as it does in the text; special tokens shown), or "token_id:N" without a
        tokenizer."""
        tok = self.s.tokenizer
        if tok is None:
            return f"token_id:{token}"
        ctx = before[-4:]
        alone = tok.decode([token], skip_special_tokens=False)
        if not ctx:
            return alone
        prev = tok.decode(ctx, skip_special_tokens=False)
        full = tok.decode([*ctx, token], skip_special_tokens=False)
        return full[len(prev):] if full.startswith(prev) else alone

    def _chat_logprobs(self, lps: list) -> dict[str, Any]:
        def entry(s: str, lp: float) -> dict[str, Any]:
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

        return {"content": [{**entry(s, lp), "top_logprobs": [entry(a, b) for a, b in top]}
                            for s, lp, top, _ in lps], "refusal": None}

    def _completion_logprobs(self, lps: list, k: int | None) -> dict[str, Any]:
        return {"tokens": [s for s, _, _, _ in lps],
                "token_logprobs": [lp for _, lp, _, _ in lps],
                "top_logprobs": [dict(top) for _, _, top, _ in lps] if k else None,
                "text_offset": [off for _, _, _, off in lps]}


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + \
        b"\n\n"


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
