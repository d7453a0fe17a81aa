"""`moec demo`: compile, save, load and run the built-in demo model (moec.models.reference),
checked and timed against torch."""

from __future__ import annotations

import time
from collections.abc import Sequence


def run_demo(output: str = "demo.moec", tokens: Sequence[int] = (1, 64, 512),
             max_tokens: int = 4096, threads: int = 2) -> int:
    """Compile the demo model, save it to `output`, load it back, and print its error and
    time against torch at each token count."""
    import numpy as np
    import torch

    import moec
    from moec.models.reference import demo_model
    from moec.passes.manager import relative_error

    torch.set_num_threads(threads)
    module, example = demo_model()
    t0 = time.perf_counter()
    art = moec.compile(module, example, max_tokens=max_tokens)
    print(f"compiled the demo model in {time.perf_counter() - t0:.1f} s")
    art.save(output)
    model = moec.load(output)
    print(f"saved and loaded {output}")
    hidden = example[0].shape[1]
    rng = np.random.default_rng(0)
    print(f"{'tokens':>6} {'max rel err':>12} {'moec ms':>9} {'torch ms':>9} {'speed-up':>8}")
    for n in tokens:
        xs = [rng.standard_normal((n, hidden)).astype(np.float32) for _ in range(4)]
        err = 0.0
        with torch.inference_mode():
            for x in xs:
                want = module(torch.from_numpy(x)).numpy()
                err = max(err, relative_error(model(x), want))
            tm = _time(lambda i, xs=xs: model(xs[i % 4]))
            tt = _time(lambda i, xs=xs: module(torch.from_numpy(xs[i % 4])))
        print(f"{n:>6} {err:>12.2e} {tm * 1e3:>9.3f} {tt * 1e3:>9.3f} {tt / tm:>7.2f}x")
    return 0


def _time(fn, min_time: float = 0.3) -> float:
    fn(0)
    times, i, t_end = [], 0, time.perf_counter() + min_time
    while time.perf_counter() < t_end or len(times) < 5:
        t = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t)
        i += 1
    return sorted(times)[len(times) // 2]
