"""Dispatch kernels around the grouped GEMMs: `moe.align` (stable counting sort of slots into
expert tiles) and `moe.combine` (weighted gather back to token order).

Layout conventions are docs/ops.md's: slot s = t * k + j; sorted rows padded per expert to a
multiple of block_m; pad rows and rows of unused tiles hold the sentinel T*k; tile_expert is -1
past the last used tile."""

from __future__ import annotations

from tvm import te, tirx
from tvm.script import tirx as T

from moec.codegen.cuda.base import FLOATS, Kernel, Shapes, cast, check_dtype, f32, finalize
from moec.codegen.cuda.elementwise import schedule_injective
from moec.errors import CodegenError

ALIGN_WARPS = 16


@T.macro
def warp_expert_counts(ex, peers, lead, wcnt, before, after, total, lane, warp, nw):
    """One round of an ordered walk over slots, one slot per thread, `ex[0]` its expert (-1:
    none): the lanes of a warp holding the same expert find each other (`peers[0]`, a lane
    mask); the lowest of them (`lead[0]`) publishes the group's size in `wcnt[warp, expert]`;
    after the barrier each thread with an expert sums the counts of the warps before and after
    its own (`before[0]`, `after[0]`) and the round's total for its expert (`total[0]`). The
    slot's rank among this round's slots of its expert is `before[0]` plus the number of
    peers on lower lanes (`lower_peers`). Used by align and by the capacity kernel."""
    # every lane calls it (lanes without a slot carry -1, never an expert): the warp is whole
    peers[0] = T.call_extern("uint32", "__match_any_sync", T.uint32(0xFFFFFFFF), ex[0])
    lead[0] = T.Cast("int32", ex[0] >= 0 and T.call_extern("int32", "__ffs", peers[0]) - 1 == lane)
    if lead[0] == 1:
        wcnt[warp, ex[0]] = T.call_extern("int32", "__popc", peers[0])
    T.tvm_storage_sync("shared")
    if ex[0] >= 0:
        before[0] = 0
        after[0] = 0
        for w in range(nw):
            if w < warp:
                before[0] = before[0] + wcnt[w, ex[0]]
            if w > warp:
                after[0] = after[0] + wcnt[w, ex[0]]
        total[0] = before[0] + T.call_extern("int32", "__popc", peers[0]) + after[0]


def lower_peers(peers: tirx.Buffer, lane: tirx.PrimExpr) -> tirx.PrimExpr:
    """How many of the lanes in the mask `peers[0]` are below `lane`."""
    return T.call_extern("int32", "__popc", peers[0] & (
        T.shift_left(T.uint32(1), T.Cast("uint32", lane)) - T.uint32(1)))


def align(E: int, k: int, block_m: int, identity: bool = False) -> Kernel:
    """moe.align: ids i32[T, k] -> sorted_ids i32[S], tile_expert i32[TL], slot_row i32[T, k].
    With `identity` (identity experts after the E FFN experts), slots with ids >= E are left
    out of the layout and get slot_row -1.

    One thread block (the whole problem is T*k integers). Counts come from shared-memory
    atomics; placement is stable: slots are taken in rounds of one per thread, in slot order,
    and a slot's rank among equal experts is (earlier rounds) + (earlier warps of this round,
    from per-warp counts in shared memory) + (earlier lanes, from __match_any_sync)."""
    if E < 1 or k < 1 or block_m < 1:
        raise CodegenError(f"align: E={E}, k={k}, block_m={block_m} must be >= 1")
    nw = ALIGN_WARPS if E <= 512 else 8
    if nw * E * 4 > 40 * 1024:
        raise CodegenError(f"align: {E} experts need too much shared memory")
    nt = nw * 32
    sh = Shapes()
    tok = sh.dim("T")
    n = tok * k  # slots, int64
    tiles = n // block_m + E
    rows = tiles * block_m
    rounds = (n + (nt - 1)) // nt

    def slot_expert(v):  # the counter a slot's atomic add goes to (in bounds)
        return T.min(v, E - 1) if identity else v

    def count_of(v, ok):  # what it adds: 1 for a slot that is placed
        return T.Cast("int32", tirx.And(ok, v < E) if identity else ok)

    def keep(v):  # the slot's expert for placement, -1 for an identity expert's slot
        return T.Select(v < E, v, -1) if identity else v

    @T.prim_func
    def kernel(ids_h: T.handle, sid_h: T.handle, eid_h: T.handle, srow_h: T.handle):
        ids = T.match_buffer(ids_h, (tok, k), "int32")
        sid = T.match_buffer(sid_h, (rows,), "int32")
        eid = T.match_buffer(eid_h, (tiles,), "int32")
        srow = T.match_buffer(srow_h, (tok, k), "int32")
        ids_f = T.decl_buffer((n,), "int32", data=ids.data)
        srow_f = T.decl_buffer((n,), "int32", data=srow.data)
        _bx = T.launch_thread("blockIdx.x", 1)
        tid = T.launch_thread("threadIdx.x", nt)
        cnt = T.alloc_buffer((E,), "int32", scope="shared")
        off = T.alloc_buffer((E,), "int32", scope="shared")
        run = T.alloc_buffer((E,), "int32", scope="shared")
        wcnt = T.alloc_buffer((nw, E), "int32", scope="shared")
        acc = T.alloc_buffer((1,), "int32", scope="local")
        after = T.alloc_buffer((1,), "int32", scope="local")
        total = T.alloc_buffer((1,), "int32", scope="local")
        lead = T.alloc_buffer((1,), "int32", scope="local")
        ex = T.alloc_buffer((1,), "int32", scope="local")
        peers = T.alloc_buffer((1,), "uint32", scope="local")
        lane = tid % 32
        warp = tid // 32
        for i in range((E + nt - 1) // nt):
            if i * nt + tid < E:
                cnt[i * nt + tid] = 0
                run[i * nt + tid] = 0
                for w in range(nw):
                    wcnt[w, i * nt + tid] = 0
        # every row starts as padding, every tile as unused; used ones are overwritten below
        for i in range((rows + (nt - 1)) // nt):
            if i * nt + tid < rows:
                sid[i * nt + tid] = T.Cast("int32", n)
        for i in range((tiles + (nt - 1)) // nt):
            if i * nt + tid < tiles:
                eid[i * nt + tid] = -1
        T.tvm_storage_sync("shared")
        for i in range(rounds):
            # unconditional (adding 0 past n): TVM cannot place the barrier it wants between
            # these shared-memory atomics inside an `if`
            T.evaluate(T.call_extern(
                "int32", "atomicAdd",
                T.address_of(cnt[slot_expert(ids_f[T.min(i * nt + tid, n - 1)])]),
                count_of(ids_f[T.min(i * nt + tid, n - 1)], i * nt + tid < n)))
        T.tvm_storage_sync("shared")
        if tid == 0:  # exclusive scan of padded counts: E steps, cheaper than a block scan
            acc[0] = 0
            for e in range(E):
                off[e] = acc[0]
                acc[0] = acc[0] + (cnt[e] + (block_m - 1)) // block_m * block_m
        T.tvm_storage_sync("shared")
        for i in range((E + nt - 1) // nt):
            if i * nt + tid < E:
                # via a register: TVM's sync planner rejects loop extents that read shared
                ex[0] = (cnt[i * nt + tid] + (block_m - 1)) // block_m
                acc[0] = off[i * nt + tid] // block_m
                for t in range(ex[0]):
                    eid[acc[0] + t] = i * nt + tid
        for i in range(rounds):
            s = i * nt + tid
            ex[0] = -1
            if s < n:
                ex[0] = keep(ids_f[s])
                if identity:
                    srow_f[s] = -1  # overwritten below when the slot is placed
            warp_expert_counts(ex, peers, lead, wcnt, acc, after, total, lane, warp, nw)
            if ex[0] >= 0:
                row = off[ex[0]] + run[ex[0]] + acc[0] + lower_peers(peers, lane)
                sid[row] = T.Cast("int32", s)
                srow_f[s] = row
            T.tvm_storage_sync("shared")
            # Each (warp, expert) leader clears its own count, and the leader of the last warp
            # holding the expert advances its running count: no thread reads and writes the
            # same shared word in a loop, which TVM's barrier planner would reject.
            if lead[0] == 1:
                wcnt[warp, ex[0]] = 0
                if after[0] == 0:
                    run[ex[0]] = run[ex[0]] + total[0]
            T.tvm_storage_sync("shared")

    name = "align_id" if identity else "align"
    return Kernel(finalize(kernel, name), name, {})


def define_permute(H: int, k: int, dtype: str) -> tirx.PrimFunc:
    """Unscheduled te definition of `permute`."""
    check_dtype(dtype, FLOATS)
    sh = Shapes()
    tok, rows, h_ = sh.dim("T"), sh.dim("S"), sh.dim(H)
    x = te.placeholder((tok, h_), dtype, name="x")
    sid = te.placeholder((rows,), "int32", name="sorted_ids")

    def body(r, h):
        s = sid(r).astype("int64")
        return tirx.if_then_else(s < tok * k, x[tirx.min(s // k, tok - 1), h],
                                 tirx.const(0, dtype))

    xs = te.compute((rows, h_), body, name="xs")
    return te.create_prim_func([x, sid, xs])


def permute(H: int, k: int, dtype: str) -> Kernel:
    """moe.permute: (x[T, H], sorted_ids i32[S]) -> xs[S, H], xs[r] = x[sorted_ids[r] // k];
    padding rows (sorted_ids = T*k) are written as zeros."""
    func = schedule_injective(define_permute(H, k, dtype))
    name = f"permute_{dtype}"
    return Kernel(finalize(func, name), name, {})


def define_unpermute(H: int, k: int, dtype: str) -> tirx.PrimFunc:
    """Unscheduled te definition of `unpermute`."""
    check_dtype(dtype, FLOATS)
    sh = Shapes()
    tok, rows, h_ = sh.dim("T"), sh.dim("S"), sh.dim(H)
    y = te.placeholder((rows, h_), dtype, name="y")
    sr = te.placeholder((tok, k), "int32", name="slot_row")

    def body(t, j, h):
        r = tirx.max(tirx.min(sr(t, j).astype("int64"), rows - 1), tirx.const(0, "int64"))
        return y[r, h]

    out = te.compute((tok, k, h_), body, name="out")
    return te.create_prim_func([y, sr, out])


def unpermute(H: int, k: int, dtype: str) -> Kernel:
    """moe.unpermute: (y[S, H], slot_row i32[T, k]) -> out[T, k, H], out[t, j] = y[slot_row[t, j]]
    (slot_row clamped into [0, S))."""
    func = schedule_injective(define_unpermute(H, k, dtype))
    name = f"unpermute_{dtype}"
    return Kernel(finalize(func, name), name, {})


def define_combine(H: int, k: int, dtype: str, identity: bool = False) -> tirx.PrimFunc:
    """Unscheduled te definition of `combine` (tests run it on the CPU)."""
    check_dtype(dtype, FLOATS)
    sh = Shapes()
    tok, rows, h_ = sh.dim("T"), sh.dim("S"), sh.dim(H)
    y = te.placeholder((rows, h_), dtype, name="y")
    w = te.placeholder((tok, k), "float32", name="weights")
    sr = te.placeholder((tok, k), "int32", name="slot_row")
    x = te.placeholder((tok, h_), dtype, name="x") if identity else None

    def row(t, j, h):
        if x is None:
            return f32(y(sr(t, j).astype("int64"), h))
        # an identity expert's slot (slot_row -1) reads the token's own input
        r = tirx.max(sr(t, j), 0).astype("int64")
        return tirx.Select(sr(t, j) < 0, f32(x(t, h)), f32(y(r, h)))

    def body(t, h):
        acc = None
        for j in range(k):  # unrolled in Python: the fixed order of the reference
            term = w(t, j) * row(t, j, h)
            acc = term if acc is None else acc + term
        return cast(acc, dtype)

    out = te.compute((tok, h_), body, name="out")
    return te.create_prim_func([y, w, sr, *([x] if identity else []), out])


def combine(H: int, k: int, dtype: str, identity: bool = False) -> Kernel:
    """moe.combine: (y[S, H], weights f32[T, k], slot_row i32[T, k]) -> out[T, H],
    out[t] = sum_j weights[t, j] * y[slot_row[t, j]] in float32, summed in increasing j; with
    `identity` (y, weights, slot_row, x[T, H]): a slot whose slot_row is -1 adds
    weights[t, j] * x[t]."""
    func = schedule_injective(define_combine(H, k, dtype, identity))
    name = f"combine_id_{dtype}" if identity else f"combine_{dtype}"
    return Kernel(finalize(func, name), name, {})
