"""`moec bench` on tiny layers: the JSON and PNG are written, every system's output matched the
transformers block before it was timed, a wrong system is never reported as a time, Zipf
routing is skewed, and the CLI form runs."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers", reason="transformers is a test extra: pip install -e .[test]")

from moec.bench import runner  # noqa: E402
from moec.bench.baselines import HFBlock, System  # noqa: E402
from moec.bench.layer import SHAPES, build_block, make_pool, routing_stats  # noqa: E402

HAS_ORT = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))
TINY = ("tiny", "tiny-deepseek")


@pytest.fixture
def keep_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The harness pins thread variables in os.environ; restore them after the test."""
    for k in ("TVM_NUM_THREADS", "MOEC_NUM_THREADS", "OMP_NUM_THREADS", "OMP_WAIT_POLICY"):
        if k in os.environ:
            monkeypatch.setenv(k, os.environ[k])
        else:
            monkeypatch.delenv(k, raising=False)


def _run(tmp_path: Path, systems: tuple[str, ...], shapes=TINY, tokens=(1, 8)) -> dict:
    opts = runner.Options(shapes=shapes, tokens=tokens, warmup=1, repeat=2, systems=systems,
                          json_path=tmp_path / "bench.json", limits_reps=1, tvm_gemm=False,
                          progress=False)
    runner.run(opts)
    return json.loads((tmp_path / "bench.json").read_text())


def _check_all_matched(res: dict, expect: set[str]) -> None:
    assert len(res["cases"]) == len(res["options"]["shapes"]) * len(
        res["options"]["tokens"]) * len(res["options"]["routings"])
    for case in res["cases"]:
        sy = case["systems"]
        assert expect <= set(sy), (case["shape"], set(sy))
        for name, s in sy.items():
            where = f"{case['shape']} T={case['tokens']} {case['routing']} {name}"
            if s["status"] == "skipped":  # batched_mm only, and only where it would not fit
                assert name == "hf-batched_mm", where
                continue
            assert s["status"] == "ok", f"{where}: {s['status']} {s['detail']}"
            assert s["max_rel_err"] <= res["options"]["tol"], where
            assert len(s["times_s"]) == 2 and s["min_s"] <= s["median_s"] <= s["max_s"]
        roof = case["roofline"]
        assert 0 < roof["t_s"] == max(roof["t_bandwidth_s"], roof["t_gemm_s"])


def test_tiny_layers_write_json_and_png(tmp_path: Path, keep_env: None,
                                        capsys: pytest.CaptureFixture) -> None:
    res = _run(tmp_path, ("hf", "ort", "moec"))
    assert (tmp_path / "bench.png").stat().st_size > 10_000
    expect = {"hf-eager", "hf-grouped_mm", "hf-batched_mm", "moec"}
    if HAS_ORT:
        expect.add("ort-moe")
    else:  # said why, and the rest still ran
        assert all("onnxruntime" in s["missing"]["ort"] or "onnx" in s["missing"]["ort"]
                   for s in res["shapes"].values())
    _check_all_matched(res, expect)
    for name, shape in res["shapes"].items():
        assert "FALLBACK" not in shape["notes"]["moec"], (name, shape["notes"]["moec"])
        assert shape["compile_s"]["moec"] > 0
    lim = res["limits"]
    assert lim["bandwidth_gbs"] > 0 and lim["gemm_gflops"] > 0
    assert res["threads"]["threads"] == 2 and res["threads"]["torch"] == 2
    out = capsys.readouterr().out
    assert "== tiny-deepseek" in out and "moec speed-up" in out and "limits at end:" in out


@pytest.mark.slow
def test_bf16_run(tmp_path: Path, keep_env: None, capsys: pytest.CaptureFixture) -> None:
    """`moec bench --dtype bfloat16`: bf16 blocks, every system checked against hf-eager in bf16
    (within BF16_TOL: moec computes in float32), ONNX Runtime said to be missing and why, the
    roofline counting 2 bytes per weight, and the bf16 GEMM rate among the limits."""
    opts = runner.Options(shapes=TINY, tokens=(1, 8), warmup=1, repeat=2,
                          systems=("hf", "ort", "moec"), json_path=tmp_path / "bench.json",
                          limits_reps=1, tvm_gemm=False, progress=False, dtype="bfloat16")
    runner.run(opts)
    res = json.loads((tmp_path / "bench.json").read_text())
    assert res["dtype"] == "bfloat16" and res["bf16"].startswith("this run")
    for case in res["cases"]:
        for name, s in case["systems"].items():
            if s["status"] == "skipped":
                continue
            where = f"{case['shape']} T={case['tokens']} {case['routing']} {name}"
            assert s["status"] == "ok", f"{where}: {s['status']} {s['detail']}"
            assert s["max_rel_err"] <= runner.BF16_TOL, where
        assert {"hf-eager", "moec"} <= set(case["systems"])
        shape = SHAPES[case["shape"]]
        # the routed experts and always-read weights at 2 bytes, and the activations
        fixed = shape.always_bytes(2) + 2 * case["tokens"] * shape.hidden * 2
        assert (case["roofline"]["bytes"] - fixed) % shape.expert_bytes(2) == 0
    for shape in res["shapes"].values():
        assert "bfloat16" in shape["missing"]["ort"]
        assert "FALLBACK" not in shape["notes"]["moec"]
    assert res["limits"]["start"]["gemm"]["torch_bf16_gflops"] > 0
    assert "torch linear bf16" in capsys.readouterr().out


@pytest.mark.slow
def test_tiny_layer_with_torch_compile(tmp_path: Path, keep_env: None) -> None:
    res = _run(tmp_path, ("hf", "torch.compile", "ort", "moec"), shapes=("tiny",), tokens=(4,))
    _check_all_matched(res, {"hf-eager", "torch.compile", "moec"})
    assert res["shapes"]["tiny"]["compile_s"]["torch.compile"] > 0
    import torch._inductor.config as inductor_config

    # the bench turns inductor's caches off for its own compiles only, not for the process
    assert inductor_config.force_disable_caches is False


class _Zeros(System):
    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.zeros_like(x)


class _WrongLater(System):
    """Right in the warm-up, wrong in the second timed round."""

    def __init__(self, ref: HFBlock) -> None:
        super().__init__("wrong-later")
        self.ref, self.calls = ref, 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.calls += 1
        y = self.ref(x)
        return y * 1.01 if self.calls == 3 else y


def test_a_wrong_system_is_not_timed() -> None:
    shape = SHAPES["tiny"]
    block = build_block(shape)
    ref = HFBlock(block, shape, "eager")
    systems = [ref, _Zeros("zeros"), _WrongLater(HFBlock(block, shape, "eager")),
               HFBlock(block, shape, "grouped_mm")]
    pool = make_pool(block, shape, 8, "uniform", 3)
    out = runner.time_case(systems, pool, warmup=1, tol=1e-4, tick=lambda: None)
    assert out["zeros"].status == "wrong" and "warm-up" in out["zeros"].detail
    assert out["wrong-later"].status == "wrong" and "timed round 2" in out["wrong-later"].detail
    for name in ("zeros", "wrong-later"):
        s = out[name].summary()
        assert "median_s" not in s and s["times_s"] == []
    assert out["hf-grouped_mm"].status == "ok" and len(out["hf-grouped_mm"].times_s) == 2
    assert out["hf-eager"].status == "ok"


def test_read_probe_runs_after_each_timed_round() -> None:
    """The case's own bandwidth: one TVM read after each timed round (none in warm-up)."""
    from moec.bench import limits

    shape = SHAPES["tiny"]
    block = build_block(shape)
    pool = make_pool(block, shape, 4, "uniform", 4)
    probe, probed = limits.ReadProbe(mib=8), []
    runner.time_case([HFBlock(block, shape, "eager")], pool, warmup=1, tol=1e-4,
                     tick=lambda: None, probe=probe, probed=probed)
    assert len(probed) == 3 and all(v > 0 for v in probed)


def test_cache_is_flushed_before_every_call() -> None:
    """limits.CacheFlush runs before each system call of every round, warm-up included."""
    from moec.bench import limits

    shape = SHAPES["tiny"]
    block = build_block(shape)
    pool = make_pool(block, shape, 4, "uniform", 3)
    calls: list[str] = []
    real = limits.CacheFlush(nbytes=1 << 20)

    def flush() -> None:
        real()
        calls.append("flush")

    class Logged(HFBlock):
        def __call__(self, x: np.ndarray) -> np.ndarray:
            calls.append(self.name)
            return super().__call__(x)

    runner.time_case([Logged(block, shape, "eager"), Logged(block, shape, "grouped_mm")], pool,
                     warmup=1, tol=1e-4, tick=lambda: None, flush=flush)
    assert calls == ["flush", "hf-eager", "flush", "hf-grouped_mm"] * 3
    assert float(real.buf[0]) == 1.0 + 6


@pytest.mark.parametrize("name", TINY)
def test_zipf_routing_is_skewed(name: str) -> None:
    shape = SHAPES[name]
    block = build_block(shape)
    uni = routing_stats(shape, make_pool(block, shape, 256, "uniform", 2))
    zipf = routing_stats(shape, make_pool(block, shape, 256, "zipf", 2))
    assert uni["top_expert_share"] < 2.0 / shape.experts  # each expert's share is about 1/E
    assert zipf["top_expert_share"] > 1.5 * uni["top_expert_share"]


def test_cli_layer_bench(tmp_path: Path, keep_env: None) -> None:
    from moec.cli import main

    out = tmp_path / "r" / "cli.json"
    assert main(["bench", "--shapes", "tiny", "--tokens", "2", "--systems", "hf", "--quick",
                 "--routing", "uniform", "--hf-impls", "eager", "--no-plot",
                 "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["options"]["repeat"] == 3 and res["options"]["warmup"] == 1
    assert res["options"]["settle_s"] == 0  # --quick does not pause
    assert [c["tokens"] for c in res["cases"]] == [2]
    # the command this run was given, not the process's argv (under pytest: pytest's own)
    assert res["command"] == ("moec bench --shapes tiny --tokens 2 --systems hf --quick "
                              f"--routing uniform --hf-impls eager --no-plot --json {out}")
    assert not out.with_suffix(".png").exists()


def test_cli_layer_bench_settles_and_touches_before_timing(
        tmp_path: Path, keep_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once per layer, after its systems are built and before its first case: --settle pauses,
    then every system runs once on the largest token count (--no-touch skips it); a negative
    pause is an input error."""
    from moec.bench import runner as r
    from moec.cli import main

    events: list[str] = []
    monkeypatch.setattr(r.time, "sleep", lambda s: events.append(f"sleep {s:g}"))
    real_touch, real_case = r.touch_weights, r.time_case
    monkeypatch.setattr(r, "touch_weights", lambda systems, x: events.append(
        f"touch {x.shape[0]}") or real_touch(systems, x))
    monkeypatch.setattr(r, "time_case", lambda *a, **k: events.append("case") or real_case(
        *a, **k))
    out = tmp_path / "cli.json"
    args = ["bench", "--shapes", "tiny", "tiny-deepseek", "--tokens", "2", "5", "--systems",
            "hf", "--quick", "--routing", "uniform", "--hf-impls", "eager", "--no-plot",
            "--json", str(out)]
    assert main([*args, "--settle", "1.5"]) == 0
    assert events == ["sleep 1.5", "touch 5", "case", "case"] * 2
    res = json.loads(out.read_text())["options"]
    assert res["settle_s"] == 1.5 and res["touch"] is True
    events.clear()
    assert main([*args, "--no-touch"]) == 0
    assert events == ["case", "case"] * 2
    assert main(["bench", "--settle", "-1", "--json", str(out)]) == 1


def test_touch_weights_calls_each_system_once() -> None:
    """Every system not skipped at that token count is prepared and called once on x; a
    failing one does not stop the others (time_case reports it)."""
    from moec.bench import runner as r

    calls: list[tuple[str, int]] = []

    class Sys(System):
        def __init__(self, name: str, skip: bool = False, fail: bool = False) -> None:
            super().__init__(name)
            self.skip, self.fail = skip, fail

        def skip_reason(self, tokens: int) -> str | None:
            return "too big" if self.skip else None

        def prepare(self, x: np.ndarray) -> None:
            calls.append((f"prepare {self.name}", x.shape[0]))

        def __call__(self, x: np.ndarray) -> np.ndarray:
            calls.append((self.name, x.shape[0]))
            if self.fail:
                raise RuntimeError("boom")
            return x

    x = np.zeros((7, 4), np.float32)
    r.touch_weights([Sys("a", fail=True), Sys("b", skip=True), Sys("c")], x)
    assert calls == [("prepare a", 7), ("a", 7), ("prepare c", 7), ("c", 7)]


def test_cli_layer_bench_rejects_ep(capsys: pytest.CaptureFixture) -> None:
    from moec.cli import main

    assert main(["bench", "--ep", "2"]) == 1
    assert "--ep applies to `moec bench ARTIFACT`" in capsys.readouterr().err


def test_bandwidth_limit_includes_the_tvm_read_kernel():
    """The bandwidth limit is the best of torch's copy and sum and a TVM 4-stream read, whose sum
    is checked against numpy's (a kernel that skipped data would look fast)."""
    from moec.bench import limits

    bw = limits.bandwidth(mib=8, reps=1)
    assert bw["tvm_error"] is None and bw["tvm_read_gbs"] > 0
    assert bw["gbs"] == max(bw["copy_gbs"], bw["read_gbs"], bw["tvm_read_gbs"])
