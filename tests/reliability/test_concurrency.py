"""One CompiledModel called from 8 threads at once gives exactly the serial results.

Calls into one model are serialised by its lock (the Relax VM keeps per-call state; without the
lock this test segfaults, see docs/security.md "Concurrency"); input conversion and output
wrapping run outside it. Separate models (one per thread) run truly in parallel.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import moec

from .conftest import MAX_TOKENS, Demo, tokens

THREADS = 8
SIZES = [0, 1, 3, 7, 16, 31, 33, MAX_TOKENS]


def _hammer(call: Callable[[int, Any], Any], xs: list[Any], rounds: int) -> list[list[Any]]:
    """Each of THREADS threads calls `call(thread, x)` on every input, `rounds` times, all
    starting together; returns results[thread][k] in input order (last round)."""
    results: list[list[Any]] = [[None] * len(xs) for _ in range(THREADS)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(THREADS)

    def work(t: int) -> None:
        try:
            barrier.wait()
            for r in range(rounds):
                for k in range(len(xs)):
                    j = (k + t) % len(xs)  # threads start on different inputs
                    y = call(t, xs[j])
                    if r == rounds - 1:
                        results[t][j] = y
        except BaseException as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not any(th.is_alive() for th in threads), "a call hung"
    assert not errors, errors
    return results


def test_eight_threads_match_serial_calls(demo: Demo) -> None:
    xs = [tokens(n, seed=n) for n in SIZES]
    serial = [demo.model(x) for x in xs]
    results = _hammer(lambda t, x: demo.model(x), xs, rounds=5)
    for per_thread in results:
        for got, want in zip(per_thread, serial, strict=True):
            np.testing.assert_array_equal(got, want)  # bit-identical


def test_threads_mixing_numpy_torch_and_bad_inputs(demo: Demo) -> None:
    """Errors in one thread (InputError) do not disturb the calls of the others."""
    x = tokens(9, seed=2)
    want = demo.model(x)

    def call(t: int, arg: Any) -> Any:
        if t % 4 == 3:
            try:
                demo.model(np.zeros((MAX_TOKENS + 1, x.shape[1]), np.float32))
            except moec.InputError:
                return "refused"
            return "accepted?!"
        return demo.model(torch.from_numpy(arg) if t % 2 else arg)

    for t, per_thread in enumerate(_hammer(call, [x], rounds=20)):
        got = per_thread[0]
        if t % 4 == 3:
            assert got == "refused"
        else:
            np.testing.assert_array_equal(np.asarray(got), want)


def test_one_model_per_thread(demo: Demo) -> None:
    models = [moec.load(demo.path) for _ in range(THREADS)]
    xs = [tokens(n, seed=n) for n in SIZES[1:]]
    serial = [demo.model(x) for x in xs]
    for per_thread in _hammer(lambda t, x: models[t](x), xs, rounds=3):
        for got, want in zip(per_thread, serial, strict=True):
            np.testing.assert_array_equal(got, want)
