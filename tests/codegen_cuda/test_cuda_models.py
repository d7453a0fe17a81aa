"""Whole models for `target="cuda:sm_90"` in fp16 and bf16, built on this CPU-only machine: the
demo model and two Hugging Face families. Every kernel compiles with nvcc, none spills registers
(ptxas -v), the expert GEMMs use tensor-core mma instructions, and the artifact embeds the binary
so that a host without a GPU refuses to load it with ArtifactError instead of crashing."""

import sys
from pathlib import Path

import pytest
import torch

import moec
from moec.codegen.cuda.build import collect_compilations, has_mma
from moec.errors import ArtifactError
from moec.models.reference import demo_model

sys.path.insert(0, str(Path(__file__).parents[1] / "frontend"))


def _demo():
    m, ex = demo_model(seed=1, hidden=64, intermediate=96)
    return m, ex[0]


def _hf(family, lead=(8,)):
    def make():
        transformers = pytest.importorskip("transformers", reason="transformers is a test extra")
        del transformers
        import hf_families

        block = hf_families.build(family)
        return block, torch.randn(*lead, block.gate.weight.shape[1] if hasattr(block, "gate")
                                  else 32)
    return make


MODELS = {"demo": _demo, "mixtral": _hf("mixtral"), "qwen3_moe": _hf("qwen3_moe"),
          # sparsemixer routing; expert capacity with a float32 router weight beside half x
          "phimoe": _hf("phimoe"), "switch_transformers": _hf("switch_transformers"),
          # grouped sigmoid routing whose correction bias is cast in the graph (not a weight)
          "deepseek_v3": _hf("deepseek_v3"),
          # [B, S, H]: capacity counted per sequence (the batched capacity kernel)
          "switch_bsh": _hf("switch_transformers", (2, 8))}


# every model with float experts; the demo with int8 / int4 experts too
CASES = [(name, None) for name in MODELS] + [("demo", "int8"), ("demo", "int4")]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name,quantize", CASES, ids=lambda v: str(v))
def test_model_builds_for_sm90(name, quantize, dtype, tmp_path):
    module, x = MODELS[name]()
    module = module.to(dtype).eval()
    with collect_compilations() as comps:
        art = moec.compile(module, (x.to(dtype),), target="cuda", max_tokens=256,
                           quantize=quantize)
    assert art.target["kind"] == "cuda" and art.target["arch"] == "sm_90"
    assert comps and all(c.arch == "sm_90" for c in comps)
    report = {k: v for c in comps for k, v in c.report.items()}
    assert report, "no kernels in the ptxas log"
    for kernel, r in report.items():
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (kernel, r)
    gemms = [k for k in report if k.startswith("grouped_matmul")]
    # the dequantising kernels when the experts are quantised (weights stay int8 / int4)
    assert all(k.startswith("grouped_matmul_q") for k in gemms) == bool(quantize), gemms
    assert len(gemms) >= 2
    for k in gemms:
        assert any(has_mma(c.ptx, k) for c in comps if k in c.report), f"{k}: no mma in PTX"
    path = art.save(tmp_path / f"{name}.moec")
    if not torch.cuda.is_available():
        with pytest.raises(ArtifactError, match="cuda"):
            moec.load(path, device="cuda")


def test_causal_lm_builds_for_sm90(tmp_path):
    """A whole Qwen3-MoE causal LM from its checkpoint folder (embedding, rotary positions,
    per-head q/k RMSNorm, causal GQA attention, MoE layers) for sm_90 in bf16: no spills, and
    attention and expert GEMMs on tensor cores."""
    transformers = pytest.importorskip("transformers", reason="transformers is a test extra")
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=96, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, num_hidden_layers=1, moe_intermediate_size=64, intermediate_size=128,
        num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(
        tmp_path / "ckpt")
    with collect_compilations() as comps:
        # the plain forward (flash attention); the generation artifact's CUDA build is
        # tests/codegen_cuda/test_cuda_paged.py's
        art = moec.compile(str(tmp_path / "ckpt"), target="cuda", max_tokens=128,
                           generate=False)
    report = {k: v for c in comps for k, v in c.report.items()}
    assert all(r["spill_stores"] == 0 and r["spill_loads"] == 0 for r in report.values()), report
    for prefix in ("attention", "grouped_matmul"):
        kernels = [k for k in report if k.startswith(prefix)]
        assert kernels, (prefix, sorted(report))
        assert all(any(has_mma(c.ptx, k) for c in comps if k in c.report) for k in kernels)
    assert art.signature.inputs[0].dtype in ("int64", "int32")


@pytest.mark.parametrize("form", ["sqrt_softplus", "relu2", "clamped_plain", "identity"])
def test_issue17_forms_build_for_sm90(form):
    """The router scoring and expert activations added for newer families (sqrt(softplus)
    scores, squared-ReLU experts, the clamped SwiGLU without alpha and +1, identity experts'
    align and combine) build into sm_90 kernels with nvcc, without spills."""
    import moe_forms

    block = {"sqrt_softplus": moe_forms.SqrtSoftplusMoE,
             "relu2": lambda: moe_forms.NonGatedMoE("relu2", bias=True),
             "clamped_plain": moe_forms.ClampedSwiGLUMoE,
             "identity": moe_forms.IdentityExpertsMoE}[form]().half()
    with collect_compilations() as comps:
        art = moec.compile(block, (torch.randn(2, 8, moe_forms.H).half(),), target="cuda",
                           max_tokens=64)
    if form == "clamped_plain":
        assert "offset=0.0" in art.ir_text
    want = {"sqrt_softplus": "router_sqrt_softplus", "relu2": "grouped_matmul_relu2",
            "clamped_plain": "grouped_matmul_clamped_swiglu_mul", "identity": "combine_id"}[form]
    if form == "identity":
        assert any(k.startswith("align_id") for k in art.meta["kernels"]), art.meta["kernels"]
    assert any(k.startswith(want) for k in art.meta["kernels"]), art.meta["kernels"]
    report = {k: v for c in comps for k, v in c.report.items()}
    assert report and all(r["spill_stores"] == 0 for r in report.values())
