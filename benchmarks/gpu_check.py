"""The GPU check of issue 4: numerics of moec's CUDA kernels against PyTorch on the GPU, and the
MoE layer timed against PyTorch eager, torch.compile and (where importable) a Triton fused-MoE
kernel, at Mixtral-8x7B, Qwen3-30B-A3B and DeepSeek-V3 shapes.

Two phases, because the GPU machine has no TVM compiler (its 100 MB wheel does not fit the 64 MiB
that travels there) and this machine has no GPU:

    python benchmarks/gpu_check.py prepare          # here: nvcc builds everything into .gpu/
    python benchmarks/gpu_check.py run --bundle .gpu   # there, after `setup` below

`prepare` compiles, for cuda:sm_90 in float16 and bfloat16, (a) each MoE layer as a library whose
weights are parameters supplied at run time (the graphs are shape-only: 22 GB of DeepSeek-V3
weights are made on the GPU, not here), with the router's ids and weights as extra outputs so
that routing is checked exactly; (b) small whole artifacts (weights inside) with inputs and the
float32 PyTorch-eager outputs computed here, for `moec.load(..., device="cuda")`; and (c) a TVM
*runtime-only* bundle (the tvm package without libtvm_compiler, plus the apache-tvm-ffi wheel for
the GPU machine's Python 3.12). On the GPU machine:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/*.whl
    tar -xJf .gpu/tvm_runtime.tar.xz -C /tmp/site
    PYTHONPATH=/tmp/site:$PWD TVM_USE_RUNTIME_LIB=1 python3 benchmarks/gpu_check.py run

Generation with a paged KV cache (its kernels at real shapes, whole tiny models stepped through
prefill and decode against the CPU) is benchmarks/gpu_paged.py, called from both phases.

`run` checks every compiled layer at 0, 1, 37 and 300 tokens with uniform and Zipf-skewed
routing against a float32 PyTorch reference on the GPU (routing ids exact except at near-ties,
outputs max|err| / max|ref| <= 1e-2), checks the artifacts, then times each layer in bfloat16 at
1, 16, 128, 1024 and 4096 tokens with CUDA events (medians after warm-up, inputs rotated through
a pool) and prints the table with the roofline fraction: bandwidth (bytes of the experts the
routing touches / the measured copy rate) for decode, tensor-core rate (FLOPs / the measured
bf16 matmul rate) for prefill, whichever bound is larger. JSON goes to $OUT (or results/).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DTYPES = ("float16", "bfloat16")
IR_DT = {"float16": "f16", "bfloat16": "bf16", "float32": "f32"}
CHECK_TOKENS = (0, 1, 37, 300)
TIME_TOKENS = (1, 16, 128, 1024, 4096)
TOL = 1e-2  # fp16/bf16 outputs: max|moec - ref| / max|ref| (the bound)

# The three layers of the issue. Router attributes follow the families' configs.
LAYERS = {
    "mixtral": {"H": 4096, "I": 14336, "E": 8, "k": 2, "scoring": "softmax", "norm_topk": True},
    "qwen3": {"H": 2048, "I": 768, "E": 128, "k": 8, "scoring": "softmax", "norm_topk": True},
    "deepseek_v3": {"H": 7168, "I": 2048, "E": 256, "k": 8, "scoring": "sigmoid",
                    "norm_topk": True, "scale": 2.5, "n_groups": 8, "topk_groups": 4,
                    "shared_I": 2048},
}
# Small stand-ins with the same structure, for the CPU-side test of this script.
TINY = {
    "mixtral": {"H": 64, "I": 96, "E": 8, "k": 2, "scoring": "softmax", "norm_topk": True},
    "deepseek_v3": {"H": 64, "I": 32, "E": 16, "k": 4, "scoring": "sigmoid", "norm_topk": True,
                    "scale": 2.5, "n_groups": 4, "topk_groups": 2, "shared_I": 48},
}


# --------------------------------------------------------------------------- the layer graph


def layer_text(c: dict, dtype: str, max_tokens: int = 4096) -> str:
    """moec IR of one MoE layer: router (ids and weights also returned), routed SwiGLU experts,
    optional shared expert. Weights are declared, without data."""
    d, H, I, E, k = IR_DT[dtype], c["H"], c["I"], c["E"], c["k"]
    grouped = c.get("n_groups", 1) > 1
    attrs = [f"k={k}", f"scoring={c['scoring']}",
             f"norm_topk={'true' if c['norm_topk'] else 'false'}", f"scale={c.get('scale', 1.0)}"]
    if grouped:
        attrs += [f"n_groups={c['n_groups']}", f"topk_groups={c['topk_groups']}",
                  "group_score=top2_sum", "select_bias=true"]
    lines = [f"dim T: 0..{max_tokens}", f"input %x: {d}[T, {H}]", f"param @router: {d}[{E}, {H}]"]
    if grouped:
        lines.append(f"param @bias: f32[{E}]")
    lines += [f"param @wg: {d}[{E}, {I}, {H}]", f"param @wu: {d}[{E}, {I}, {H}]",
              f"param @wd: {d}[{E}, {H}, {I}]"]
    rb = ", @bias" if grouped else ""
    lines.append(f"%w: f32[T, {k}], %i: i32[T, {k}] = moe.router(%x, @router{rb}) "
                 f"{{{', '.join(attrs)}}}")
    lines.append(f"%y: {d}[T, {H}] = moe.experts(%x, %w, %i, @wg, @wu, @wd)")
    out = "%y"
    if c.get("shared_I"):
        S = c["shared_I"]
        lines += [f"param @sg: {d}[{S}, {H}]", f"param @su: {d}[{S}, {H}]",
                  f"param @sd: {d}[{H}, {S}]",
                  f"%g: {d}[T, {S}] = core.linear(%x, @sg)",
                  f"%u: {d}[T, {S}] = core.linear(%x, @su)",
                  f"%a: {d}[T, {S}] = core.silu(%g)", f"%m: {d}[T, {S}] = core.mul(%a, %u)",
                  f"%s: {d}[T, {H}] = core.linear(%m, @sd)", f"%o: {d}[T, {H}] = core.add(%y, %s)"]
        out = "%o"
    lines.append(f"output {out}, %w, %i")
    return "\n".join(lines) + "\n"


def param_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    H, I, E = c["H"], c["I"], c["E"]
    shapes = {"router": (E, H), "wg": (E, I, H), "wu": (E, I, H), "wd": (E, H, I)}
    if c.get("n_groups", 1) > 1:
        shapes["bias"] = (E,)
    if c.get("shared_I"):
        S = c["shared_I"]
        shapes.update(sg=(S, H), su=(S, H), sd=(H, S))
    return shapes


# --------------------------------------------------------------------------- torch reference


def torch_route(x, router, bias, c: dict):
    """Router in float32: (weights f32[T, k], ids i64[T, k], scores used for selection)."""
    import torch

    logits = x.float() @ router.float().T
    scores = torch.sigmoid(logits) if c["scoring"] == "sigmoid" else torch.softmax(logits, -1)
    choice = scores if bias is None else scores + bias.float()
    ng = c.get("n_groups", 1)
    if ng > 1:
        T, E = choice.shape
        grp = choice.view(T, ng, E // ng).topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(grp).scatter_(1, grp.topk(c["topk_groups"], dim=-1).indices, 1)
        mask = keep.repeat_interleave(E // ng, dim=1) > 0
        choice = choice.masked_fill(~mask, float("-inf"))
    ids = choice.topk(c["k"], dim=-1).indices
    w = scores.gather(1, ids)
    if c["norm_topk"]:
        w = w / (w.sum(-1, keepdim=True) + (1e-20 if c["scoring"] == "sigmoid" else 0.0))
    return w * c.get("scale", 1.0), ids, choice


def torch_experts(x, w, ids, p: dict, out_dtype=None):
    """sum_j w[t,j] * FFN_{ids[t,j]}(x[t]) (+ shared expert): a loop over the experts the routing
    touches, as Hugging Face's eager blocks do. float32 math if out_dtype is float32."""
    import torch

    dt = out_dtype or x.dtype
    xf = x.to(dt)
    out = torch.zeros_like(xf)
    flat = ids.reshape(-1)
    for e in torch.unique(flat).tolist():
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        xe = xf[tok]
        h = torch.nn.functional.silu(xe @ p["wg"][e].to(dt).T) * (xe @ p["wu"][e].to(dt).T)
        out.index_add_(0, tok, (h @ p["wd"][e].to(dt).T) * w[tok, slot, None].to(dt))
    if "sg" in p:
        h = torch.nn.functional.silu(xf @ p["sg"].to(dt).T) * (xf @ p["su"].to(dt).T)
        out = out + h @ p["sd"].to(dt).T
    return out


def eager_layer(x, p: dict, c: dict):
    w, ids, _ = torch_route(x, p["router"], p.get("bias"), c)
    return torch_experts(x, w, ids, p)


def make_weights(c: dict, dtype, device, seed: int, skew: bool):
    """Random weights (std 1/sqrt(fan_in)); `skew` tilts the router toward low-numbered experts
    (Zipf-like: expert e's logits get about 12 / (e + 1): its row gains 3 / (e + 1) times a
    unit direction that every x leans 4 along)."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    p = {}
    for name, shape in param_shapes(c).items():
        if name == "bias":
            p[name] = 0.1 * torch.randn(shape, generator=g, device=device)
            continue
        t = torch.empty(shape, dtype=dtype, device=device)
        # Layer by layer: a float32 temporary of DeepSeek-V3's 7.5 GB tensors would not be small.
        for i in range(shape[0]):
            t[i] = (torch.randn(shape[1:], generator=g, device=device) /
                    shape[-1] ** 0.5).to(dtype)
        p[name] = t
    if skew:
        u = torch.randn(c["H"], generator=g, device=device)
        u = u / u.norm()
        zipf = 3.0 / torch.arange(1, c["E"] + 1, device=device)
        p["router"] = (p["router"].float() + zipf[:, None] * u[None, :]).to(dtype)
        p["_lean"] = u
    return p


def make_x(p: dict, c: dict, T: int, dtype, device, seed: int):
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(T, c["H"], generator=g, device=device)
    if "_lean" in p:
        x = x + 4.0 * p["_lean"][None, :]
    return x.to(dtype)


# --------------------------------------------------------------------------- prepare (here)


def build_layer(c: dict, dtype: str, out: Path) -> dict:
    """Compile one layer for cuda:sm_90 into out/kernels.so; return its metadata."""
    from moec.codegen import cuda
    from moec.codegen.cuda.build import build_cuda
    from moec.codegen.lower import lower
    from moec.ir import parse
    from moec.passes import PassManager, parse_pipeline

    g = parse(layer_text(c, dtype))
    rng = np.random.default_rng(0)
    if "bias" in g.params:  # the router packs it (cast to float32) at compile time
        g.param_data["bias"] = (0.1 * rng.standard_normal(c["E"])).astype(np.float32)
    PassManager(parse_pipeline("default")).run(g)
    low = lower(g, library=cuda)
    ex = build_cuda(low.mod, "sm_90")
    out.mkdir(parents=True, exist_ok=True)
    ex.export_library(str(out / "kernels.so"))
    params = []
    for name in low.param_names:
        base = name.split("@")[0]
        stored = low.params[name] is not None
        if stored:
            np.save(out / f"{name}.npy", low.params[name])
        params.append({"name": name, "param": base, "stored": stored})
    meta = {"config": c, "dtype": dtype, "params": params,
            "kernels": low.kernels, "ops": [n.op for n in g.nodes]}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def _model_cases() -> dict:
    """name -> (float32 module, token inputs [T, H] by key, compile options): the demo decoder
    layer (uniform and skewed router; fp and int8/int4 experts) and every Hugging Face family
    moec recognises, with skewed tokens too (tests/frontend/hf_families.py)."""
    import torch

    from moec.models.reference import demo_model, skew_router

    def tokens(h: int, skewed=None) -> dict:
        xs = {f"x{t}": torch.randn(t, h, generator=torch.Generator().manual_seed(t))
              for t in (1, 37)}
        if skewed is not None:
            xs["xzipf"] = skewed
        return xs

    cases = {}
    for skew in (False, True):
        for q in (None, "int8", "int4"):
            m, _ = demo_model(hidden=128, intermediate=256)
            if skew:
                skew_router(m)
            name = f"demo{'_zipf' if skew else ''}{'_' + q if q else ''}"
            xs = tokens(128)
            xs["x0"] = torch.zeros(0, 128)
            cases[name] = (m, xs, {"quantize": q}, False)
    sys.path.insert(0, str(ROOT / "tests" / "frontend"))
    try:
        import hf_families
    except ImportError as e:  # transformers is a test extra
        print(f"  Hugging Face families skipped: {e}")
        return cases
    for fam in hf_families.FAMILIES:
        block = hf_families.build(fam).eval()
        h = hf_families.H
        cases[f"hf_{fam}"] = (block, tokens(h, hf_families.skewed_tokens(block, 16)), {}, True)
    return cases


def _eager(model, x, batched: bool):
    import torch

    with torch.no_grad():  # transformers blocks take [batch, seq, H]
        y = model(x[None] if batched else x)
    y = y[0] if isinstance(y, tuple) else y
    return y.reshape(x.shape).float().numpy()


def build_artifacts(out: Path) -> list[str]:
    """Small whole artifacts (weights inside) for moec.load(device="cuda"), in float16 and
    bfloat16, with their inputs and the float32 PyTorch-eager outputs of the same (rounded)
    weights and inputs saved beside them."""
    import copy

    import torch

    import moec

    made = []
    for name, (model, xs, opts, batched) in _model_cases().items():
        for dtype in (torch.float16, torch.bfloat16):
            low = copy.deepcopy(model).to(dtype)
            tag = f"{name}_{str(dtype).split('.')[-1]}"
            try:
                art = moec.compile(low, (xs["x37"].to(dtype),), target="cuda", max_tokens=512,
                                   **opts)
            except moec.MoecError as e:  # an op without a CUDA kernel: say so, go on
                print(f"  {tag}: not built ({str(e)[:200]})")
                continue
            art.save(out / f"{tag}.moec")
            ref = copy.deepcopy(low).float()
            data = {}
            for key, x in xs.items():
                x = x.to(dtype).float()
                data[key] = x.numpy()
                data["y" + key[1:]] = (_eager(ref, x, batched) if len(x)
                                       else np.zeros(x.shape, np.float32))
            np.savez(out / f"{tag}.npz", **data)
            made.append(tag)
    return made


def build_lm_artifacts(out: Path) -> list[str]:
    """Whole tiny causal LMs (attention, rotary embeddings, MoE layers) compiled from their
    checkpoint folders for CUDA: token ids [T] -> logits, with transformers' float32 logits of
    the same (rounded) weights saved beside them."""
    import copy
    import tempfile

    import torch

    import moec

    try:
        import transformers
    except ImportError as e:
        print(f"  causal LMs skipped: {e}")
        return []
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, num_hidden_layers=2, moe_intermediate_size=64, intermediate_size=128,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, tie_word_embeddings=False,
        max_position_embeddings=1024)
    made = []
    for dtype in (torch.float16, torch.bfloat16):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cfg).eval().to(dtype)
        tag = f"lm_qwen3_moe_{str(dtype).split('.')[-1]}"
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            try:  # the plain forward (ids -> logits); generation: gpu_paged.py
                art = moec.compile(tmp, target="cuda", max_tokens=512, generate=False)
            except moec.MoecError as e:
                print(f"  {tag}: not built ({str(e)[:200]})")
                continue
        art.save(out / f"{tag}.moec")
        ref = copy.deepcopy(model).float()
        data = {}
        for t in (1, 37):
            ids = torch.randint(0, cfg.vocab_size, (t,), generator=torch.Generator().manual_seed(t))
            with torch.no_grad():
                data[f"ids{t}"] = ids.numpy()
                data[f"y{t}"] = ref(input_ids=ids[None]).logits[0].float().numpy()
        np.savez(out / f"{tag}.npz", **data)
        made.append(tag)
    return made


_NOT_RUNTIME = {"libtvm_compiler.so", "3rdparty", "src", "__pycache__", "include"}


def runtime_tree(dst: Path) -> Path:
    """Copy the installed tvm package without its compiler (and sources) to dst/tvm: imported
    from there it runs in runtime-only mode, which loads and runs artifacts."""
    import tvm

    src = Path(tvm.__file__).parent
    shutil.copytree(src, dst / "tvm", ignore=lambda _d, names: [n for n in names
                                                               if n in _NOT_RUNTIME])
    return dst / "tvm"


def runtime_bundle(out: Path) -> None:
    """tvm without its compiler library (runtime-only mode), and apache-tvm-ffi for cp312."""
    tmp = out / "_tvm_tree"
    runtime_tree(tmp)
    with tarfile.open(out / "tvm_runtime.tar.xz", "w:xz") as tar:
        tar.add(tmp / "tvm", arcname="tvm")
    shutil.rmtree(tmp)
    pin = "apache-tvm-ffi==0.1.14.post1"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.12", "--implementation", "cp", "--platform",
           "manylinux_2_28_x86_64", "--platform", "manylinux_2_24_x86_64", "-d", str(out), pin]
    if subprocess.run(cmd, capture_output=True).returncode != 0:
        print(f"  could not download {pin} for Python 3.12: put its wheel into {out} by hand")


def prepare(args) -> None:
    out = Path(args.bundle)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    layers = TINY if args.tiny else LAYERS
    t0 = time.perf_counter()
    for dtype in DTYPES:
        for name, c in layers.items():
            meta = build_layer(c, dtype, out / f"{name}_{dtype}")
            print(f"  built {name} {dtype}: {len(meta['kernels'])} kernels "
                  f"({time.perf_counter() - t0:.0f} s)")
    if not args.tiny:
        print("  artifacts:", build_artifacts(out) + build_lm_artifacts(out))
        print("  generation (paged KV cache):", _bench().prepare(out))
        runtime_bundle(out)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"bundle {out}: {size / 2**20:.1f} MiB in {time.perf_counter() - t0:.0f} s")


# --------------------------------------------------------------------------- run (GPU machine)


def load_layer(d: Path, dev):
    import tvm

    _cuda_runtime()
    lib = tvm.runtime.load_module(str(d / "kernels.so"))
    vm = tvm.runtime.vm.VirtualMachine(lib, dev)
    return vm["main"], json.loads((d / "meta.json").read_text())


def _cuda_runtime() -> None:
    from moec.runtime import _tvm

    _tvm.ensure_device_runtime("cuda")


def call_layer(main, meta: dict, x, p: dict):
    """Run the compiled layer on torch CUDA tensors (zero-copy through DLPack)."""
    import torch
    import tvm

    args = [tvm.runtime.from_dlpack(x)]
    for spec in meta["params"]:
        t = p[spec["param"]] if not spec["stored"] else p["@" + spec["name"]]
        args.append(tvm.runtime.from_dlpack(t))
    y, w, i = main(*args)
    return torch.from_dlpack(y), torch.from_dlpack(w), torch.from_dlpack(i)


def _with_stored(d: Path, meta: dict, p: dict, device) -> dict:
    import torch

    for spec in meta["params"]:
        if spec["stored"]:
            arr = np.load(d / f"{spec['name']}.npy")
            p["@" + spec["name"]] = torch.from_numpy(arr).to(device)
            p[spec["param"]] = p["@" + spec["name"]]  # the reference uses the same values
    return p


def check_layer(d: Path, dev, device, report: list) -> None:
    import torch

    main, meta = load_layer(d, dev)
    c, dtype = meta["config"], getattr(torch, meta["dtype"])
    for skew in (False, True):
        p = _with_stored(d, meta, make_weights(c, dtype, device, 1, skew), device)
        for T in CHECK_TOKENS:
            x = make_x(p, c, T, dtype, device, 100 + T)
            y, w, ids = call_layer(main, meta, x, p)
            rw, rids, choice = torch_route(x, p["router"], p.get("bias"), c)
            # ids must match; where they do not, the reference's own scores must be a near-tie
            same = (ids.long().sort(-1).values == rids.sort(-1).values).all(-1)
            kth = choice.topk(c["k"] + 1, dim=-1).values if T else choice[:, :2]
            tie = (kth[:, -2] - kth[:, -1]).abs() <= 1e-3 * kth[:, -2].abs().clamp_min(1e-6)
            bad_ids = int((~same & ~tie).sum()) if T else 0
            # outputs: the reference's experts on moec's routing (float32 math)
            ref = torch_experts(x, w, ids.long(), p, torch.float32)
            err = float((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)) if T \
                else 0.0
            werr = float((w[same] - rw[same]).abs().max()) if T and same.any() else 0.0
            ok = bad_ids == 0 and err <= TOL and werr <= TOL and tuple(y.shape) == (T, c["H"])
            report.append({"layer": d.name, "skew": skew, "tokens": T, "rel_err": err,
                           "weight_err": werr, "id_mismatch": int((~same).sum()) if T else 0,
                           "id_mismatch_not_tie": bad_ids, "ok": ok})
            print(f"  {d.name:24s} {'zipf' if skew else 'unif'} T={T:4d} rel err {err:.2e} "
                  f"w err {werr:.1e} ids off {report[-1]['id_mismatch']} "
                  f"{'ok' if ok else 'FAIL'}")
        p = None
        torch.cuda.empty_cache()


def check_artifacts(bundle: Path, report: list) -> None:
    import torch

    import moec

    for art in sorted(bundle.glob("*.moec")):
        ref = np.load(art.with_suffix(".npz"))
        m = moec.load(art, device="cuda")
        dt = getattr(torch, m.signature.inputs[0].dtype)
        for key in [k for k in ref.files if k.startswith(("x", "ids"))]:
            x = torch.from_numpy(ref[key]).to("cuda", None if key.startswith("ids") else dt)
            y = m(x)
            y = (y[0] if isinstance(y, tuple) else y).float().cpu().numpy()
            want = ref["y" + key.removeprefix("ids").removeprefix("x")]
            err = float(np.abs(y - want).max() / max(np.abs(want).max(), 1e-30)) if want.size \
                else float(y.shape != want.shape)
            report.append({"artifact": art.name, "input": key, "rel_err": err,
                           "ok": err <= TOL})
            print(f"  {art.name:24s} {key}: rel err {err:.2e} {'ok' if err <= TOL else 'FAIL'}")
        first = "ids" if "ids1" in ref.files else "x"
        x = torch.from_numpy(ref[f"{first}1"]).to("cuda", None if first == "ids" else dt)
        step = m.cuda_graph(x)  # a decode step as a CUDA graph
        x2 = torch.from_numpy(ref[f"{first}37"][:1]).to("cuda", x.dtype)
        same = bool(torch.equal(step(x2), m(x2)))
        report.append({"artifact": art.name, "input": "cuda_graph x1", "ok": same})
        print(f"  {art.name:24s} CUDA graph replay == call: {same}")


def cuda_time(fn, inputs: list, warmup: int = 3, repeat: int = 10) -> list[float]:
    """Milliseconds per call (CUDA events), rotating through `inputs`."""
    import torch

    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    times = []
    for i in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(inputs[i % len(inputs)])
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return times


def hardware_limits(device) -> dict:
    import torch

    n = 2**30  # 2 GiB of bf16 copied
    src = torch.empty(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = statistics.median(cuda_time(lambda _, d=dst, s=src: d.copy_(s), [None]))
    bw = 2 * n * 2 / (ms * 1e-3)  # read + write
    src = dst = None
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    ms = statistics.median(cuda_time(lambda _: a @ a, [None]))
    return {"bandwidth_GBs": bw / 1e9, "bf16_tflops": 2 * 8192**3 / (ms * 1e-3) / 1e12}


def _triton_fused_moe():
    try:  # vLLM's Triton kernel, where installed
        from vllm.model_executor.layers.fused_moe import fused_moe  # type: ignore
        return fused_moe, None
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return None, f"vllm fused_moe not importable ({type(e).__name__})"


def time_layers(bundle: Path, dev, device, limits: dict, report: list, deadline: float,
                use_compile: bool) -> None:
    import torch

    fused_moe, why = _triton_fused_moe()
    if why:
        print(f"  triton: skipped, {why}")
    for d in sorted(bundle.glob("*_bfloat16")):
        main, meta = load_layer(d, dev)
        c = meta["config"]
        p = _with_stored(d, meta, make_weights(c, torch.bfloat16, device, 2, False), device)
        compiled = torch.compile(lambda x, p=p, c=c: eager_layer(x, p, c), dynamic=True) \
            if use_compile else None
        H, I, E, k, S = c["H"], c["I"], c["E"], c["k"], c.get("shared_I", 0)
        for T in TIME_TOKENS:
            xs = [make_x(p, c, T, torch.bfloat16, device, 7 * T + j) for j in range(4)]
            row = {"layer": d.name, "tokens": T}
            row["moec_ms"] = statistics.median(cuda_time(
                lambda x, f=main, m=meta, p=p: call_layer(f, m, x, p), xs))
            row["eager_ms"] = statistics.median(cuda_time(
                lambda x, p=p, c=c: eager_layer(x, p, c), xs, repeat=5))
            if T <= 128:  # decode sizes: the same call replayed as one CUDA graph
                from moec.runtime.cuda_graph import capture

                step = capture(lambda x, f=main, m=meta, p=p: call_layer(f, m, x, p), xs[0])
                got = step(xs[1])[0].clone()
                row["graph_same"] = bool(torch.equal(got, call_layer(main, meta, xs[1], p)[0]))
                row["graph_ms"] = statistics.median(cuda_time(step, xs))
                step = None
            if compiled is not None and time.monotonic() < deadline:
                row["compile_ms"] = statistics.median(cuda_time(compiled, xs, repeat=5))
            if fused_moe is not None:
                w13 = torch.cat([p["wg"], p["wu"]], dim=1)
                row["triton_ms"] = statistics.median(cuda_time(
                    lambda x, w13=w13, p=p, k=k: fused_moe(x, w13, p["wd"], x @ p["router"].T,
                                                           k, True), xs))
            # roofline: distinct experts touched (measured on these inputs) vs FLOPs
            _, ids, _ = torch_route(xs[0], p["router"], p.get("bias"), c)
            touched = len(torch.unique(ids))
            nbytes = 2 * (3 * H * I * touched + 3 * H * S + E * H)
            flops = 2 * T * (3 * H * I * k + 3 * H * S)
            t_bw = nbytes / (limits["bandwidth_GBs"] * 1e9) * 1e3
            t_tc = flops / (limits["bf16_tflops"] * 1e12) * 1e3
            row.update(roof_ms=max(t_bw, t_tc), bound="bandwidth" if t_bw >= t_tc else "tensor")
            row["roof_frac"] = row["roof_ms"] / row["moec_ms"]
            report.append(row)
            print("  " + "  ".join(f"{k_}={v:.3g}" if isinstance(v, float) else f"{k_}={v}"
                                   for k_, v in row.items()), flush=True)
        p = compiled = None
        torch.cuda.empty_cache()


def print_table(rows: list) -> None:
    cols = ["layer", "tokens", "moec_ms", "graph_ms", "eager_ms", "compile_ms", "triton_ms",
            "roof_ms", "bound", "roof_frac"]
    print("| " + " | ".join(cols) + " | eager/moec | compile/moec |")
    print("|" + "---|" * (len(cols) + 2))
    for r in rows:
        cells = [f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c, "-"))
                 for c in cols]
        ratios = [f"{r[b] / r['moec_ms']:.2f}" if b in r else "-"
                  for b in ("eager_ms", "compile_ms")]
        print("| " + " | ".join(cells + ratios) + " |")


def run(args) -> int:
    import torch
    import tvm

    if not torch.cuda.is_available():
        print("no CUDA device: run this on the GPU machine")
        return 2
    t0 = time.monotonic()
    bundle = Path(args.bundle)
    device, dev = "cuda", tvm.cuda(0)
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, tvm {tvm.__version__}")
    checks: list = []
    for d in sorted(p for p in bundle.iterdir() if (p / "meta.json").exists()):
        check_layer(d, dev, device, checks)
    check_artifacts(bundle, checks)
    _bench().check(bundle, checks)
    _bench("gpu_offload").check(bundle, checks)  # expert offload's device tier
    limits = hardware_limits(device)
    print(f"limits: {limits}")
    timing: list = []
    paged_timing: list = []
    if not args.no_timing:
        time_layers(bundle, dev, device, limits, timing, t0 + args.budget_s,
                    not args.no_compile)
        print_table(timing)
        _bench().time_all(bundle, paged_timing)
    failed = [c for c in checks if not c["ok"]]
    result = {"limits": limits, "checks": checks, "timing": timing,
              "paged_timing": paged_timing, "failed": len(failed),
              "seconds": time.monotonic() - t0}
    out = Path(os.environ.get("OUT", ROOT / "benchmarks" / "results"))
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    print(f"{len(checks) - len(failed)}/{len(checks)} checks ok in {result['seconds']:.0f} s")
    return 1 if failed else 0


def _bench(name: str = "gpu_paged"):
    """benchmarks/gpu_paged.py (the paged KV-cache kernels and generation steps), or another
    module of this folder (gpu_offload.py: expert offload's device tier)."""
    import importlib

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    return importlib.import_module(name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="build the bundle (here, no GPU needed)")
    pp.add_argument("--bundle", default=str(ROOT / ".gpu"))
    pp.add_argument("--tiny", action="store_true", help="small shapes, no artifacts (tests)")
    rp = sub.add_parser("run", help="check and time on the GPU")
    rp.add_argument("--bundle", default=str(ROOT / ".gpu"))
    rp.add_argument("--no-timing", action="store_true")
    rp.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    rp.add_argument("--budget-s", type=float, default=420.0,
                    help="stop starting torch.compile timings after this many seconds")
    args = ap.parse_args(argv)
    if args.cmd == "prepare":
        prepare(args)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
