"""The layer benchmark's options on `moec bench` (the form without an ARTIFACT argument).

`moec bench` shares --tokens, --warmup, --repeat and --json with the artifact benchmark
(`moec bench ARTIFACT [--ep N]`, moec.distributed.launch); the options below only apply here.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from moec.errors import InputError

QUICK_TOKENS = (1, 64)


def add_arguments(s: argparse.ArgumentParser) -> None:
    from moec.bench.layer import DEFAULT_SHAPES, DTYPES, EXPERTS_IMPLEMENTATIONS, ROUTINGS, SHAPES
    from moec.bench.runner import BF16_JSON, SYSTEM_KINDS

    g = s.add_argument_group("layer benchmark (moec bench without ARTIFACT)")
    g.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(DEFAULT_SHAPES),
                   help="layers to benchmark (default: %(default)s)")
    g.add_argument("--routing", nargs="+", choices=ROUTINGS, default=list(ROUTINGS),
                   help="uniform, and/or Zipf-skewed expert popularity (default: both)")
    g.add_argument("--systems", nargs="+", choices=SYSTEM_KINDS, default=list(SYSTEM_KINDS),
                   help="systems to time besides hf-eager, which always runs as the reference "
                   "(default: all)")
    g.add_argument("--hf-impls", nargs="+", choices=EXPERTS_IMPLEMENTATIONS,
                   default=list(EXPERTS_IMPLEMENTATIONS), help="transformers experts "
                   "implementations to try; the table shows the fastest")
    g.add_argument("--threads", type=int, default=2, help="threads for every system "
                   "(torch, TVM, ONNX Runtime; default: %(default)s)")
    g.add_argument("--quick", action="store_true", help=f"a small run: tokens "
                   f"{' '.join(map(str, QUICK_TOKENS))} unless --tokens, 1 warm-up round, "
                   f"at most 3 timed rounds, limits from 3 repetitions instead of 10")
    g.add_argument("--zipf", type=float, default=1.0, metavar="S",
                   help="Zipf exponent of the skewed routing (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="seed of the weights, inputs and "
                   "routing (default: %(default)s)")
    g.add_argument("--tol", type=float, default=1e-4, help="max relative error against "
                   "hf-eager for a system to be timed (default: %(default)s)")
    g.add_argument("--no-plot", action="store_true", help="skip the PNG")
    g.add_argument("--no-touch", action="store_true", help="skip the untimed call of every "
                   "system on the largest token count before a layer's first case")
    g.add_argument("--dtype", choices=list(DTYPES), default="float32",
                   help="the blocks' dtype (default: %(default)s); bfloat16 writes "
                   f"{BF16_JSON} unless --json")
    g.add_argument("--settle", type=float, default=None, metavar="SECONDS",
                   help="pause after building each layer's systems, before timing it "
                   "(default: 20, 0 with --quick; see moec.bench.runner.SETTLE_S)")


def run_from_args(a: argparse.Namespace) -> int:
    """`moec bench` without an artifact: run moec.bench and write its results."""
    from moec.bench.layer import DEFAULT_TOKENS
    from moec.bench.runner import BF16_JSON, DEFAULT_JSON, SETTLE_S, Options, run

    if getattr(a, "ep", None) is not None:
        raise InputError("--ep applies to `moec bench ARTIFACT`; the layer benchmark runs in "
                         "one process")
    if a.threads < 1:
        raise InputError(f"--threads must be >= 1, got {a.threads}")
    settle = a.settle if a.settle is not None else (0.0 if a.quick else SETTLE_S)
    if not settle >= 0:
        raise InputError(f"--settle must be >= 0 seconds, got {a.settle}")
    tokens = a.tokens or (QUICK_TOKENS if a.quick else DEFAULT_TOKENS)
    warmup, repeat = (min(a.warmup, 1), min(a.repeat, 3)) if a.quick else (a.warmup, a.repeat)
    opts = Options(shapes=tuple(a.shapes), tokens=tuple(tokens), routings=tuple(a.routing),
                   systems=tuple(a.systems), hf_impls=tuple(a.hf_impls), warmup=warmup,
                   repeat=repeat, threads=a.threads, seed=a.seed, zipf_s=a.zipf, tol=a.tol,
                   json_path=Path(a.json) if a.json else
                   (DEFAULT_JSON if a.dtype == "float32" else BF16_JSON), plot=not a.no_plot,
                   limits_reps=3 if a.quick else 10, settle_s=settle,
                   touch=not a.no_touch, dtype=a.dtype,
                   command=" ".join(["moec", *map(shlex.quote, a.argv)]))
    run(opts)
    return 0
