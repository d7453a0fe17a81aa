"""Issue-3/17 report: every Hugging Face MoE family (tiny configs, random weights) compiled by
moec from a `[batch, seq, hidden]` example, as transformers blocks take it, under each experts
implementation transformers offers, against transformers' own output; and the tiny whole causal
LMs (checkpoint folder -> logits).

    TVM_NUM_THREADS=2 python benchmarks/hf_families_report.py [--json benchmarks/results/hf.json]

Each block is compiled once, from a [2, 8, H] example (B and S dynamic), and run at
[B, S, H] = [1, 1, H], [1, 37, H], [3, 5, H], [0, 4, H] (random tokens) and a skewed batch
[2, 32, H] (every token leans the same way, so they pick the same experts), and once as one
sequence [37, H]. Max relative error = max|moec - transformers| / max|transformers| over those
inputs; fp32. The families and their tiny configs are tests/frontend/hf_families.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "frontend"))

import hf_families as F  # noqa: E402

import moec  # noqa: E402

EXAMPLE = (2, 8)
SHAPES = ((1, 1), (1, 37), (3, 5), (0, 4))


def _inputs(block):
    gen = torch.Generator().manual_seed(7)
    return [(f"[{b}, {s}, H]", torch.randn(b, s, F.H, generator=gen)) for b, s in SHAPES] + [
        ("skewed [2, 32, H]", F.skewed_tokens(block, 64).reshape(2, 32, F.H))]


def _err(got, ref) -> float:
    if ref.size == 0:
        return 0.0 if got.shape == ref.shape else float("inf")
    if got.shape != ref.shape:
        return float("inf")
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))


def _first(out):
    return np.asarray(out[0] if isinstance(out, (tuple, list)) else out)


def families() -> list[dict]:
    rows = []
    for family, (impls, _) in F.FAMILIES.items():
        block = F.build(family, impls[0])
        t0 = time.perf_counter()
        model = moec.compile(block, (torch.randn(*EXAMPLE, F.H),), max_tokens=256).load_model()
        secs = time.perf_counter() - t0
        sig = model.signature
        for impl in impls:
            if F.offers_experts_implementations(block):
                F.set_experts_implementation(block, impl)
            errs = {}
            for name, x in _inputs(block):
                errs[name] = _err(_first(model(x.numpy())), F.reference_bsh(block, x).numpy())
            x = _inputs(block)[1][1]  # [1, 37, H] as one sequence [37, H]
            ref = F.reference_bsh(block, x).numpy()
            errs["[37, H]"] = _err(_first(model(x[0].numpy())).reshape(ref.shape), ref)
            worst = max(errs.values())
            rows.append({"family": family, "impl": impl, "compiled": True,
                         "input": str(sig.inputs[0].type_str()),
                         "output": str(sig.outputs[0].type_str()),
                         "max_rel_err": worst, "errors": errs, "compile_s": round(secs, 2)})
            print(f"{family:<20} {impl:<11} {sig.inputs[0].type_str():<18} -> "
                  f"{sig.outputs[0].type_str():<18} max rel err {worst:.2e}", flush=True)
    return rows


def whole_models() -> list[dict]:
    import test_whole_model as W  # the tiny configs of the whole-model tests

    rows = []
    for family in ("mixtral", "qwen3_moe", "deepseek_v3"):
        torch.manual_seed(0)
        import transformers

        model = W._randomize(transformers.AutoModelForCausalLM.from_config(W._config(family)), 0)
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(Path(d) / "ckpt")
            compiled = moec.compile(str(Path(d) / "ckpt"), max_tokens=64).load_model()
            errs = []
            for t in (1, 5, 33):
                ids = np.random.default_rng(t).integers(0, W.V, t).astype(np.int64)
                errs.append(_err(np.asarray(compiled(ids)), W._logits(model, ids)))
        rows.append({"model": family, "max_rel_err": max(errs)})
        print(f"whole {family:<14} logits max rel err {max(errs):.2e} (T = 1, 5, 33)", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    report = {"families": families(), "whole_models": whole_models()}
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
