"""Expert parallelism over gloo ranks on one machine, against the single-process artifact.

Each rank runs its own tokens (counts differ between ranks, some ranks have none) through the
EP model and through the plain single-process model; outputs must agree to 1e-5 relative (fp32).
Ranks are spawned processes (tests/distributed/_workers.py). Starting a group costs seconds
(torch + TVM imports per rank), so one group per world size runs every scenario in turn and the
tests below check its parts: 2 ranks also load mismatched artifacts, run the `moec bench` code
path and lose a rank that dies; 4 ranks end with a rank that stops answering.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import moec
from moec.distributed import shard_bounds
from moec.distributed.plan import parse_plan
from moec.errors import ArtifactError

from . import _workers as W
from .conftest import VOCAB

RTOL = 1e-5
# Tokens of each rank (rank r takes entry r % len) in successive calls: ranks differ, some
# have none, 64 fills whole 32-row tiles, and one call has no token anywhere.
UNIFORM_CALLS = [[5, 17, 0, 33], [64, 64, 64, 64], [1, 0, 100, 31], [0, 0, 0, 0]]
SKEWED_CALLS = [[8, 0, 13, 3], [40, 21, 0, 7]]
LM_CALLS = [[3, 0, 17, 9], [33, 5, 1, 0]]  # one sequence of token ids per rank


def _run_group(world, two_layer, skewed, whole_lm, quantized, tmp):
    cases = [("uniform", str(two_layer), UNIFORM_CALLS, 0),
             ("skewed", str(skewed), SKEWED_CALLS, 0),
             ("quantized", str(quantized), UNIFORM_CALLS[:2], 0)]
    if whole_lm is not None:
        cases.append(("whole_lm", str(whole_lm), LM_CALLS, VOCAB))
    if world == 2:
        extra = {"mismatch": [str(two_layer), str(skewed)],
                 "bench": (str(two_layer), str(tmp / "bench.json")),
                 "threads": (str(two_layer), 4),
                 "fail": ("die", str(two_layer), str(tmp))}
    else:
        extra = {"fail": ("hang", str(two_layer), str(tmp))}
    results = W.run_ranks(world, W.scenario, cases, extra)
    for rank, res in sorted(results.items()):
        detail = res["value"][2] if res["status"] == "error" else res
        assert res["status"] == "ok", f"rank {rank}: {detail}"
    return world, results, tmp


@pytest.fixture(scope="module")
def ep2(two_layer, skewed, whole_lm, quantized, tmp_path_factory):
    return _run_group(2, two_layer, skewed, whole_lm, quantized, tmp_path_factory.mktemp("ep2"))


@pytest.fixture(scope="module")
def ep4(two_layer, skewed, whole_lm, quantized, tmp_path_factory):
    return _run_group(4, two_layer, skewed, whole_lm, quantized, tmp_path_factory.mktemp("ep4"))


@pytest.fixture(params=[2, 4], ids=lambda n: f"{n}ranks")
def ep_run(request):
    return request.getfixturevalue(f"ep{request.param}")


def _records(results, case):
    return [(rank, rec) for rank, res in results.items() for rec in res["value"]["equality"]
            if rec["case"] == case]


def test_outputs_equal_single_process(ep_run):
    world, results, _ = ep_run
    records = _records(results, "uniform") + _records(results, "skewed")
    assert len(records) == world * (len(UNIFORM_CALLS) + len(SKEWED_CALLS))
    quant = _records(results, "quantized")
    assert len(quant) == world * 2
    records += quant + _records(results, "whole_lm")
    for rank, rec in records:
        assert rec["shape_ok"], (rank, rec)
        assert rec["err"] <= RTOL, (rank, rec)
    # Same kernels, same per-row arithmetic: in practice the outputs are bitwise equal.
    assert all(rec["bitwise"] for _, rec in records)


def test_threads_calling_one_ep_model(ep2):
    """4 threads per rank call one EPModel at once: each call returns the single-process
    result (EPModel.__call__ had no lock; interleaved collectives paired different calls)."""
    _, results, _ = ep2
    for rank, res in results.items():
        th = res["value"]["threads"]
        assert th["errors"] == [], (rank, th)
        assert all(e is not None and e <= RTOL for e in th["errs"]), (rank, th)


def test_whole_causal_lm_with_attention(ep_run, whole_lm):
    if whole_lm is None:
        pytest.skip("needs transformers (pip install -e .[test])")
    world, results, _ = ep_run
    records = _records(results, "whole_lm")
    assert len(records) == world * len(LM_CALLS)
    assert all(rec["err"] <= RTOL and rec["shape_ok"] for _, rec in records), records


def test_token_counts_differ_and_rows_are_conserved(ep_run):
    world, results, _ = ep_run
    for c, counts in enumerate(UNIFORM_CALLS):
        recs = [rec for _, rec in _records(results, "uniform") if rec["call"] == c]
        assert sorted(r["tokens"] for r in recs) == sorted(counts[r % len(counts)]
                                                           for r in range(world))
        slots = sum(r["tokens"] for r in recs) * 2
        for layer in range(2):  # every row sent is computed by exactly one rank
            assert sum(r["rows_sent"][layer] for r in recs) == slots
            assert sum(r["rows_received"][layer] for r in recs) == slots


def test_skewed_routing_leaves_ranks_without_rows(ep_run):
    world, results, _ = ep_run
    want = {2: [[0, 1, 2], [3, 4, 5]], 4: [[0, 1], [2, 3], [4], [5]]}[world]  # 6 experts: uneven
    for rank, rec in _records(results, "skewed"):
        assert rec["experts"] == want[rank]
    for c in range(len(SKEWED_CALLS)):
        recs = {rank: rec for rank, rec in _records(results, "skewed") if rec["call"] == c}
        total = sum(rec["tokens"] for rec in recs.values()) * 2
        assert recs[0]["rows_received"] == [total]  # experts 0 and 1 live on rank 0
        for rank in range(1, world):
            assert recs[rank]["rows_received"] == [0]  # took part, computed nothing


def test_ranks_loading_different_artifacts_fail_clearly(ep2):
    _, results, _ = ep2
    for rank in (0, 1):
        kind, message = results[rank]["value"]["mismatch"]
        assert kind == "DistributedError", message
        assert "different artifacts" in message and "rank 0:" in message and "rank 1:" in message


def test_dead_or_hung_rank_fails_with_a_message(ep_run):
    world, results, _ = ep_run
    last = world - 1
    for rank in range(last):
        fail = results[rank]["value"]["fail"]
        assert fail["error"] == "DistributedError", fail
        assert f"rank {rank}/{world}" in fail["message"], fail
        assert "died or stopped calling" in fail["message"], fail
        assert fail["seconds"] < W.TIMEOUT_S + 5  # an error within the timeout, not a hang
    if world == 2:  # the last rank died
        assert results[last]["value"]["fail"] == {"died": True}
        assert results[last]["exitcode"] == 3
    else:  # the last rank stopped answering: the others time out
        assert results[last]["value"]["fail"] == {"hung": True}
        for rank in range(last):
            fail = results[rank]["value"]["fail"]
            assert fail["seconds"] >= W.TIMEOUT_S - 0.5, fail
            assert f"{W.TIMEOUT_S:g} s timeout" in fail["message"], fail


def test_bench_breakdown_json(ep2):
    _, results, tmp = ep2
    assert results[0]["value"]["bench"] is True
    report = json.loads((tmp / "bench.json").read_text())
    assert report["ep"] == 2 and len(report["ranks"]) == 2 and report["tokens"] == [16, 5]
    for rank in report["ranks"]:
        assert [run["local_tokens"] for run in rank["runs"]] == [8, 3 if rank["rank"] == 0 else 2]
        for run in rank["runs"]:
            assert run["max_rel_err"] <= RTOL
            assert set(run["layers"]) == {"first.mlp", "second.mlp"}
            for phases in run["layers"].values():
                assert set(phases) >= {"dispatch_a2a", "expert_compute", "combine_a2a", "rest"}
        assert rank["memory"]["expert_bytes"] * 2 == rank["memory"]["all_expert_bytes"]


def test_shard_bounds_even_uneven_and_more_ranks_than_experts():
    assert shard_bounds(8, 2) == [0, 4, 8]
    assert shard_bounds(8, 3) == [0, 3, 6, 8]
    assert shard_bounds(6, 4) == [0, 2, 4, 5, 6]
    assert shard_bounds(3, 4) == [0, 1, 2, 3, 3]


def test_artifact_without_ep_functions_is_refused(two_layer):
    with pytest.raises(ArtifactError, match="moec compile --ep"):
        parse_plan({"kernels": []}, "model.moec")
    plan = parse_plan(moec.runtime.verify(two_layer).meta, str(two_layer))
    assert [kind for kind, _ in plan.steps] == ["segment", "region", "segment", "region",
                                                 "segment"]
    assert [r.loc for r in plan.regions] == ["first.mlp", "second.mlp"]


def test_cli_ep_outside_torchrun_says_how_to_launch(two_layer, tmp_path, monkeypatch, capsys):
    from moec.cli import main

    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    np.save(tmp_path / "x.npy", np.zeros((3, 64), np.float32))
    assert main(["run", str(two_layer), "--ep", "2", "--input", str(tmp_path / "x.npy")]) == 1
    assert "torchrun --nproc-per-node 2" in capsys.readouterr().err


def test_cli_run_under_torchrun(two_layer, tmp_path):
    x = np.random.default_rng(5).standard_normal((21, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    env = {**os.environ, "TVM_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "-m", "moec.cli", "run", str(two_layer), "--ep", "2", "--input",
           str(tmp_path / "x.npy"), "--output", str(tmp_path / "y.npy"), "--timeout", "30"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rank 1/2: experts 2..3" in proc.stderr  # each rank says what it holds
    y = np.load(tmp_path / "y.npy")
    assert W.rel_err(y, moec.load(two_layer)(x)) <= RTOL


def test_weights_file_missing_a_planned_weight_is_an_artifact_error(two_layer, tmp_path):
    import safetensors.numpy
    import tvm

    from moec.distributed.model import _load_weights
    from moec.runtime.weights import PAD_PREFIX, save_aligned

    plan = parse_plan(moec.runtime.verify(two_layer).meta, str(two_layer))
    stored = safetensors.numpy.load_file(str(two_layer / "weights.safetensors"))
    dropped = plan.regions[0].flat_weights[0]
    save_aligned({n: a for n, a in stored.items() if n != dropped and not n.startswith(PAD_PREFIX)},
                 tmp_path / "w.safetensors")
    with pytest.raises(ArtifactError, match=f"no weight '{dropped}'"):
        _load_weights(tmp_path / "w.safetensors", plan, 0, 2, tvm.cpu())


def test_ep_build_for_cuda_is_refused_at_compile_time():
    """docs/expert-parallel.md: `--ep` builds CPU artifacts only."""
    import torch

    from moec.errors import CodegenError
    from moec.models.reference import demo_model

    model, (x,) = demo_model(hidden=64, intermediate=64, experts=4)
    with pytest.raises(CodegenError, match="expert parallelism builds CPU artifacts only"):
        moec.compile(model, (x.to(torch.float16),), target="cuda", ep=True, max_tokens=32)
