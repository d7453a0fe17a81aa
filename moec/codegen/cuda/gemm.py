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

`grouped_stages` (the stages, given how to compute one B element) and `schedule_grouped` are
shared with gemm_quant.py, whose B stage dequantises int8/int4 weights: it is computed per
thread into registers as scalar code and stored to shared memory as one vector
(`GemmConfig.b_in_registers`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import tvm
import tvm_ffi
from tvm import s_tir, te, tirx
from tvm.ir import Expr
from tvm.s_tir.stmt import SBlock, SBlockRealize

from moec.codegen.cuda.base import FLOATS, Kernel, Shapes, cast, check_dtype, f32, finalize
from moec.codegen.cuda.elementwise import activation as act_fn
from moec.codegen.cuda.wmma import wmma_intrinsics
from moec.errors import CodegenError

ACTIVATIONS = ("none", "silu", "gelu", "gelu_tanh", "relu", "relu2", "clamped_swiglu")
WARP = 32


@dataclass(frozen=True)
class GemmConfig:
    """Tiling of one thread block. `bn` counts accumulator columns (2x the output's for
    `*_mul`). Tensor cores: a warps_m x warps_n grid of warps, each owning
    (bm/warps_m) x (bn/warps_n) of 16x16 fragments, `stages` operand buffers in flight. SIMT:
    (bm/tm) x (bn/tn) threads, each owning tm x tn accumulators. `b_in_registers`: each
    thread computes its `vec` elements of the B operand (Wt) as scalar code into registers and
    stores them to shared memory as one vector (for B stages that dequantise: TVM's vector
    form of their index and bit arithmetic does not compile)."""

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
    b_in_registers: bool = False

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
        fm = bm // (16 * wm)
        bk = 32 if k % 32 == 0 else 16
        # 4 warps (4 // wm along N) first; failing that, fewer along N for narrow blocks (N =
        # 48 with 16-row tiles: no 64-column block divides it, a 16-column one does)
        for wn, bn in ((w, b) for w in (4 // wm, 2, 1) if w <= 4 // wm
                       for b in (256, 128, 64, 32, 16)):
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


def _fetch(sch: s_tir.Schedule, name: str, loop, cfg: GemmConfig, scope: str, pad: bool,
           in_registers: bool = False) -> None:
    """Compute operand stage `name` into shared memory at `loop`, all threads cooperating;
    `in_registers`: through a per-thread register vector (see GemmConfig.b_in_registers)."""
    blk = sch.get_sblock(name)
    sch.set_scope(blk, 0, scope)  # before compute_at: see TVM_NOTES §7.3
    sch.compute_at(blk, loop)
    threads = ([cfg.warps_m * cfg.warps_n, WARP] if cfg.tensor_core
               else [cfg.bm // cfg.tm, cfg.bn // cfg.tn])
    comp = None
    if in_registers:  # blk computes into "local", a new block copies it to shared memory
        comp, blk = blk, sch.cache_write(blk, 0, "local")
        # the same thread -> elements map as below, with the vector split off k first: the
        # register vector's index is then v alone (k % bk would hide that from TVM's buffer
        # compaction, which then indexes it dynamically, i.e. in local memory)
        rows, cols = sch.get_loops(blk)[-2:]
        cols, v = sch.split(cols, [None, cfg.vec])
        _, ty, tx = sch.split(sch.fuse(rows, cols), [None, *threads])
    else:
        # the loops under `loop` (one only where a tile dim of extent 1 was dropped: N = 1)
        loops = sch.get_loops(blk)
        at = next(i for i, lp in enumerate(loops) if sch.get(lp).same_as(sch.get(loop)))
        inner = loops[at + 1:]
        fused = sch.fuse(*inner) if len(inner) > 1 else inner[0]
        _, ty, tx, v = sch.split(fused, [None, *threads, cfg.vec])
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")
    sch.vectorize(v)
    if comp is not None:
        sch.compute_at(comp, tx)
        depth = len(sch.get_loops(blk)) - 1  # the loops down to tx
        sch.unroll(sch.fuse(*sch.get_loops(comp)[depth:]))
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
    _fetch(sch, "Wt", ko, cfg, "shared.dyn", True, cfg.b_in_registers)
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
    _fetch(sch, "Wt", ko, cfg, "shared", False, cfg.b_in_registers)
    sch.unroll(ki)
    sch.unroll(ti)
    sch.unroll(tj)
    sch.decompose_reduction(y, ko)
    return sch.mod["main"]


def _uses(expr: tirx.PrimExpr, var: tirx.Var) -> bool:
    found = []
    tvm_ffi.structural_walk(expr, [(tirx.Var, lambda v: found.append(v.same_as(var)))])
    return any(found)


def _substitute(expr: tirx.PrimExpr, vmap: dict) -> tirx.PrimExpr:
    return tvm_ffi.structural_map(expr, [(tirx.Var, lambda v: vmap.get(v, v))])


def _unswitch_b_rows(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """`for v: Wt[v] = c ? a : b` -> `if c: (for v: Wt[v] = a) else: (for v: Wt[v] = b)`.

    With the B stage in registers, each thread's vector lies in one weight row, so the
    gate/up choice of `*_mul` (the row's parity) is the same for all its elements; taken
    element by element, nvcc keeps one branch per element and reloads what the elements share
    (a byte of two int4 weights, the group's scale and zero point) in each."""
    is_select = tvm.ir.Op.get("prim.if_then_else")

    def visit(loop: tirx.For) -> tirx.Stmt:
        real = loop.body
        if not isinstance(real, SBlockRealize) or real.block.name_hint != "Wt":
            return loop
        store = real.block.body
        if not (isinstance(store, tirx.BufferStore) and isinstance(store.value, tvm.ir.Call)
                and store.value.op.same_as(is_select)
                and isinstance(real.predicate, tirx.IntImm) and real.predicate.value):
            return loop
        binding = {iv.var: val for iv, val in zip(real.block.iter_vars, real.iter_values,
                                                  strict=True)}
        cond, *values = (_substitute(e, binding) for e in store.value.args)
        if _uses(cond, loop.loop_var):
            return loop
        loops = []
        for i, value in enumerate(values):  # the block's accesses, inlined: no SBlock inside
            var = loop.loop_var if i == 0 else tirx.Var(loop.loop_var.name, loop.loop_var.ty)
            fresh = {loop.loop_var: var}
            body = tirx.BufferStore(store.buffer, _substitute(value, fresh), [
                _substitute(_substitute(x, binding), fresh) for x in store.indices])
            loops.append(tirx.For(var, loop.min, loop.extent, loop.kind, body,
                                  loop.thread_binding, loop.annotations))
        return tirx.IfThenElse(cond, *loops)

    return tvm_ffi.structural_map(func, [(tirx.For, visit)])


def schedule_gemm(func: tirx.PrimFunc, cfg: GemmConfig, dtype: str) -> tirx.PrimFunc:
    """Schedule a PrimFunc with blocks Xg, Wt, Y, O (see the module doc) for `cfg`."""
    if cfg.tensor_core:
        func = _schedule_tensor_core(func, cfg, dtype)
    else:
        func = _schedule_simt(func, cfg)
    return _unswitch_b_rows(func) if cfg.b_in_registers else func


def _glu(activation: str, g: tirx.PrimExpr, u: tirx.PrimExpr, alpha: float,
         limit: float, offset: float = 1.0) -> tirx.PrimExpr:
    """act(g) * u, or the clamped SwiGLU (GPT-OSS's with alpha=1.702, offset=1; docs/ops.md,
    moe.experts)."""
    if activation != "clamped_swiglu":
        return act_fn(activation, g) * u
    lim = tirx.const(limit, "float32")
    g = tirx.min(g, lim)
    one = tirx.const(1.0, "float32")
    sig = one / (one + tirx.exp(-(tirx.const(alpha, "float32") * g)))
    up = tirx.max(tirx.min(u, lim), -lim)
    up = up + tirx.const(offset, "float32") if offset != 0.0 else up
    return up * g * sig


def _epilogue(y: te.Tensor, rows, n, activation: str, dtype: str,
              bias=lambda t, j, h: None, alpha: float = 1.702, limit: float = 7.0,
              scale=lambda t, j, h: None, offset: float = 1.0) -> te.Tensor:
    """O[t, j] from the accumulators; `bias(t, j, h)` is the bias of half h (0: w, 1: w2),
    `scale(t, j, h)` a float32 factor applied to the accumulator before it (gemm_quant.py:
    per-channel weight scales)."""

    def half(t, j, h, col):
        acc, s, b = y(t, col), scale(t, j, h), bias(t, j, h)
        acc = acc if s is None else acc * s
        return acc if b is None else acc + f32(b)

    if activation.endswith("_mul"):
        a = activation[:-4]
        return te.compute((rows, n), lambda t, j: cast(_glu(
            a, half(t, j, 0, j * 2), half(t, j, 1, j * 2 + 1), alpha, limit, offset), dtype),
            name="O")
    return te.compute((rows, n), lambda t, j: cast(act_fn(activation, half(t, j, 0, j)), dtype),
                      name="O")


def check_activation(builder: str, activation: str) -> bool:
    """Validate a grouped GEMM activation; whether it is gated (`*_mul`: two weights)."""
    pairs = activation.endswith("_mul")
    base = activation[:-4] if pairs else activation
    if base not in ACTIVATIONS or (pairs and base in ("none", "relu2")) or (
            base == "clamped_swiglu" and not pairs):
        raise CodegenError(f"{builder}: activation {activation!r}")
    return pairs


WeightFn = Callable[[Expr, Expr, Expr, int], Expr]
ExpertFn = Callable[[Expr, Expr, int], Expr]


def grouped_stages(sh: Shapes, N: int, K: int, block_m: int, top_k: int, gather: bool,
                   activation: str, dtype: str, weight: WeightFn,
                   bias: ExpertFn | None = None, scale: ExpertFn | None = None,
                   alpha: float = 1.702, limit: float = 7.0, offset: float = 1.0
                   ) -> tuple[te.Tensor, te.Tensor, te.Tensor, te.Tensor]:
    """x, sorted_ids, tile_expert and the result O of a grouped GEMM over the tile layout.

    `weight(e, j, k, h)` is the B operand element (in `dtype`) of half h (0: w, 1: w2 of
    `*_mul`) of expert e at output column j and depth k; `bias(e, j, h)` and `scale(e, j, h)`
    (float32, applied to the accumulator first) are optional epilogue terms. The stages are the
    Xg, Wt, Y, O blocks that `schedule_gemm` expects, shared by gemm_quant.py."""
    pairs = activation.endswith("_mul")
    n_tok, tiles = sh.dim("T"), sh.dim("TL")
    n_, k_ = sh.dim(N), sh.dim(K)
    rows = tiles * block_m
    x = te.placeholder((n_tok if gather else rows, k_), dtype, name="x")
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
            return weight(e, j, k, 0)
        return tirx.if_then_else(j % 2 == 0, weight(e, j // 2, k, 0), weight(e, j // 2, k, 1))

    def per_expert(fn: ExpertFn | None):
        if fn is None:
            return lambda t, j, h: None
        return lambda t, j, h: fn(tirx.max(eid[t // block_m], 0), j, h)

    n2 = sh.dim(2 * N if pairs else N)
    xs = te.compute((rows, k_), xg, name="Xg")
    wts = te.compute((tiles, n2, k_), wt, name="Wt")
    kr = te.reduce_axis((0, k_), "k")
    y = te.compute((rows, n2), lambda t, j: te.sum(
        f32(xs(t, kr)) * f32(wts(t // block_m, j, kr)), axis=kr), name="Y")
    o = _epilogue(y, rows, n_, activation, dtype, per_expert(bias), alpha, limit,
                  per_expert(scale), offset)
    return x, sid, eid, o


def define_grouped_matmul(E: int, N: int, K: int, block_m: int, top_k: int, gather: bool,
                          activation: str, dtype: str, bias: bool = False,
                          alpha: float = 1.702, limit: float = 7.0,
                          offset: float = 1.0) -> tirx.PrimFunc:
    """Unscheduled te definition of `grouped_matmul` (tests run it on the CPU)."""
    check_dtype(dtype, FLOATS)
    pairs = check_activation("grouped_matmul", activation)
    sh = Shapes()
    e_, n_, k_ = sh.dim(E), sh.dim(N), sh.dim(K)
    nw = 2 if pairs else 1
    ws = [te.placeholder((e_, n_, k_), dtype, name=nm) for nm in ("w", "w2")[:nw]]
    bs = [te.placeholder((e_, n_), dtype, name=nm) for nm in ("b", "b2")[:nw]] if bias else []
    x, sid, eid, o = grouped_stages(
        sh, N, K, block_m, top_k, gather, activation, dtype,
        lambda e, j, k, h: ws[h][e, j, k], (lambda e, j, h: bs[h][e, j]) if bias else None,
        alpha=alpha, limit=limit, offset=offset)
    return te.create_prim_func([x, *ws, *bs, sid, eid, o])


def schedule_grouped(func: tirx.PrimFunc, block_m: int, N: int, K: int, dtype: str,
                     pairs: bool, name: str, b_in_registers: bool = False) -> tirx.PrimFunc:
    """Schedule a `grouped_stages` PrimFunc (params ending in sorted_ids, tile_expert, out) and
    finish it as kernel `name`: tiles with tile_expert < 0 return at once."""
    cfg = pick_config(block_m, 2 * N if pairs else N, K, dtype, pairs)
    cfg = replace(cfg, b_in_registers=b_in_registers)
    func = schedule_gemm(func, cfg, dtype)
    eid = func.params[-2]  # tile_expert; buffer params are typed vars in TVM 0.27
    return finalize(func, name, exit_if=lambda bx: tirx.BufferLoad(eid, [bx]) < 0)


def grouped_matmul(E: int, N: int, K: int, block_m: int, top_k: int, gather: bool,
                   activation: str, dtype: str, bias: bool = False, alpha: float = 1.702,
                   limit: float = 7.0, offset: float = 1.0) -> Kernel:
    """moe.grouped_matmul: operands (x, w[, w2][, b[, b2]], sorted_ids, tile_expert), result
    [S, N].

    Row r of a used tile t (= r // block_m) is `act(w[e] @ v + b[e])` (or
    `glu(w[e] @ v + b[e], w2[e] @ v + b2[e])` for `*_mul`) with e = tile_expert[t] and
    v = x[sorted_ids[r] // top_k] (gather) or x[r]; padding rows come out as act(b[e]) (zeros
    without bias); rows of unused tiles are not written. `bias`, `alpha`, `limit`, `offset`
    follow the op's attributes (clamped_swiglu_mul)."""
    func = define_grouped_matmul(E, N, K, block_m, top_k, gather, activation, dtype, bias=bias,
                                 alpha=alpha, limit=limit, offset=offset)
    name = f"grouped_matmul_{activation}_{dtype}"
    func = schedule_grouped(func, block_m, N, K, dtype, activation.endswith("_mul"), name)
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
