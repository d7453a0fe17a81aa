"""Generation benchmark: moec against transformers and llama.cpp on random-weight MoE LMs.

    python benchmarks/generate.py --models qwen3 mixtral --prompts 128 512 --new 128 \\
        --batch 1 8 --json benchmarks/results/generate.json

Models (random weights, saved as Hugging Face checkpoints in --workdir, with a byte-level BPE
tokenizer trained here so that llama.cpp's converter accepts them):
- qwen3: Qwen3-MoE-shaped, hidden 1024, 6 layers, 64 experts of 384, top-8, 16 heads / 4 kv
  heads of 64, vocab 32000 (2.1 GB fp32);
- mixtral: Mixtral-shaped, hidden 1024, 6 layers, 8 experts of 3072, top-2, same attention and
  vocab (2.1 GB fp32).

Systems, each in a fresh process (its peak RSS is its own), 2 threads everywhere:
- moec-fp32, moec-bf16 (a bf16 checkpoint: bf16 weights, float32 compute), moec-int8
  (`quantize="int8"` experts): `moec.load(...).engine`, greedy, EOS ignored;
- transformers: `generate` with its default (dynamic) cache and with the static cache, the
  faster one reported (torch.compile of the MoE blocks is not attempted: their routing is
  data-dependent);
- llama.cpp f32 / bf16 / q8_0 through llama-cpp-python (built from source for this CPU; give
  its interpreter with --llama-python; "missing" otherwise), converted from the same checkpoint
  with llama.cpp's own convert_hf_to_gguf.py (--llama-src: the llama.cpp source tree, e.g. from
  the llama-cpp-python sdist), default (spinning) threads, batch 1 only (llama-cpp-python runs
  one sequence).

Metrics per (model, system, prompt, batch): time to first token (all prompts of the batch
prefilled), prefill tokens/s (prompt tokens / that time), decode tokens/s (generated tokens
after the first of each sequence / the decode time), peak RSS of the process. Roofline per
row: decode = the bytes of weights one decode step reads (the non-expert weights, the LM head,
and the experts the batch's tokens route to, expected over uniform routing) / the machine's
measured read bandwidth (moec.bench.limits, best of torch and moec's multi-stream TVM read);
prefill = the FLOPs of the prompt's tokens / the measured fp32 GEMM rate.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SYSTEMS = ("moec-fp32", "moec-bf16", "moec-int8", "moec-int8d", "transformers", "llama-f32",
           "llama-bf16", "llama-q8_0")
# int8: int8 experts, the rest fp32; int8d: int8 dense linears too (--quantize-dense), as
# llama.cpp's q8_0 (8.5 bits a weight with its block scales)
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "int8": 1.0, "int8d": 1.0}


def config(name: str):
    import transformers

    common = dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=6,
                  num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-6)
    if name == "qwen3":
        return transformers.Qwen3MoeConfig(head_dim=64, moe_intermediate_size=384,
                                           intermediate_size=3072, num_experts=64,
                                           num_experts_per_tok=8, norm_topk_prob=True, **common)
    if name in ("qwen3-big", "qwen3-big-uniform"):  # benchmarks/offload.py: 8.5 GB of experts
        big = {**common, "hidden_size": 1536, "num_hidden_layers": 14}
        return transformers.Qwen3MoeConfig(head_dim=96, moe_intermediate_size=512,
                                           intermediate_size=4096, num_experts=64,
                                           num_experts_per_tok=8, norm_topk_prob=True, **big)
    if name == "mixtral":
        return transformers.MixtralConfig(intermediate_size=3072, num_local_experts=8,
                                          num_experts_per_tok=2, **common)
    raise SystemExit(f"unknown model {name}")


# --------------------------------------------------------------------------- preparation


def _tokenizer(folder: Path, vocab: int) -> None:
    """A byte-level BPE of `vocab` tokens trained on synthetic text (llama.cpp's converter
    needs a vocabulary; the benchmark feeds token ids)."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rnd = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rnd.choice(letters) for _ in range(rnd.randint(2, 9))) for _ in range(60000)]
    text = [" ".join(rnd.choice(words) for _ in range(200)) for _ in range(3000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>"}))


def checkpoint(work: Path, name: str, dtype: str) -> Path:
    """The random checkpoint `name` in fp32 or bf16 (the bf16 one: the fp32 weights rounded)."""
    import torch
    import transformers

    folder = work / f"{name}-{dtype}-ckpt"
    if (folder / "config.json").is_file():
        return folder
    fp32 = work / f"{name}-fp32-ckpt"
    if dtype == "bf16":
        m = transformers.AutoModelForCausalLM.from_pretrained(str(checkpoint(work, name, "fp32")),
                                                              dtype=torch.float32)
        m.to(torch.bfloat16).save_pretrained(folder)
    else:
        torch.manual_seed(0)
        m = transformers.AutoModelForCausalLM.from_config(config(name))
        with torch.no_grad():
            for p in m.parameters():
                if p.dim() >= 2:
                    p.normal_(0, p.shape[-1] ** -0.5)
            if name.endswith("-uniform"):
                _flatten_routing(m)
        m.save_pretrained(fp32)
    tok = work / "tokenizer"
    if not (tok / "tokenizer.json").is_file():
        tok.mkdir(parents=True, exist_ok=True)
        _tokenizer(tok, 32000)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (folder / f).write_bytes((tok / f).read_bytes())
    return folder


def _flatten_routing(m, scale: float = 0.1) -> None:
    """Make a random model's routing near uniform. In a random-weight model the attention
    output (a mean of value vectors over the context) gives every token's hidden state a shared
    component, so the routers pick some experts far more often than others and consecutive
    tokens pick the same ones, as trained models do. Scaling the attention output projections
    down keeps the residual stream near the (independent) token embeddings: with 0.1, the 16
    most used of 64 experts took 30% of a layer's uses (25% is uniform) and consecutive tokens
    shared 13% of their experts (12.5% by chance), against 60-88% and 30-59% unscaled (4 layers
    of this shape, 400 random tokens)."""
    import torch

    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.o_proj.weight *= scale


def artifact(work: Path, name: str, variant: str) -> Path:
    import moec

    out = work / f"{name}-{variant}.moec"
    if (out / "manifest.json").is_file():
        return out
    ckpt = checkpoint(work, name, "bf16" if variant == "bf16" else "fp32")
    t = time.perf_counter()
    moec.compile(str(ckpt), max_tokens=512,
                 quantize="int8" if variant.startswith("int8") else None,
                 quantize_dense=variant == "int8d").save(out)
    print(f"compiled {out.name} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return out


def gguf(work: Path, name: str, quant: str, llama_src: Path | None) -> Path | None:
    out = work / f"{name}-{quant}.gguf"
    if out.is_file():
        return out
    if llama_src is None:
        return None
    ckpt = checkpoint(work, name, "fp32")
    env = {**os.environ, "PYTHONPATH": str(llama_src / "gguf-py")}
    # the converter checks the tokenizer's pre-tokenizer against a list of known models; ours
    # is made here, so it is declared plain GPT-2 byte-level (the benchmark feeds token ids)
    code = ("import sys, runpy; sys.argv = sys.argv[1:]; sys.path.insert(0, sys.argv[0]);"
            "import convert_hf_to_gguf as c; from conversion import base;"
            "base.TextModel.get_vocab_base_pre = lambda self, tok: 'gpt-2';"
            "from conversion import llama;"  # Mixtral: a BPE tokenizer.json, no sentencepiece
            "llama.LlamaModel.set_vocab = lambda self: self._set_vocab_gpt2();"
            "sys.argv[0] = 'convert_hf_to_gguf.py'; c.main()")
    cmd = [sys.executable, "-c", code, str(llama_src), str(ckpt), "--outfile", str(out),
           "--outtype", quant]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode:
        print(f"llama.cpp conversion to {quant} failed:\n{res.stderr[-2000:]}", file=sys.stderr)
        return None
    return out


# --------------------------------------------------------------------------- workers


def _prompts(prompt: int, batch: int, vocab: int = 32000) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(prompt * 131 + batch)
    return [[int(t) for t in rng.integers(3, vocab, prompt)] for _ in range(batch)]


def _peak_rss_gb() -> float:
    """This process's peak RSS (VmHWM: ru_maxrss would carry the parent's over fork + exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def work_moec(path: str, prompt: int, batch: int, new: int) -> dict:
    import moec

    lm = moec.load(path, max_batch=max(batch, 1), max_seq_len=prompt + new + 16)
    eng = lm.engine
    lm.generate(_prompts(16, 1)[0], max_new_tokens=4, ignore_eos=True)  # warm: kernels, pool
    prompts = _prompts(prompt, batch)
    t0 = time.perf_counter()
    reqs = [eng.add(p, eng.params(max_new_tokens=new, ignore_eos=True)) for p in prompts]
    while not all(r.first_token_time for r in reqs):
        eng.step()
    t1 = time.perf_counter()
    eng.run_until_done(reqs)
    t2 = time.perf_counter()
    return {"ttft_s": t1 - t0, "decode_s": t2 - t1, "decoded": sum(len(r.output) - 1
                                                                    for r in reqs)}


def work_transformers(path: str, prompt: int, batch: int, new: int, threads: int) -> dict:
    import torch
    import transformers

    torch.set_num_threads(threads)
    m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor(_prompts(prompt, batch))
    best = None
    for cache in ("dynamic", "static"):
        kw = {} if cache == "dynamic" else {"cache_implementation": "static"}
        try:
            with torch.no_grad():
                m.generate(ids[:, :8], max_new_tokens=2, do_sample=False, **kw)  # warm
                t0 = time.perf_counter()
                m.generate(ids, max_new_tokens=1, do_sample=False, **kw)
                t1 = time.perf_counter()
                m.generate(ids, max_new_tokens=new, do_sample=False, min_new_tokens=new, **kw)
                t2 = time.perf_counter()
        except Exception as e:  # a cache implementation this model does not support
            print(f"transformers {cache} cache: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        ttft = t1 - t0
        row = {"ttft_s": ttft, "decode_s": (t2 - t1) - ttft, "decoded": batch * (new - 1),
               "cache": cache}
        if best is None or row["decode_s"] < best["decode_s"]:
            best = row
    if best is None:
        raise RuntimeError("no cache implementation worked")
    return best


def work_llama(path: str, prompt: int, batch: int, new: int, threads: int) -> dict:
    import numpy as np
    from llama_cpp import Llama

    if batch != 1:
        raise RuntimeError("llama-cpp-python runs one sequence")
    llm = Llama(model_path=path, n_ctx=prompt + new + 16, n_threads=threads,
                n_threads_batch=threads, n_batch=512, n_ubatch=512, logits_all=False,
                verbose=False)
    toks = _prompts(prompt, 1)[0]
    llm.eval(toks[:16])  # warm
    llm.reset()
    t0 = time.perf_counter()
    vocab = llm.n_vocab()

    def greedy() -> int:  # the last token's logits (llm.scores is not kept without logits_all)
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))))

    llm.eval(toks)
    nxt = greedy()
    t1 = time.perf_counter()
    for _ in range(new - 1):
        llm.eval([nxt])
        nxt = greedy()
    t2 = time.perf_counter()
    return {"ttft_s": t1 - t0, "decode_s": t2 - t1, "decoded": new - 1}


def worker(a: argparse.Namespace) -> None:
    if a.system.startswith("llama") and "OMP_WAIT_POLICY" in os.environ:
        # llama.cpp's best setting is its default (spinning) threads: 64 vs 47 tok/s f32 decode
        # on a 2-core Zen 4 with OMP_WAIT_POLICY=PASSIVE; the variable is read at start-up
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    if a.system == "transformers":
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch's best here (and the
        # house rule for PyTorch baselines); read when torch loads libgomp below
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    if a.system.startswith("moec"):
        row = work_moec(a.path, a.prompt, a.batch, a.new)
    elif a.system == "transformers":
        row = work_transformers(a.path, a.prompt, a.batch, a.new, a.threads)
    else:
        row = work_llama(a.path, a.prompt, a.batch, a.new, a.threads)
    row["peak_rss_gb"] = _peak_rss_gb()
    print("RESULT " + json.dumps(row))


# --------------------------------------------------------------------------- roofline


def decode_bytes(name: str, batch: int, variant: str) -> float:
    """Bytes of weights one decode step of `batch` tokens reads (uniform routing)."""
    c = config(name)
    h, layers, vocab = c.hidden_size, c.num_hidden_layers, c.vocab_size
    heads, kv = c.num_attention_heads, c.num_key_value_heads
    hd = getattr(c, "head_dim", None) or h // heads
    attn = h * hd * (2 * heads + 2 * kv)
    if name == "qwen3":
        e, k, inter = c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size
    else:
        e, k, inter = c.num_local_experts, c.num_experts_per_tok, c.intermediate_size
    used = e * (1 - (1 - k / e) ** batch)  # expected distinct experts a step touches
    expert = 3 * h * inter
    w = DTYPE_BYTES["fp32" if variant == "int8" else variant]  # int8: experts only
    ew = DTYPE_BYTES[variant]
    return layers * ((attn + e * h) * w + used * expert * ew) + vocab * h * w


def prefill_flops(name: str, prompt: int) -> float:
    c = config(name)
    h, layers = c.hidden_size, c.num_hidden_layers
    heads, kv = c.num_attention_heads, c.num_key_value_heads
    hd = getattr(c, "head_dim", None) or h // heads
    k, inter = (c.num_experts_per_tok, c.moe_intermediate_size) if name == "qwen3" else \
        (c.num_experts_per_tok, c.intermediate_size)
    per_tok = layers * (2 * h * hd * (2 * heads + 2 * kv) + 2 * 3 * h * inter * k
                        + 2 * 2 * prompt / 2 * heads * hd)
    return prompt * per_tok + 2 * h * c.vocab_size


# --------------------------------------------------------------------------- driver


def run(a: argparse.Namespace) -> None:
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    from moec.bench.limits import measure

    limits = measure(reps=5)
    print(f"limits: read {limits['bandwidth']['gbs']:.1f} GB/s, GEMM "
          f"{limits['gemm']['gflops']:.0f} GFLOP/s", file=sys.stderr)
    rows = []
    llama_src = Path(a.llama_src) if a.llama_src else None
    for name in a.models:
        for system in a.systems:
            if system.startswith("moec"):
                path, py = artifact(work, name, system.split("-")[1]), sys.executable
            elif system == "transformers":
                path, py = checkpoint(work, name, "fp32"), sys.executable
            else:
                quant = system.split("-")[1]
                path = gguf(work, name, quant, llama_src)
                py = a.llama_python
                if path is None or not py:
                    rows.append({"model": name, "system": system, "status": "missing"})
                    continue
            for prompt in a.prompts:
                for batch in a.batch:
                    if system.startswith("llama") and batch != 1:
                        continue
                    best = None
                    for _ in range(a.repeat):
                        cmd = [py, __file__, "worker", "--system", system, "--path", str(path),
                               "--prompt", str(prompt), "--batch", str(batch), "--new",
                               str(a.new), "--threads", str(a.threads)]
                        env = {**os.environ, "TVM_NUM_THREADS": str(a.threads),
                               "OMP_NUM_THREADS": str(a.threads)}
                        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
                        line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
                        if res.returncode or not line:
                            print(f"{name} {system} p{prompt} b{batch} failed:\n"
                                  f"{res.stderr[-1500:]}", file=sys.stderr)
                            break
                        r = json.loads(line[0][7:])
                        if best is None or r["decode_s"] < best["decode_s"]:
                            best = r
                    if best is None:
                        rows.append({"model": name, "system": system, "prompt": prompt,
                                     "batch": batch, "status": "failed"})
                        continue
                    variant = system.split("-")[1] if "-" in system else "fp32"
                    variant = {"f32": "fp32", "q8_0": "int8d"}.get(variant, variant)
                    roof_dec = limits["bandwidth"]["gbs"] * 1e9 / decode_bytes(
                        name, batch, variant) * batch
                    roof_pre = limits["gemm"]["gflops"] * 1e9 / prefill_flops(name, prompt) * \
                        prompt
                    row = {"model": name, "system": system, "prompt": prompt, "batch": batch,
                           "new": a.new, "status": "ok", "ttft_ms": best["ttft_s"] * 1e3,
                           "prefill_tok_s": batch * prompt / best["ttft_s"],
                           "decode_tok_s": best["decoded"] / best["decode_s"],
                           "peak_rss_gb": best["peak_rss_gb"],
                           "decode_roofline_tok_s": roof_dec,
                           "prefill_roofline_tok_s": roof_pre, **{
                               k: v for k, v in best.items() if k == "cache"}}
                    rows.append(row)
                    print(f"{name:8s} {system:13s} p{prompt:4d} b{batch}: ttft "
                          f"{row['ttft_ms']:8.1f} ms  prefill {row['prefill_tok_s']:7.1f} "
                          f"tok/s  decode {row['decode_tok_s']:6.1f} tok/s  (roofline "
                          f"{roof_dec:6.1f})  rss {row['peak_rss_gb']:.2f} GB", flush=True)
    out = {"command": "python benchmarks/generate.py " + " ".join(sys.argv[1:]),
           "cpu": _cpu(), "threads": a.threads, "limits": limits, "rows": rows}
    if a.json:
        tmp = Path(a.json).with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=1))
        tmp.replace(a.json)


def _cpu() -> str:
    try:
        from tvm.target import codegen

        return codegen.llvm_get_system_cpu()
    except Exception:  # noqa: BLE001 (informational)
        return "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd")
    r = sub.add_parser("run")
    r.add_argument("--models", nargs="+", default=["qwen3", "mixtral"])
    r.add_argument("--systems", nargs="+", default=list(SYSTEMS))
    r.add_argument("--prompts", type=int, nargs="+", default=[128, 512])
    r.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    r.add_argument("--new", type=int, default=128)
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--repeat", type=int, default=2, help="runs per cell (best kept)")
    r.add_argument("--workdir", default=os.path.expanduser("~/.cache/moec/genbench"))
    r.add_argument("--llama-python", default=None, help="python with llama-cpp-python")
    r.add_argument("--llama-src", default=None, help="llama.cpp source (convert_hf_to_gguf.py)")
    r.add_argument("--json", default=None)
    w = sub.add_parser("worker")
    w.add_argument("--system", required=True)
    w.add_argument("--path", required=True)
    w.add_argument("--prompt", type=int, required=True)
    w.add_argument("--batch", type=int, required=True)
    w.add_argument("--new", type=int, required=True)
    w.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    if a.cmd == "worker":
        worker(a)
    elif a.cmd == "run":
        run(a)
    else:
        p.print_help()


if __name__ == "__main__":
    main()
