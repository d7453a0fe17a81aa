"""CUDA kernels for the two routing features that had CPU kernels only: moe.router with
order=sparsemixer (PhiMoE) and the capacity (token dropping) kernel applied to its results.

The generated CUDA runs in the CPU emulator (emulator.py) against moec's numpy reference.
Tolerances: ids exactly; capacity outputs exactly (the kernel only copies or zeroes weights);
sparsemixer weights rtol = atol = 1e-4 in every dtype (logits are float32 dot products of the
same values in both, only the summation order differs; the brief allows 1e-2 for fp16) and
1e-6 where the logits are exact (identity router weight, values on a 1/8 grid), where the
threshold and tie tests are exact too. One ptxas build checks sm_90 registers and spills."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tvm
from tvm import relax, tirx

from moec.codegen import cuda as C
from moec.codegen.cuda.base import Kernel
from moec.ir.moe_ops import capacity_mask, sparsemixer_ref

from .emulator import emulate
from .test_cuda_build import FATBIN_MAGIC, _entry, build
from .test_cuda_emulated import NP, close, ref

H = 128  # the router's x/w loads are float4 / half4 vectors, which the emulator has

# name: E, k, jitter_eps, logit_bias, scale
SPARSE = {
    "phimoe": (16, 2, 0.01, False, 1.0),
    # E > 32: two experts per lane; a logit bias and a scale; 2 * eps = 1/8, so logits on a
    # 1/8 grid hit the threshold exactly (test_sparsemixer_exact_ties_and_thresholds)
    "wide": (40, 3, 1 / 16, True, 2.0),
    "skew": (8, 2, 0.01, True, 1.0),  # its logit bias favours one expert
}
# name: E, k, cap
CAPS = {
    "e8": (8, 2, 40),  # 16 warps
    "e8c1": (8, 2, 1),
    "e64": (64, 6, 20),
    "e2048": (2048, 1, 2),  # 4 warps: the per-warp counts fit 40 KB
    "e4096": (4096, 2, 1),  # 1 warp
    "switch": (8, 1, 24),  # Switch Transformers: top-1, expert_capacity 24
}


def _named(kern: Kernel, name: str) -> Kernel:
    """Unique names: the emulator's launch hooks are process-wide."""
    return dataclasses.replace(kern, func=kern.func.with_attr("global_symbol", name), name=name)


def _router(cfg: str, dtype: str) -> Kernel:
    e, k, eps, lbias, scale = SPARSE[cfg]
    kern = C.router(H, e, k, "softmax", "sparsemixer", False, scale, False, 1, 1, "max", dtype,
                    logit_bias=lbias, jitter_eps=eps)
    return _named(kern, f"smx_{cfg}_{dtype}")


def _capacity(cfg: str, batched: bool = False) -> Kernel:
    return _named(C.capacity(*CAPS[cfg], batched=batched),
                  f"capseq_{cfg}" if batched else f"cap_{cfg}")


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    """float32 + float16 kernels in one g++ run (the compile dominates the small cases);
    bfloat16 (slow cases only) in a second one."""
    workdir = tmp_path_factory.mktemp("emu_extra")
    cache: dict[str, object] = {}

    def get(dtype: str):
        group = "bf16" if dtype == "bfloat16" else "main"
        if group not in cache:
            if group == "bf16":
                ks = [_router(cfg, dtype) for cfg in SPARSE]
            else:
                ks = [_router(cfg, dt) for cfg in SPARSE for dt in ("float32", "float16")]
                # Switch: the router stays float32 in a half model
                ks.append(_named(C.router(H, 8, 1, "softmax", "score_topk", False, 1.0, False, 1,
                                          1, "max", "float16", w_dtype="float32"), "switch_f16"))
                ks += [_capacity(cfg) for cfg in CAPS]
                ks += [_capacity(cfg, batched=True) for cfg in SEQ_CAPS]
            cache[group] = emulate(ks, workdir)
        return cache[group]

    return get


def _router_inputs(cfg: str, tokens: int, dtype: str, seed: int) -> list[np.ndarray]:
    e, _, _, lbias, _ = SPARSE[cfg]
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal((tokens, H)), rng.standard_normal((e, H)) / 8]
    xs = [a.astype(NP[dtype]) for a in xs]
    if lbias:
        lb = rng.standard_normal(e) / 4
        if cfg == "skew":
            lb[3] += 4.0  # expert 3 first for nearly every token: its capacity overflows
        xs.append(lb.astype(np.float32))
    return xs


def _run_router(emu, cfg: str, dtype: str, xs: list[np.ndarray]):
    tokens, k = len(xs[0]), SPARSE[cfg][1]
    got_w = np.full((tokens, k), np.nan, np.float32)
    got_i = np.full((tokens, k), -7, np.int32)
    emu(dtype)[f"smx_{cfg}_{dtype}"](*xs, got_w, got_i)
    return got_w, got_i


def _attrs(cfg: str, **extra) -> dict:
    _, k, eps, lbias, scale = SPARSE[cfg]
    return dict(k=k, scoring="softmax", order="sparsemixer", scale=scale, logit_bias=lbias,
                jitter_eps=eps, **extra)


# --------------------------------------------------------------------------- sparsemixer


@pytest.mark.parametrize("dtype,tokens", [
    ("float32", 0), ("float32", 1), ("float32", 61), ("float16", 0), ("float16", 1),
    # float16 with a few hundred tokens runs in test_sparsemixer_then_capacity by default
    pytest.param("float32", 300, marks=pytest.mark.slow),
    pytest.param("float16", 300, marks=pytest.mark.slow)])
def test_sparsemixer_router(emu, dtype, tokens):
    xs = _router_inputs("phimoe", tokens, dtype, seed=tokens + 11)
    want_w, want_i = ref("moe.router", xs, **_attrs("phimoe"))
    got_w, got_i = _run_router(emu, "phimoe", dtype, xs)
    np.testing.assert_array_equal(got_i, want_i)
    close(got_w, want_w, 1e-4)


@pytest.mark.parametrize("dtype,tokens", [
    ("float32", 5), ("float16", 9), pytest.param("bfloat16", 0, marks=pytest.mark.slow),
    pytest.param("bfloat16", 37, marks=pytest.mark.slow),
    pytest.param("float16", 300, marks=pytest.mark.slow)])
def test_sparsemixer_router_wide_with_bias(emu, dtype, tokens):
    xs = _router_inputs("wide", tokens, dtype, seed=tokens + 5)
    want_w, want_i = ref("moe.router", xs, **_attrs("wide"))
    got_w, got_i = _run_router(emu, "wide", dtype, xs)
    np.testing.assert_array_equal(got_i, want_i)
    close(got_w, want_w, 1e-4)


def _exact_logits(rng: np.random.Generator, rows: int, e: int) -> np.ndarray:
    """Logits on a 1/8 grid in [-3, 3] with hand-made ties and threshold cases first (2*eps =
    1/8): the relative distance (l_b - l_j) / max(|l_j|, l_b) hits 1/8 exactly (kept: far
    needs > 1/8) and lands just above it."""
    lg = rng.integers(-24, 25, (rows, e)) / 8
    lg[:5] = -3.0  # rows 0-4: the rest of the row far below
    lg[0, :4] = [1.0, 0.875, 1.0, 0.75]  # tie at 1.0 (lower index first); 7/8 is at 1/8
    lg[1, :4] = [-1.0, -1.125, -1.25, -1.0]  # l_b < 0: 1/9 kept, 2/10 > 1/8 far; a tie
    lg[2, :] = 0.0  # 0/0 in the reference: NaN, never far (all kept, weight scale/E)
    lg[3, :4] = [0.0, -0.125, 2.0, 1.75]  # l_b = 0: |l_j| in the denominator, 1/1 far
    lg[4, :] = 0.5  # all tied: ids 0, 1, 2
    return lg.astype(np.float32)


@pytest.mark.parametrize("dtype", ["float32", "float16",
                                   pytest.param("bfloat16", marks=pytest.mark.slow)])
def test_sparsemixer_exact_ties_and_thresholds(emu, dtype):
    """With x = logits and w = [I | 0] the kernel's logits are exact, so the tie rule (lower
    index), the threshold (> 2*eps is far, = is kept) and the 0/0 case must match the
    reference bit for bit up to the order of the exp sum."""
    e, k, eps, _, scale = SPARSE["wide"]
    rng = np.random.default_rng(3)
    lg = _exact_logits(rng, 24, e)
    x = np.zeros((len(lg), H), np.float32)
    x[:, :e] = lg
    w = np.eye(e, H, dtype=np.float32)
    xs = [x.astype(NP[dtype]), w.astype(NP[dtype]), np.zeros(e, np.float32)]
    want_w, want_i = sparsemixer_ref(lg, k, eps)
    want_w *= scale
    # the data does exercise the boundary: some kept expert sits exactly at 2*eps
    thr = lg.max(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        at = (thr - lg) / np.maximum(np.abs(lg), thr) == np.float32(2 * eps)
    assert at.sum() >= 3
    got_w, got_i = _run_router(emu, "wide", dtype, xs)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_allclose(got_w, want_w, rtol=1e-6, atol=0)
    np.testing.assert_array_equal(got_i[:5], [[0, 2, 1], [0, 3, 1], [0, 1, 2], [2, 3, 0],
                                              [0, 1, 2]])
    np.testing.assert_allclose(got_w[2], [2 / 40, 2 / 39, 2 / 38], rtol=1e-6)


# --------------------------------------------------------------------------- capacity


def _ids(tokens: int, e: int, k: int, skew: bool, rng: np.random.Generator) -> np.ndarray:
    """Distinct experts per token: uniform, or skewed (expert 0 first for 90% of tokens)."""
    if tokens == 0:
        return np.zeros((0, k), np.int32)
    p = None
    if skew:
        p = np.full(e, 0.1 / (e - 1))
        p[0] = 0.9
    ids = np.stack([rng.choice(e, k, replace=False, p=p) for _ in range(tokens)])
    return ids.astype(np.int32)


def _check_capacity(emu, cfg: str, ids: np.ndarray, dropped_some: bool | None = None) -> None:
    _, k, cap = CAPS[cfg]
    wts = np.random.default_rng(len(ids)).random(ids.shape).astype(np.float32) + 0.5
    want = np.where(capacity_mask(ids, cap), wts, np.float32(0))
    got = np.full_like(wts, np.nan)
    emu("float32")[f"cap_{cfg}"](wts, ids, got)
    np.testing.assert_array_equal(got, want)
    if dropped_some is not None:
        assert bool((want == 0).any()) == dropped_some


@pytest.mark.parametrize("cfg", list(CAPS))
@pytest.mark.parametrize("tokens", [0, 1, 300])
@pytest.mark.parametrize("skew", [False, True])
def test_capacity(emu, cfg, tokens, skew):
    e, k, _ = CAPS[cfg]
    ids = _ids(tokens, e, k, skew, np.random.default_rng(tokens * 2 + skew))
    _check_capacity(emu, cfg, ids)


@pytest.mark.parametrize("cfg,skew", [("e8", True), ("e64", False)])
def test_capacity_many_tokens(emu, cfg, skew):
    """Thousands of tokens: 8 - 19 rounds of the block, with and without drops."""
    e, k, cap = CAPS[cfg]
    ids = _ids(3000 if cfg == "e64" else 4100, e, k, skew, np.random.default_rng(1))
    _check_capacity(emu, cfg, ids, dropped_some=True)


def test_capacity_keeps_all_below_cap(emu):
    """Fewer slots than cap per expert: nothing is dropped, weights pass through."""
    ids = _ids(16, 8, 2, False, np.random.default_rng(0))
    _check_capacity(emu, "e8", ids, dropped_some=False)


def test_capacity_clamps_expert_ids(emu):
    """Ids outside [0, E) count as expert 0 / E-1 (as the CPU kernel does)."""
    _, k, cap = CAPS["e8c1"]
    ids = _ids(40, 8, k, False, np.random.default_rng(2))
    ids[3, 0], ids[9, 1], ids[20, 0] = -1, 8, 100
    wts = np.ones(ids.shape, np.float32)
    got = np.zeros_like(wts)
    emu("float32")["cap_e8c1"](wts, ids, got)
    np.testing.assert_array_equal(got, np.where(capacity_mask(np.clip(ids, 0, 7), cap), 1, 0))


SEQ_CAPS = ("e8", "switch")


@pytest.mark.parametrize("cfg", SEQ_CAPS)
@pytest.mark.parametrize("batch,seq", [(3, 37), (2, 700), (0, 4), (2, 0), (1, 5)])
def test_capacity_per_sequence(emu, cfg, batch, seq):
    """The batched kernel ([B, S, k], a router on [B, S, H]): one block per sequence, each
    counting its own slots; B = 0 launches one idle block. Every sequence leans on expert 0,
    so with long sequences each of them drops some slots."""
    e, k, cap = CAPS[cfg]
    rng = np.random.default_rng(batch * 1000 + seq)
    ids = np.stack([_ids(seq, e, k, True, rng) for _ in range(batch)]) if batch * seq else \
        np.zeros((batch, seq, k), np.int32)
    wts = rng.random(ids.shape).astype(np.float32) + 0.5
    want = np.where(capacity_mask(ids, cap), wts, np.float32(0))
    got = np.full_like(wts, np.nan)
    emu("float32")[f"capseq_{cfg}"](wts, ids, got)
    np.testing.assert_array_equal(got, want)
    if seq == 700:
        assert all((want[b] == 0).any() for b in range(batch))
        # counting over all sequences at once would drop more: the count is per sequence
        assert (want != 0).sum() > (np.where(capacity_mask(ids.reshape(-1, k), cap), 1, 0)
                                    ).sum()


@pytest.mark.parametrize("order", [1, -1])
def test_capacity_warp_serial_orders(emu, order):
    """One warp at a time between barriers, forwards and backwards: a missing __syncthreads
    gives a wrong rank in one of the orders."""
    emu("float32").order(order)
    try:
        for cfg in ("e8", "e2048"):
            e, k, _ = CAPS[cfg]
            _check_capacity(emu, cfg, _ids(700, e, k, True, np.random.default_rng(order + 2)))
    finally:
        emu("float32").order(0)


@pytest.mark.parametrize("dtype,tokens", [("float16", 200), ("float32", 1), ("float32", 0)])
def test_sparsemixer_then_capacity(emu, dtype, tokens):
    """Router -> capacity as lower_router_capacity chains them, against moe.router's reference
    with `capacity`: the logit bias sends nearly every token to expert 3, so it drops tokens."""
    cap = CAPS["e8"][2]
    xs = _router_inputs("skew", tokens, dtype, seed=tokens)
    want_w, want_i = ref("moe.router", xs, **_attrs("skew", capacity=cap))
    got_w, got_i = _run_router(emu, "skew", dtype, xs)
    out = np.full_like(got_w, np.nan)
    emu("float32")["cap_e8"](got_w, got_i, out)
    np.testing.assert_array_equal(got_i, want_i)
    close(out, want_w, 1e-4)
    assert ((want_w == 0) == (out == 0)).all()
    if tokens > 2 * cap:
        assert (out == 0).sum() >= tokens - cap - 10  # the favoured expert overflowed


@pytest.mark.parametrize("tokens", [0, 120])
def test_switch_router_float32_weight_then_capacity(emu, tokens):
    """Switch Transformers in fp16: x half, router weight float32 (`w_dtype`), top-1, then
    capacity; most tokens prefer expert 3, so it overflows."""
    rng = np.random.default_rng(tokens)
    x = (rng.standard_normal((tokens, H)) + 0.5).astype(np.float16)
    w = rng.standard_normal((8, H)).astype(np.float32) / 8
    w[3] += 0.05
    cap = CAPS["switch"][2]
    want_w, want_i = ref("moe.router", [x, w], k=1, capacity=cap)
    got_w = np.full((tokens, 1), np.nan, np.float32)
    got_i = np.full((tokens, 1), -7, np.int32)
    emu("float16")["switch_f16"](x, w, got_w, got_i)
    out = np.full_like(got_w, np.nan)
    emu("float32")["cap_switch"](got_w, got_i, out)
    np.testing.assert_array_equal(got_i, want_i)
    close(out, want_w, 1e-4)
    assert ((want_w == 0) == (out == 0)).all()
    if tokens:
        assert (want_i == 3).sum() > cap and (out == 0).sum() >= (want_i == 3).sum() - cap


def test_capacity_rejects_bad_config():
    from moec.errors import CodegenError

    for args in ((0, 2, 4), (8, 0, 4), (8, 2, 0), (6000, 1, 4)):
        with pytest.raises(CodegenError):
            C.capacity(*args)
    with pytest.raises(CodegenError):
        C.router(H, 8, 2, "sigmoid", "sparsemixer", False, 1.0, False, 1, 1, "max", "float32")


# --------------------------------------------------------------------------- build


def _router_capacity_block(dtype: str, e: int, k: int, cap: int) -> tvm.IRModule:
    """Relax: router (sparsemixer) -> capacity on its weights, symbolic token count."""
    tok = tirx.Var("T", "int64")
    kr = C.router(H, e, k, "softmax", "sparsemixer", False, 1.0, False, 1, 1, "max", dtype)
    kc = C.capacity(e, k, cap)
    x = relax.Var("x", relax.TensorType((tok, H), dtype))
    wr = relax.Var("wr", relax.TensorType((e, H), dtype))
    wt, it = relax.TensorType((tok, k), "float32"), relax.TensorType((tok, k), "int32")
    bb = relax.BlockBuilder()
    with bb.function("main", [x, wr]):
        gr, gc = bb.add_func(kr.func, kr.name), bb.add_func(kc.func, kc.name)
        with bb.dataflow():
            r = bb.emit(relax.call_tir(gr, [x, wr], [wt, it]))
            wts, ids = bb.emit(relax.TupleGetItem(r, 0)), bb.emit(relax.TupleGetItem(r, 1))
            out = bb.emit(relax.call_tir(gc, [wts, ids], wt))
            res = bb.emit_output(relax.Tuple([out, ids]))
        bb.emit_func_output(res)
    return bb.get()


def test_ptxas_sm90_no_spills():
    kernels = [C.router(2048, e, k, "softmax", "sparsemixer", False, 1.0, False, 1, 1, "max", dt,
                        logit_bias=lb, jitter_eps=0.01)
               for e, k, dt, lb in ((16, 2, "float16", False), (16, 2, "bfloat16", True),
                                    (64, 4, "float32", False), (128, 2, "float16", False))]
    kernels = [_named(kern, f"{kern.name}_{i}") for i, kern in enumerate(kernels)]
    kernels += [_capacity(cfg) for cfg in CAPS]
    _, comp = build(kernels)
    assert comp.arch == "sm_90" and comp.fatbin[:4] == FATBIN_MAGIC
    for kern in kernels:  # each failure names the kernel and shows its ptxas report
        r = comp.report[_entry(comp, kern)]
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (kern.name, r)
        assert 0 < r["registers"] <= 255, (kern.name, r)
        assert r["smem"] <= 48 * 1024, (kern.name, r)


def test_relax_router_capacity_builds(tmp_path):
    ex = C.build_cuda(_router_capacity_block("float16", 16, 2, 8))
    lib = tmp_path / "moe.so"
    ex.export_library(str(lib))
    assert FATBIN_MAGIC in lib.read_bytes()
