"""Size and error of quantised experts: fp32 / int8 / int4 artifacts of the reference model, of
a tiny Hugging Face Qwen3-MoE block (bare: no residual around it), and of a tiny whole Qwen3-MoE
causal LM compiled from its checkpoint folder (logits), each run through the moec runtime.

    TVM_NUM_THREADS=2 python benchmarks/quant_report.py [--json benchmarks/results/quant.json]

Error is measured on fresh inputs (uniform and skewed routing) against PyTorch eager of the
original fp32 module: relative Frobenius error ||y - y_ref|| / ||y_ref|| (what the int8 bound
of 1e-2 is about) and, for information, max |y - y_ref| / max |y_ref|.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import moec  # noqa: E402
from moec.models.reference import demo_model, skew_router  # noqa: E402


def qwen3_block(seed: int = 0) -> torch.nn.Module:
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = Qwen3MoeConfig(hidden_size=256, moe_intermediate_size=128, num_experts=16,
                         num_experts_per_tok=4, norm_topk_prob=True)
    block = Qwen3MoeSparseMoeBlock(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in block.parameters():
            t.copy_(torch.randn(t.shape, generator=gen) * t.shape[-1] ** -0.5)
    return block.eval()


def qwen3_lm(folder: Path, seed: int = 0) -> torch.nn.Module:
    """A 2-layer Qwen3-MoE causal LM with random weights (std 1/sqrt(fan-in), norms near 1),
    saved to `folder` with save_pretrained."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    cfg = Qwen3MoeConfig(vocab_size=512, hidden_size=256, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=64, num_hidden_layers=2,
                         moe_intermediate_size=128, intermediate_size=256, num_experts=16,
                         num_experts_per_tok=4, norm_topk_prob=True, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.named_parameters():
            scale = t.shape[-1] ** -0.5 if t.dim() > 1 else 0.1
            base = 1.0 if "norm" in name else 0.0
            t.copy_(base + scale * torch.randn(t.shape, generator=gen))
    model.eval().save_pretrained(folder)
    return model


def lm_report(tmp: Path) -> list[dict]:
    model = qwen3_lm(tmp / "qwen3_lm")
    rng = np.random.default_rng(7)
    ids = [rng.integers(0, 512, n).astype(np.int64) for n in (1, 16, 128)]
    with torch.no_grad():
        refs = [model(input_ids=torch.from_numpy(i)[None]).logits[0].numpy() for i in ids]
    rows = []
    for q in (None, "int8", "int8-g32", "int4"):
        out = tmp / f"lm.{q or 'fp32'}.moec"
        moec.compile(str(tmp / "qwen3_lm"), max_tokens=256, quantize=q).save(out)
        m = moec.load(out)
        errs = [errors(np.asarray(m(i)), r) for i, r in zip(ids, refs, strict=True)]
        rows.append({"model": "qwen3-moe LM tiny", "weights": q or "fp32",
                     "artifact_bytes": size_bytes(out),
                     "rel_fro_err": max(e[0] for e in errs),
                     "rel_max_err": max(e[1] for e in errs)})
    return rows


def size_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def errors(y: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    fro = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
    mx = float(np.abs(y - ref).max() / np.abs(ref).max())
    return fro, mx


def eager(model: torch.nn.Module, x: np.ndarray, batched: bool) -> np.ndarray:
    """PyTorch eager on x [T, H] (transformers blocks take [batch, seq, H])."""
    with torch.no_grad():
        y = model(torch.from_numpy(x)[None] if batched else torch.from_numpy(x))
    y = y[0] if isinstance(y, tuple) else y
    return y.reshape(x.shape).numpy()


def report(name: str, model: torch.nn.Module, hidden: int, tmp: Path,
           batched: bool = False) -> list[dict]:
    rng = np.random.default_rng(7)
    inputs = [rng.standard_normal((n, hidden)).astype(np.float32) for n in (1, 16, 128)]
    refs = [eager(model, x, batched) for x in inputs]
    rows = []
    for q in (None, "int8", "int8-g32", "int4"):
        out = tmp / f"{name}.{q or 'fp32'}.moec"
        moec.compile(model, (torch.from_numpy(inputs[1]),), max_tokens=256, quantize=q).save(out)
        m = moec.load(out)
        errs = [errors(np.asarray(m(x)).reshape(r.shape), r)
                for x, r in zip(inputs, refs, strict=True)]
        rows.append({"model": name, "weights": q or "fp32", "artifact_bytes": size_bytes(out),
                     "rel_fro_err": max(e[0] for e in errs),
                     "rel_max_err": max(e[1] for e in errs)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    demo, (x,) = demo_model()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        rows += report("demo (uniform)", demo, x.shape[-1], tmp)
        rows += report("demo (skewed)", skew_router(demo_model()[0]), x.shape[-1], tmp)
        rows += report("qwen3-moe tiny", qwen3_block(), 256, tmp, batched=True)
        rows += lm_report(tmp)
    print(f"{'model':<18} {'weights':<8} {'artifact MiB':>12} {'rel err (fro)':>14} "
          f"{'rel err (max)':>14}")
    for r in rows:
        print(f"{r['model']:<18} {r['weights']:<8} {r['artifact_bytes'] / 2**20:>12.2f} "
              f"{r['rel_fro_err']:>14.2e} {r['rel_max_err']:>14.2e}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2) + "\n")
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
