"""GEMM kernels: `moe.grouped_matmul` over the aligned tile layout, and `core.linear`.

Both are one te computation, scheduled by hand:

    Xg[t, k]     A operand: x rows (grouped: gathered through sorted_ids, pad rows read as 0)
    Wt[.., j, k] B operand: weight rows (grouped: of the tile's expert; `*_mul`: gate and up rows
                 interleaved, even j from w, odd j from w2)
    Y[t, j]      float32 accumulation of Xg . Wt
    O[t, j]      epilogue: activation, act(Y[t, 2j]) * Y[t, 2j+1] for `*_mul`, bias, cast

One thread block computes one (tile of `block_m` rows, block of output columns): the grouped
kernel's tile is exactly one expert's, so its weights are one affine slab. Xg and Wt are
computed straight into (dynamic) shared memory per K step, which fuses the token gather into the
shared-memory load. For fp16/bf16 the product runs on tensor cores (WMMA 16x16x16, see wmma.py)
and the accumulators go through shared memory to the epilogue; float32 (and shapes WMMA cannot
tile) use a register-tiled SIMT schedule. Tiles with tile_expert < 0 return at once.

Interleaving gate and up rows (rather than two B operands) lets one accumulator tile hold both
halves of every output column, so the SiLU-mul epilogue reads them side by side.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm_ffi
from tvm import s_tir, te, tirx
from tvm.s_tir.stmt import SBlock

from moec.codegen.cuda.base import FLOATS, Kernel, Shapes, cast, check_dtype, f32, finalize
from moec.codegen.cuda.elementwise import activation as act_fn
from moec.codegen.cuda.wmma import wmma_intrinsics
from moec.errors import CodegenError

ACTIVATIONS = ("none", "silu", "gelu", "gelu_tanh", "relu", "clamped_swiglu")
WARP = 32


@dataclass(frozen=True)
class GemmConfig:
    """Tiling of one thread block. `bn` counts accumulator columns (2x the output's for
    `*_mul`). Tensor cores: a warps_m x warps_n grid of warps, each owning
    (bm/warps_m) x (bn/warps_n) of 16x16 fragments, `stages` operand buffers in flight. SIMT:
    (bm/tm) x (bn/tn) threads, each owning tm x tn accumulators."""

    tensor_core: bool
    bm: int
    bn: int
    bk: int
    vec: int
    warps_m: int = 1
    warps_n: int = 1
    tm: int = 1
    tn: int = 1
    stages: int = 1

    @property
    def threads(self) -> int:
        if self.tensor_core:
            return self.warps_m * self.warps_n * WARP
        return (self.bm // self.tm) * (self.bn // self.tn)


def _vec(rows: list[int], bk: int, k: int, threads: int, dtype: str) -> int:
    """Widest per-thread load (<= 16 bytes) that tiles every operand tile exactly."""
    for v in (16 // (2 if dtype != "float32" else 4), 4, 2, 1):
        if k % v == 0 and all(r * bk % (threads * v) == 0 for r in rows):
            return v
    return 1


def pick_config(bm: int, n2: int, k: int, dtype: str, pairs: bool) -> GemmConfig:
    """Tile sizes for a block of `bm` rows, `n2` accumulator columns and depth `k`."""
    if dtype in ("float16", "bfloat16") and bm % 16 == 0 and k % 16 == 0:
        wm = 1 if bm <= 16 else 2 if bm <= 128 else 4
        wn = 4 // wm
        fm = bm // (16 * wm)
        bk = 32 if k % 32 == 0 else 16
        for bn in (256, 128, 64, 32, 16):
            fn = bn // (16 * wn) if bn % (16 * wn) == 0 else 0
            # fragments per warp <= 8 (64 accumulator registers); dynamic shared memory
            # <= 48 KB (no opt-in needed): double-buffered padded operand tiles, later reused
            # for the float32 accumulator staging
            stages = 2 if k // bk >= 2 else 1
            smem = max(stages * (bm + bn) * (bk + 8) * 2, bm * bn * 4)
            if n2 % bn == 0 and fn and fm * fn <= 8 and smem <= 48 * 1024:
                vec = _vec([bm, bn], bk, k, wm * wn * WARP, dtype)
                return GemmConfig(True, bm, bn, bk, vec, warps_m=wm, warps_n=wn, stages=stages)
    # SIMT: <= 16 x 16 threads; each thread an even number of columns when they come in pairs
    tm = next((t for t in (4, 8, 2, 16, 1, 32, 64) if bm % t == 0 and bm // t <= 16), bm)
    tn_opts = [t for t in (4, 2, 1) if not pairs or t % 2 == 0]
    tn, tx = next(((t, x) for t in tn_opts for x in (16, 8, 4, 2, 1) if n2 % (t * x) == 0),
                  (2 if pairs else 1, 1))
    bk = next(b for b in (16, 8, 4, 2, 1) if k % b == 0)
    threads = (bm // tm) * tx
    vec = _vec([bm, tn * tx], bk, k, threads, dtype)
    return GemmConfig(False, bm, tn * tx, bk, vec, tm=tm, tn=tn)


def _fetch(sch: s_tir.Schedule, name: str, loop, cfg: GemmConfig, scope: str, pad: bool) -> None:
    """Compute operand stage `name` into shared memory at `loop`, all threads cooperating."""
    blk = sch.get_sblock(name)
    sch.set_scope(blk, 0, scope)  # before compute_at: see TVM_NOTES §7.3
    sch.compute_at(blk, loop)
    fused = sch.fuse(*sch.get_loops(blk)[-2:])
    if cfg.tensor_core:
        _, ty, tx, v = sch.split(fused, [None, cfg.warps_m * cfg.warps_n, WARP, cfg.vec])
    else:
        _, ty, tx, v = sch.split(fused, [None, cfg.bm // cfg.tm, cfg.bn // cfg.tn, cfg.vec])
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")
    sch.vectorize(v)
    if pad:  # rows padded by 8 elements: conflict-free fragment loads, 32-byte aligned rows
        sch.storage_align(blk, 0, axis=-2, factor=16, offset=8)


def _schedule_tensor_core(func: tirx.PrimFunc, cfg: GemmConfig, dtype: str) -> tirx.PrimFunc:
    intr = wmma_intrinsics(dtype)
    sch = s_tir.Schedule(func)
    y = sch.get_sblock("Y")
    t, j, k = sch.get_loops(y)
    t, t16 = sch.split(t, [None, 16])
    j, j16 = sch.split(j, [None, 16])
    k, k16 = sch.split(k, [None, 16])
    sch.reorder(t, j, k, t16, j16, k16)
    outer = sch.blockize(t16)  # one 16x16x16 fragment product
    bt, wm, fm = sch.split(t, [None, cfg.warps_m, cfg.bm // 16 // cfg.warps_m])
    bj, wn, fn = sch.split(j, [None, cfg.warps_n, cfg.bn // 16 // cfg.warps_n])
    ko, kk = sch.split(k, [None, cfg.bk // 16])
    sch.reorder(bt, bj, wm, wn, ko, kk, fm, fn)
    # tiles on x (no 65535 limit, and blocks of one expert's N-block run together: W reuse)
    sch.bind(bt, "blockIdx.x")
    sch.bind(bj, "blockIdx.y")
    warp = sch.fuse(wm, wn)
    sch.bind(warp, "threadIdx.y")
    # accumulators: fragments -> shared (per warp) -> epilogue O reading it directly; in
    # shared.dyn, where it reuses the operand tiles' bytes once the K loop is done
    y_smem = sch.cache_write(outer, 0, "shared.dyn")
    store = sch.cache_write(outer, 0, "wmma.accumulator")
    sch.reverse_compute_at(store, warp)
    sch.reverse_compute_at(y_smem, warp)
    sch.reverse_compute_at(sch.get_sblock("O"), warp)
    sch.compute_inline(y_smem)
    _fetch(sch, "Xg", ko, cfg, "shared.dyn", True)
    _fetch(sch, "Wt", ko, cfg, "shared.dyn", True)
    frag_a = sch.cache_read(outer, 0, "wmma.matrix_a")
    frag_b = sch.cache_read(outer, 1, "wmma.matrix_b")
    sch.compute_at(frag_a, kk)
    sch.compute_at(frag_b, kk)
    init = sch.decompose_reduction(outer, ko)
    store_name = sch.get(store).name_hint  # tensorize replaces the block (its name: + "_o")
    for blk, name in ((frag_a, "load_a"), (frag_b, "load_b"), (store, "store")):
        i, jj = sch.get_loops(blk)[-2:]
        i0, i1 = sch.split(i, [None, 16])
        j0, j1 = sch.split(jj, [None, 16])
        sch.reorder(i0, j0, i1, j1)
        sch.tensorize(i1, intr[name])
    sch.tensorize(sch.get_loops(sch.get_child_blocks(init)[0])[-2], intr["fill"])
    sch.tensorize(sch.get_loops(y)[-3], intr["sync"])
    o = sch.get_sblock("O")
    _, tx = sch.split(sch.fuse(*sch.get_loops(o)[-2:]), [None, WARP])
    sch.bind(tx, "threadIdx.x")
    if cfg.stages == 2:
        # double-buffered operand tiles: the loads of K step i+1 are issued before the tensor
        # core work of step i, and one barrier per step instead of two
        sch.annotate(ko, "software_pipeline_stage", [0, 0, 1])
        sch.annotate(ko, "software_pipeline_order", [0, 1, 2])
    return _barriers_around_staging(sch.mod["main"], store_name)


def _has_block(stmt: tirx.Stmt, name: str) -> bool:
    """Whether `stmt` holds a block named `name` (or `name` + a suffix such as "_o")."""
    found = []

    def visit(node):
        if str(node.name_hint).startswith(name):
            found.append(node)
        return node

    tvm_ffi.structural_map(stmt, [(SBlock, visit)])
    return bool(found)


def _barriers_around_staging(func: tirx.PrimFunc, store: str) -> tirx.PrimFunc:
    """__syncthreads before the accumulator store to shared memory and before the epilogue.

    TVM's barrier planner misses both: the staging buffer only aliases the operand tiles once
    shared.dyn buffers are merged (after planning), and the store's `&C[0, 0]` pointer (see
    wmma.py) reads as a load to it. Without them a fast warp would overwrite operand tiles
    other warps still read, and lanes would read accumulators before other lanes wrote them."""
    barrier = tirx.Evaluate(tirx.op.tvm_storage_sync("shared"))

    def visit(loop: tirx.For) -> tirx.For:
        tag = loop.thread_binding.thread_tag if loop.thread_binding is not None else ""
        if str(tag) != "threadIdx.y" or not isinstance(loop.body, tirx.SeqStmt):
            return loop
        if not any(_has_block(s, store) for s in loop.body.seq):
            return loop
        body = []
        for s in loop.body.seq:
            if _has_block(s, store) or _has_block(s, "O"):
                body.append(barrier)
            body.append(s)
        return tirx.For(loop.loop_var, loop.min, loop.extent, loop.kind, tirx.SeqStmt(body),
                        loop.thread_binding, loop.annotations)

    return tvm_ffi.structural_map(func, [(tirx.For, visit)])


def _schedule_simt(func: tirx.PrimFunc, cfg: GemmConfig) -> tirx.PrimFunc:
    sch = s_tir.Schedule(func)
    y = sch.get_sblock("Y")
    t, j, k = sch.get_loops(y)
    bt, ty, ti = sch.split(t, [None, cfg.bm // cfg.tm, cfg.tm])
    bj, tx, tj = sch.split(j, [None, cfg.bn // cfg.tn, cfg.tn])
    ko, ki = sch.split(k, [None, cfg.bk])
    sch.reorder(bt, bj, ty, tx, ko, ki, ti, tj)
    sch.bind(bt, "blockIdx.x")
    sch.bind(bj, "blockIdx.y")
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")
    y_reg = sch.cache_write(y, 0, "local")  # accumulators in registers, epilogue per thread
    sch.reverse_compute_at(y_reg, tx)
    sch.reverse_compute_at(sch.get_sblock("O"), tx)
    sch.compute_inline(y_reg)
    _fetch(sch, "Xg", ko, cfg, "shared", False)
    _fetch(sch, "Wt", ko, cfg, "shared", False)
    sch.unroll(ki)
    sch.unroll(ti)
    sch.unroll(tj)
    sch.decompose_reduction(y, ko)
    return sch.mod["main"]


def schedule_gemm(func: tirx.PrimFunc, cfg: GemmConfig, dtype: str) -> tirx.PrimFunc:
    """Schedule a PrimFunc with blocks Xg, Wt, Y, O (see the module doc) for `cfg`."""
    if cfg.tensor_core:
        return _schedule_tensor_core(func, cfg, dtype)
    return _schedule_simt(func, cfg)


def _glu(activation: str, g: tirx.PrimExpr, u: tirx.PrimExpr, alpha: float,
         limit: float) -> tirx.PrimExpr:
    """act(g) * u, or GPT-OSS's clamped SwiGLU (docs/ops.md, moe.experts)."""
    if activation != "clamped_swiglu":
        return act_fn(activation, g) * u
    lim = tirx.const(limit, "float32")
    g = tirx.min(g, lim)
    one = tirx.const(1.0, "float32")
    sig = one / (one + tirx.exp(-(tirx.const(alpha, "float32") * g)))
    return (tirx.max(tirx.min(u, lim), -lim) + one) * g * sig


def _epilogue(y: te.Tensor, rows, n, activation: str, dtype: str,
              bias=lambda t, j, h: None, alpha: float = 1.702, limit: float = 7.0
              ) -> te.Tensor:
    """O[t, j] from the accumulators; `bias(t, j, h)` is the bias of half h (0: w, 1: w2)."""

    def half(t, j, h, col):
        b = bias(t, j, h)
        return y(t, col) if b is None else y(t, col) + f32(b)

    if activation.endswith("_mul"):
        a = activation[:-4]
        return te.compute((rows, n), lambda t, j: cast(_glu(
            a, half(t, j, 0, j * 2), half(t, j, 1, j * 2 + 1), alpha, limit), dtype), name="O")
    return te.compute((rows, n), lambda t, j: cast(act_fn(activation, half(t, j, 0, j)), dtype),
                      name="O")


def define_grouped_matmul(E: int, N: int, K: int, block_m: int, top_k: int, gather: bool,
                          activation: str, dtype: str, bias: bool = False,
                          alpha: float = 1.702, limit: float = 7.0) -> tirx.PrimFunc:
    """Unscheduled te definition of `grouped_matmul` (tests run it on the CPU)."""
    check_dtype(dtype, FLOATS)
    pairs = activation.endswith("_mul")
    base = activation[:-4] if pairs else activation
    if base not in ACTIVATIONS or (pairs and base == "none") or (
            base == "clamped_swiglu" and not pairs):
        raise CodegenError(f"grouped_matmul: activation {activation!r}")
    sh = Shapes()
    n_tok, tiles = sh.dim("T"), sh.dim("TL")
    e_, n_, k_ = sh.dim(E), sh.dim(N), sh.dim(K)
    rows = tiles * block_m
    nw = 2 if pairs else 1
    x = te.placeholder((n_tok if gather else rows, k_), dtype, name="x")
    ws = [te.placeholder((e_, n_, k_), dtype, name=nm) for nm in ("w", "w2")[:nw]]
    bs = [te.placeholder((e_, n_), dtype, name=nm) for nm in ("b", "b2")[:nw]] if bias else []
    sid = te.placeholder((rows,), "int32", name="sorted_ids")
    eid = te.placeholder((tiles,), "int32", name="tile_expert")

    def xg(t, k):
        if not gather:
            return x[t, k]
        s = sid[t].astype("int64")
        # pad slots hold T*top_k; the clamp keeps the (unevaluated) load in bounds
        row = tirx.min(s // top_k, n_tok - 1)
        return tirx.if_then_else(s < n_tok * top_k, x[row, k], tirx.const(0, dtype))

    def wt(tile, j, k):
        e = tirx.max(eid[tile], 0)
        if not pairs:
            return ws[0][e, j, k]
        return tirx.if_then_else(j % 2 == 0, ws[0][e, j // 2, k], ws[1][e, j // 2, k])

    def bias_of(t, j, h):
        return bs[h][tirx.max(eid[t // block_m], 0), j] if bias else None

    n2 = sh.dim(2 * N if pairs else N)
    xs = te.compute((rows, k_), xg, name="Xg")
    wts = te.compute((tiles, n2, k_), wt, name="Wt")
    kr = te.reduce_axis((0, k_), "k")
    y = te.compute((rows, n2), lambda t, j: te.sum(
        f32(xs(t, kr)) * f32(wts(t // block_m, j, kr)), axis=kr), name="Y")
    o = _epilogue(y, rows, n_, activation, dtype, bias_of, alpha, limit)
    return te.create_prim_func([x, *ws, *bs, sid, eid, o])


def grouped_matmul(E: int, N: int, K: int, block_m: int, top_k: int, gather: bool,
                   activation: str, dtype: str, bias: bool = False, alpha: float = 1.702,
                   limit: float = 7.0) -> Kernel:
    """moe.grouped_matmul: operands (x, w[, w2][, b[, b2]], sorted_ids, tile_expert), result
    [S, N].

    Row r of a used tile t (= r // block_m) is `act(w[e] @ v + b[e])` (or
    `glu(w[e] @ v + b[e], w2[e] @ v + b2[e])` for `*_mul`) with e = tile_expert[t] and
    v = x[sorted_ids[r] // top_k] (gather) or x[r]; padding rows come out as act(b[e]) (zeros
    without bias); rows of unused tiles are not written. `bias`, `alpha`, `limit` follow the
    op's attributes (clamped_swiglu_mul: GPT-OSS)."""
    func = define_grouped_matmul(E, N, K, block_m, top_k, gather, activation, dtype, bias=bias,
                                 alpha=alpha, limit=limit)
    pairs = activation.endswith("_mul")
    cfg = pick_config(block_m, 2 * N if pairs else N, K, dtype, pairs)
    func = schedule_gemm(func, cfg, dtype)
    eid = func.params[-2]  # tile_expert; buffer params are typed vars in TVM 0.27
    name = f"grouped_matmul_{activation}_{dtype}"
    func = finalize(func, name, exit_if=lambda bx: tirx.BufferLoad(eid, [bx]) < 0)
    return Kernel(func, name, {})


LINEAR_BM = 64


def define_linear(M: int | str | tuple, K: int, N: int, dtype: str, bias: bool
                  ) -> tirx.PrimFunc:
    """Unscheduled te definition of `linear`: M rows padded to 64-row tiles of zeros."""
    check_dtype(dtype, FLOATS)
    if isinstance(M, tuple):
        if len(M) != 1:  # the lowering reshapes to [tokens, features] first
            raise CodegenError(f"linear: CUDA kernels take 2-D x, got leading dims {M}")
        M = M[0]
    sh = Shapes()
    m, k_, n_ = sh.dim(M), sh.dim(K), sh.dim(N)
    rows = (m + (LINEAR_BM - 1)) // LINEAR_BM * LINEAR_BM
    x = te.placeholder((m, k_), dtype, name="x")
    w = te.placeholder((n_, k_), dtype, name="w")
    b = te.placeholder((n_,), dtype, name="b") if bias else None
    xs = te.compute((rows, k_), lambda t, k: tirx.if_then_else(
        t < m, x[tirx.min(t, m - 1), k], tirx.const(0, dtype)), name="Xg")
    ws = te.compute((n_, k_), lambda j, k: w[j, k], name="Wt")
    kr = te.reduce_axis((0, k_), "k")
    y = te.compute((rows, n_), lambda t, j: te.sum(
        f32(xs(t, kr)) * f32(ws(j, kr)), axis=kr), name="Y")
    o = _epilogue(y, m, n_, "none", dtype, lambda t, j, h: b(j) if bias else None)
    return te.create_prim_func([x, w] + ([b] if bias else []) + [o])


def linear(M: int | str | tuple, K: int, N: int, dtype: str, bias: bool = False) -> Kernel:
    """core.linear y = x @ w.T (+ b): operands (x[M, K], w[N, K][, b[N]]), float32 accumulation.

    M (usually the symbolic token count) is covered by 64-row tiles whose rows past M read
    zeros and are not stored."""
    cfg = pick_config(LINEAR_BM, N, K, dtype, False)
    func = schedule_gemm(define_linear(M, K, N, dtype, bias), cfg, dtype)
    name = f"linear_{dtype}"
    return Kernel(finalize(func, name), name, {})
