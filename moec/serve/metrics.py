"""The server's metrics, written in the Prometheus text format (version 0.0.4) by hand: a few
counters, gauges and histograms need no client library.

Counters and histograms are updated from the engine thread (tokens) and the event loop
(request outcomes) under one lock; gauges (running, waiting, KV blocks) are read from the
engine when scraped.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Sequence

# seconds; the upper bounds of the histogram buckets (le), +Inf added when written
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
               0.75, 1.0, 2.5)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0)

# the outcomes of a generation request (moec_requests_total{outcome=...})
OUTCOMES = ("success", "invalid", "unauthorized", "rejected", "timeout", "cancelled", "error")
FINISH_REASONS = ("stop", "length")


class Histogram:
    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.sum += v
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, cum = [], 0
        for le, c in zip((*map(_num, self.buckets), "+Inf"), self.counts, strict=True):
            cum += c
            out.append(f'{name}_bucket{{le="{le}"}} {cum}')
        out += [f"{name}_sum {_num(self.sum)}", f"{name}_count {self.count}"]
        return out


class Metrics:
    """What /metrics reports. `gauges` is called at each scrape: name -> (help, value)."""

    def __init__(self, gauges: Callable[[], dict[str, tuple[str, float]]]) -> None:
        self._lock = threading.Lock()
        self._gauges = gauges
        self.requests = dict.fromkeys(OUTCOMES, 0)
        self.finished = dict.fromkeys(FINISH_REASONS, 0)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)

    def outcome(self, outcome: str, duration: float | None = None) -> None:
        with self._lock:
            self.requests[outcome] += 1
            if duration is not None:
                self.e2e.observe(duration)

    def prompt(self, tokens: int) -> None:
        with self._lock:
            self.prompt_tokens += tokens

    def token(self, ttft: float | None, itl: float | None) -> None:
        """A generated token; `ttft` for a request's first, `itl` (the time since the
        request's previous token) for the others."""
        with self._lock:
            self.generation_tokens += 1
            if ttft is not None:
                self.ttft.observe(ttft)
            if itl is not None:
                self.itl.observe(itl)

    def finish(self, reason: str) -> None:
        if reason in self.finished:
            with self._lock:
                self.finished[reason] += 1

    def render(self) -> str:
        out: list[str] = []

        def metric(name: str, kind: str, doc: str, lines: list[str]) -> None:
            out.extend([f"# HELP {name} {doc}", f"# TYPE {name} {kind}", *lines])

        with self._lock:
            metric("moec_requests_total", "counter", "Generation requests by outcome.",
                   [f'moec_requests_total{{outcome="{k}"}} {v}' for k, v in
                    self.requests.items()])
            metric("moec_request_finish_total", "counter", "Finished sequences (choices) by "
                   "finish reason.", [f'moec_request_finish_total{{reason="{k}"}} {v}'
                                      for k, v in self.finished.items()])
            metric("moec_prompt_tokens_total", "counter", "Prompt tokens of accepted requests.",
                   [f"moec_prompt_tokens_total {self.prompt_tokens}"])
            metric("moec_generation_tokens_total", "counter", "Generated tokens.",
                   [f"moec_generation_tokens_total {self.generation_tokens}"])
            metric("moec_time_to_first_token_seconds", "histogram", "Time from a request's "
                   "arrival to its first generated token.",
                   self.ttft.lines("moec_time_to_first_token_seconds"))
            metric("moec_inter_token_latency_seconds", "histogram", "Time between two "
                   "consecutive tokens of one sequence.",
                   self.itl.lines("moec_inter_token_latency_seconds"))
            metric("moec_request_duration_seconds", "histogram", "Time from a request's "
                   "arrival to its last token.",
                   self.e2e.lines("moec_request_duration_seconds"))
        for name, (doc, value) in self._gauges().items():
            metric(name, "gauge", doc, [f"{name} {_num(value)}"])
        return "\n".join(out) + "\n"


def _num(v: float) -> str:
    return repr(float(v)) if isinstance(v, float) else str(v)


def parse(text: str) -> dict[str, float]:
    """Samples of a Prometheus text page: 'name{labels}' -> value (for tests and scripts)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        out[key] = float(value)
    return out
