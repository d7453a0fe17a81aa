"""Generation with a paged KV cache on the GPU, for benchmarks/gpu_check.py: the CUDA kernels of
core.cache_write / core.paged_attention (moec/codegen/cuda/paged_attention.py) at real model
shapes, and whole tiny generation artifacts stepped through prefill and decode.

`prepare(out)` (here, no GPU) writes out/paged/:
- kernels.so + kernels.json: the general step kernel, the split decode kernel and cache_write in
  bfloat16 at the attention shapes of Qwen3-30B-A3B, GPT-OSS-120B (sliding window and sinks),
  DeepSeek-V3 (MLA heads as moec lowers them) and Llama 4 (chunked attention);
- <family>_<dtype>.moec: tiny Qwen3-MoE and GPT-OSS checkpoints (tests/generate/families.py)
  compiled for cuda:sm_90, with <family>_<dtype>.npz: a schedule of steps (`step_schedule`) and
  the logits of every step from the same checkpoint compiled for this CPU.

`check(bundle, report)` and `time_all(bundle, report)` (on the GPU):
- kernels: a mixed step (prefill chunks over existing caches, decode rows, an idle sequence)
  and a decode step (contexts up to 4096, split across blocks) against a float32 PyTorch
  reference on the GPU: max|err| / max|ref| <= 1e-2 (bfloat16 outputs);
- generation: every step's logits against the CPU artifact's: max|gpu - cpu| / max|cpu| <=
  1e-3 (float32 models), 5e-2 (bfloat16: activations rounded to 8 bits on the GPU, float32 on
  the CPU);
- timing with CUDA events (medians): decode attention at batch 1, 8, 64 x contexts 1024, 8192
  where a 4 GiB pool holds them (K/V bytes read / time), prefill attention of one 2048- and
  one 8192-token prompt (causal FLOPs / time), PyTorch SDPA on contiguous K/V of the same
  shapes beside each; and one step of each tiny model (a 64-token prefill, a 3-sequence
  decode), wall clock with its host copies.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BS, L = 16, 2  # kernels: block size, layers in the cache (layer 1 is read)
CACHE_BYTES = 4 << 30  # the kernels' pools: up to 4096 blocks, at most 4 GiB of K and V
# name: Hq, Hkv, D, Dv, window, chunk, sinks
SHAPES = {"qwen3_30b": (32, 4, 128, 128, 0, 0, False),
          "gpt_oss_120b": (64, 8, 64, 64, 128, 0, True),
          "deepseek_v3": (128, 128, 192, 128, 0, 0, False),
          "llama4": (40, 8, 128, 128, 0, 8192, False)}
FAMILIES = (("qwen3_moe", "float32"), ("qwen3_moe", "bfloat16"), ("gpt_oss", "float32"),
            ("gpt_oss", "bfloat16"))
GEN_TOL = {"float32": 1e-3, "bfloat16": 5e-2}
KERNEL_TOL = 1e-2
MAX_TOKENS = 64  # of the tiny artifacts' steps
# three sequences: the last one's prompt is prefilled in chunks beside the others' decode rows,
# then all three decode together (the decode entry point; the long context is split in two),
# then it is done and the others go on beside it (q_len 0)
PROMPTS = (37, 20, 530)
NEW_TOKENS = (20, 20, 6)
MAX_POSITION = 1024  # the tiny checkpoints' 512 positions raised for the 536-token sequence


# --------------------------------------------------------------------------- step schedule


def step_schedule(vocab: int, block_size: int, max_tokens: int = MAX_TOKENS,
                  prompts: tuple[int, ...] = PROMPTS, new_tokens: tuple[int, ...] = NEW_TOKENS,
                  seed: int = 0) -> tuple[list[dict], int]:
    """Generation steps of len(prompts) sequences, as moec.engine would run them: each step
    takes up to `max_tokens` tokens, every sequence in order, a prompt in chunks, then one
    token per step until its `new_tokens` are done (finished sequences stay, with q_len 0).
    Token ids are random, not sampled, so that every runtime sees the same inputs. Blocks come
    from a shuffled pool. Returns (steps as StepModel.step keyword arguments, pool blocks)."""
    rng = np.random.default_rng(seed)
    total = [p + g for p, g in zip(prompts, new_tokens, strict=True)]
    nb = sum(-(-t // block_size) for t in total) + 3
    free = list(rng.permutation(nb))
    tables: list[list[int]] = [[] for _ in prompts]
    done = [0] * len(prompts)  # tokens in the cache
    steps = []
    while any(d < t for d, t in zip(done, total, strict=True)):
        budget, q_len = max_tokens, []
        for b, p in enumerate(prompts):
            n = min(p - done[b], budget) if done[b] < p else int(done[b] < total[b])
            n = min(n, budget)
            budget -= n
            q_len.append(n)
        kv_len = [d + n for d, n in zip(done, q_len, strict=True)]
        for b, kv in enumerate(kv_len):
            while len(tables[b]) * block_size < kv:
                tables[b].append(int(free.pop()))
        mb = max(len(t) for t in tables)
        table = np.zeros((len(prompts), mb), np.int32)
        for b, t in enumerate(tables):
            table[b, :len(t)] = t
        pos = np.concatenate([np.arange(done[b], kv_len[b]) for b in range(len(prompts))])
        seq = np.concatenate([np.full(n, b) for b, n in enumerate(q_len)]).astype(np.int64)
        slots = table[seq, pos // block_size] * block_size + pos % block_size
        t = len(pos)
        steps.append({"ids": rng.integers(0, vocab, t).astype(np.int64),
                      "positions": pos.astype(np.int64),
                      "q_start": np.cumsum([0, *q_len[:-1]]).astype(np.int32),
                      "q_len": np.array(q_len, np.int32), "kv_len": np.array(kv_len, np.int32),
                      "block_table": table, "slots": slots.astype(np.int32),
                      "logits_rows": np.arange(t, dtype=np.int64)})
        done = kv_len
    return steps, nb


def run_steps(model, steps: list[dict], num_blocks: int) -> list[np.ndarray]:
    """The logits of every step of the schedule on a StepModel (fresh caches), as float32
    (a step returns them in the model's dtype)."""
    caches = model.new_caches(num_blocks)
    return [np.asarray(model.step(caches, **st)).astype(np.float32) for st in steps]


def save_schedule(path: Path, steps: list[dict], nb: int, logits: list[np.ndarray]) -> None:
    data = {"num_blocks": np.array(nb)}
    for i, (st, lg) in enumerate(zip(steps, logits, strict=True)):
        data.update({f"{i}.{k}": v for k, v in st.items()})
        data[f"{i}.logits"] = lg
    np.savez(path, **data)


def load_schedule(path: Path) -> tuple[list[dict], int, list[np.ndarray]]:
    z = np.load(path)
    n = len({k.split(".")[0] for k in z.files if "." in k})
    steps = [{k.split(".", 1)[1]: z[k] for k in z.files if k.startswith(f"{i}.")
              and not k.endswith(".logits")} for i in range(n)]
    return steps, int(z["num_blocks"]), [z[f"{i}.logits"] for i in range(n)]


# --------------------------------------------------------------------------- prepare (here)


def build_kernels(out: Path, dtype: str = "bfloat16", shapes: dict | None = None) -> dict:
    """The paged kernels at `shapes` in one CUDA library (out/kernels.so) and their metadata."""
    import tvm

    from moec.codegen.cuda import nn as N
    from moec.codegen.cuda.build import build_cuda

    funcs, meta = {}, {"dtype": dtype, "block_size": BS, "layers": L, "kernels": {}}
    for name, (hq, hkv, d, dv, w, c, s) in (shapes or SHAPES).items():
        entry = {"shape": [hq, hkv, d, dv, w, c, s]}
        for kind, dec in (("general", False), ("decode", True)):
            k = N.paged_attention(L, hq, hkv, d, dv, BS, 1, d ** -0.5, w, c, s, dtype, dec)
            entry[kind] = f"paged_{kind}_{name}"
            funcs[entry[kind]] = k.func.with_attr("global_symbol", entry[kind])
        k = N.cache_write(L, hkv, BS, d, 1, True, dtype)
        entry["cache_write"] = f"cache_write_{name}"
        funcs[entry["cache_write"]] = k.func.with_attr("global_symbol", entry["cache_write"])
        meta["kernels"][name] = entry
    meta["max_splits"] = N.MAX_SPLITS
    out.mkdir(parents=True, exist_ok=True)
    build_cuda(tvm.IRModule(funcs), "sm_90").export_library(str(out / "kernels.so"))
    (out / "kernels.json").write_text(json.dumps(meta, indent=1))
    return meta


def build_generation(out: Path, families=FAMILIES) -> list[str]:
    """Tiny generation artifacts for CUDA and their CPU logits over `step_schedule`."""
    import torch

    import moec
    from moec.runtime import load

    sys.path.insert(0, str(ROOT / "tests" / "generate"))
    try:
        from families import model as family_model
    except ImportError as e:  # transformers is a test extra
        print(f"  generation artifacts skipped: {e}")
        return []
    made = []
    for family, dtype in families:
        tag = f"{family}_{dtype}"
        with tempfile.TemporaryDirectory() as tmp:
            m = family_model(family).to(getattr(torch, dtype))
            m.config.max_position_embeddings = MAX_POSITION
            m.save_pretrained(tmp)
            try:
                gpu = moec.compile(tmp, target="cuda:sm_90", max_tokens=MAX_TOKENS)
            except moec.MoecError as e:
                print(f"  {tag}: not built ({str(e)[:200]})")
                continue
            cpu = moec.compile(tmp, target="cpu", max_tokens=MAX_TOKENS)
            gpu.save(out / f"{tag}.moec")
            cpu_path = cpu.save(Path(tmp) / "cpu.moec")
            model = load(cpu_path)
            steps, nb = step_schedule(model.geometry.vocab_size, model.geometry.block_size)
            save_schedule(out / f"{tag}.npz", steps, nb, run_steps(model, steps, nb))
            del model
        made.append(tag)
    return made


def prepare(bundle: Path) -> list[str]:
    out = bundle / "paged"
    meta = build_kernels(out)
    print(f"  paged kernels: {len(meta['kernels'])} shapes")
    return build_generation(out)


# --------------------------------------------------------------------------- run (GPU)


def torch_paged_ref(q, kc, vc, q_start, q_len, kv_len, table, sinks, scale: float,
                    window: int, chunk: int, layer: int = 1):
    """core.paged_attention in float32 PyTorch (moec/ir/kv_ops.py), on q's device."""
    import torch

    _, hq, t, _ = q.shape
    hkv, bs, dv = vc.shape[2], vc.shape[3], vc.shape[4]
    out = torch.zeros((1, t, hq, dv), dtype=torch.float32, device=q.device)
    for b in range(len(q_start)):
        n, kv, s0 = int(q_len[b]), int(kv_len[b]), int(q_start[b])
        if n == 0:
            continue
        pos = torch.arange(kv, device=q.device)
        blocks = table[b, pos // bs].long()
        keys = kc[layer, blocks, :, :, pos % bs].float().repeat_interleave(hq // hkv, 1)
        vals = vc[layer, blocks, :, pos % bs, :].float().repeat_interleave(hq // hkv, 1)
        qp = torch.arange(kv - n, kv, device=q.device)[:, None]
        mask = pos[None, :] <= qp
        if window:
            mask &= pos[None, :] > qp - window
        if chunk:
            mask &= pos[None, :] // chunk == qp // chunk
        s = torch.einsum("hqd,khd->hqk", q[0, :, s0:s0 + n].float(), keys) * scale
        s = s.masked_fill(~mask[None], float("-inf"))
        if sinks is not None:
            s = torch.cat([s, sinks.float()[:, None, None].expand(hq, n, 1)], -1)
            p = s.softmax(-1)[..., :-1]
        else:
            p = s.softmax(-1)
        out[0, s0:s0 + n] = torch.einsum("hqk,khd->qhd", p, vals)
    return out


def pool_blocks(shape) -> int:
    hkv, d, dv = shape[1:4]
    return min(4096, CACHE_BYTES // (L * hkv * (d + dv) * BS * 2))


def _paged_inputs(shape, seqs, dtype, device, seed: int):
    """Random caches, queries and step arrays for sequences given as (q_len, kv_len)."""
    import torch

    hq, hkv, d, dv, _, _, sinks = shape
    nb = pool_blocks(shape)
    g = torch.Generator(device=device).manual_seed(seed)
    kc = torch.randn((L, nb, hkv, d, BS), generator=g, device=device).to(dtype)
    vc = torch.randn((L, nb, hkv, BS, dv), generator=g, device=device).to(dtype)
    perm = torch.randperm(nb, generator=torch.Generator().manual_seed(seed))
    mb = max([-(-kv // BS) for _, kv in seqs] + [1])
    table = torch.zeros((len(seqs), mb), dtype=torch.int32)
    used, q_start, t = 0, [], 0
    for b, (n, kv) in enumerate(seqs):
        nblk = -(-kv // BS)
        table[b, :nblk] = perm[used:used + nblk]
        used += nblk
        q_start.append(t)
        t += n
    ints = [torch.tensor(a, dtype=torch.int32, device=device) for a in
            (q_start, [n for n, _ in seqs], [kv for _, kv in seqs])]
    q = torch.randn((1, hq, t, d), generator=g, device=device).to(dtype)
    sk = (2 * torch.randn(hq, generator=g, device=device)).to(dtype) if sinks else None
    return q, kc, vc, *ints, table.to(device), sk


def _call_paged(lib, meta: dict, name: str, inputs, decode: bool):
    import torch
    import tvm

    q, vc, sk = inputs[0], inputs[2], inputs[7]
    t, hq, dv = q.shape[2], q.shape[1], vc.shape[4]
    out = torch.empty((1, t, hq, dv), dtype=q.dtype, device=q.device)
    args = [*inputs[:7], *([sk] if sk is not None else []), out]
    if decode:
        args.append(torch.empty((t, hq, meta["max_splits"], dv + 2), dtype=torch.float32,
                                device=q.device))
    fn = lib[meta["kernels"][name]["decode" if decode else "general"]]
    fn(*[tvm.runtime.from_dlpack(a) for a in args])
    return out


MIXED = [(1, 1), (300, 300), (77, 577), (1, 900), (0, 40), (5, 2049)]
DECODE = [(1, k) for k in (1, 15, 16, 17, 700, 2048, 4096)]


def check_kernels(bundle: Path, report: list) -> None:
    import torch
    import tvm

    from moec.runtime import _tvm

    _tvm.ensure_device_runtime("cuda")
    d = bundle / "paged"
    meta = json.loads((d / "kernels.json").read_text())
    lib = tvm.runtime.load_module(str(d / "kernels.so"))
    dt = getattr(torch, meta["dtype"])
    for name, entry in meta["kernels"].items():
        shape = tuple(entry["shape"])
        for decode, seqs in ((False, MIXED), (True, DECODE)):
            inputs = _paged_inputs(shape, seqs, dt, "cuda", seed=len(seqs))
            got = _call_paged(lib, meta, name, inputs, decode).float()
            want = torch_paged_ref(*inputs, scale=shape[2] ** -0.5, window=shape[4],
                                   chunk=shape[5])
            rows = torch.zeros(got.shape[1], dtype=torch.bool, device=got.device)
            for (n, _), s0 in zip(seqs, inputs[3].tolist(), strict=True):
                rows[s0:s0 + n] = True
            err = float((got[:, rows] - want[:, rows]).abs().max()
                        / want[:, rows].abs().max().clamp_min(1e-30))
            ok = err <= KERNEL_TOL
            report.append({"paged_kernel": name, "decode": decode, "rel_err": err, "ok": ok})
            print(f"  paged {name:14s} {'decode' if decode else 'mixed '}: rel err {err:.2e} "
                  f"{'ok' if ok else 'FAIL'}")


def check_generation(bundle: Path, report: list) -> None:
    from moec.runtime import load

    for art in sorted((bundle / "paged").glob("*.moec")):
        steps, nb, want = load_schedule(art.with_suffix(".npz"))
        model = load(art, device="cuda")
        got = run_steps(model, steps, nb)
        tol = GEN_TOL[model.geometry.cache_dtype]
        errs = [float(np.abs(g - w).max() / max(np.abs(w).max(), 1e-30))
                for g, w in zip(got, want, strict=True)]
        ok = max(errs) <= tol
        decode = sum(bool(np.all(st["q_len"] == 1)) for st in steps)
        report.append({"generation": art.name, "steps": len(steps), "decode_steps": decode,
                       "max_rel_err": max(errs), "ok": ok})
        print(f"  {art.name:24s} {len(steps)} steps ({decode} decode): max rel err "
              f"{max(errs):.2e} {'ok' if ok else 'FAIL'}")


def _median_ms(fn, warmup: int = 3, repeat: int = 10) -> float:
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def _sdpa_ms(shape, t: int, ctx: int, batch: int, dt) -> float:
    """PyTorch SDPA (flash / efficient kernels) on contiguous K/V of the same shape."""
    import torch
    import torch.nn.functional as F

    hq, hkv, d, dv = shape[:4]
    q = torch.randn((batch, hq, t, d), device="cuda", dtype=dt)
    k = torch.randn((batch, hkv, ctx, d), device="cuda", dtype=dt)
    v = torch.randn((batch, hkv, ctx, dv), device="cuda", dtype=dt)
    return _median_ms(lambda: F.scaled_dot_product_attention(
        q, k, v, is_causal=t > 1, enable_gqa=hq != hkv))


def time_kernels(bundle: Path, report: list) -> None:
    import torch
    import tvm

    d = bundle / "paged"
    meta = json.loads((d / "kernels.json").read_text())
    lib = tvm.runtime.load_module(str(d / "kernels.so"))
    dt = getattr(torch, meta["dtype"])
    for name, entry in meta["kernels"].items():
        shape = tuple(entry["shape"])
        hq, hkv, dk, dv = shape[:4]
        runs = [(True, b, ctx) for b in (1, 8, 64) for ctx in (1024, 8192)
                if b * -(-ctx // BS) <= pool_blocks(shape)]
        runs += [(False, 1, t) for t in (2048, 8192)]
        for decode, batch, ctx in runs:
            seqs = [(1, ctx)] * batch if decode else [(ctx, ctx)]
            inputs = _paged_inputs(shape, seqs, dt, "cuda", seed=batch)
            ms = _median_ms(lambda inputs=inputs, decode=decode, name=name: _call_paged(
                lib, meta, name, inputs, decode))
            row = {"paged_kernel": name, "decode": decode, "batch": batch, "context": ctx,
                   "moec_ms": ms}
            if decode:  # K/V bytes read
                row["GBs"] = batch * ctx * hkv * (dk + dv) * 2 / (ms * 1e-3) / 1e9
            else:  # causal: half the score matrix
                row["TFLOPs"] = 2 * hq * ctx * ctx * (dk + dv) / 2 / (ms * 1e-3) / 1e12
            try:
                row["sdpa_ms"] = _sdpa_ms(shape, 1 if decode else ctx, ctx, batch, dt)
            except Exception as e:  # noqa: BLE001 - an SDPA backend refusing a shape
                row["sdpa"] = f"{type(e).__name__}"
            report.append(row)
            print("  " + "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in row.items()), flush=True)
            inputs = None
        torch.cuda.empty_cache()


def time_generation(bundle: Path, report: list) -> None:
    import time

    import torch

    from moec.runtime import load

    for art in sorted((bundle / "paged").glob("*.moec")):
        steps, nb, _ = load_schedule(art.with_suffix(".npz"))
        model = load(art, device="cuda")
        prefill = max(steps, key=lambda st: len(st["ids"]))
        decode = next(st for st in steps if np.all(st["q_len"] == 1))
        for kind, st in (("prefill", prefill), ("decode", decode)):
            caches = model.new_caches(nb)
            for _ in range(3):
                model.step(caches, **st)
            torch.cuda.synchronize()
            times = []
            for _ in range(10):
                t0 = time.perf_counter()
                model.step(caches, **st)  # returns host logits: synchronised
                times.append((time.perf_counter() - t0) * 1e3)
            row = {"generation": art.name, "step": kind, "tokens": len(st["ids"]),
                   "wall_ms": statistics.median(times)}
            report.append(row)
            print(f"  {art.name:24s} {kind:7s} step of {row['tokens']:3d} tokens: "
                  f"{row['wall_ms']:.3f} ms")


def check(bundle: Path, report: list) -> None:
    if not (bundle / "paged").exists():
        print("  paged: nothing in the bundle")
        return
    check_kernels(bundle, report)
    check_generation(bundle, report)


def time_all(bundle: Path, report: list) -> None:
    if (bundle / "paged").exists():
        time_kernels(bundle, report)
        time_generation(bundle, report)
