"""Paged KV-cache kernels for CUDA: `cache_write` (in place) and `paged_attention` (a general
step kernel and a decode kernel that splits long contexts across thread blocks). Same builders,
signatures and layouts as moec/codegen/kernels/attention.py (moec/ir/kv_ops.py has the
semantics): keys `[L, NB, Hkv, D, BS]`, values `[L, NB, Hkv, BS, Dv]`, queries `[1, Hq, T, D]`,
output `[1, T, Hq, Dv]`.

Both attention kernels are SIMT, 4 warps per block, float32 math whatever the cache dtype. A
warp works on key tiles of `kt = 32 / ds` positions: lane `l` owns key `l % kt` and the head-dim
slice `l / kt` of its dot products (the slices' partial scores meet by shuffles); its rows'
scores for that key sit in registers. Scores are pre-scaled by scale*log2(e) and exponentiated
with exp2; each row keeps a running max (warp-uniform) and a per-lane partial sum (summed by
shuffles at the end), and rescales its output accumulators when the max grows. Sinks start a
row with the sink's logit as its max and 1 as its sum. For P.V the probabilities go through
the warp's rows of a shared-memory tile (read back as broadcasts; the barrier between is a
block barrier, because TVM's barrier planner cannot tell that the tile is warp-private); lane
`l` accumulates output columns `l, l + 32, ...` of every row, so each value is loaded once for
all the rows it serves.

- General kernel (any mix of prefill chunks and decode rows): a block owns the rows of `qt`
  consecutive tokens of one sequence times `hg` query heads of one kv head (grouped-query heads
  share every K / V tile), spread over the warps. It finds its sequence by a scan over the
  sequences' tile counts (grid: ceil(T / qt) + B tiles, a partial tile per sequence at most),
  stages each key tile's K (transposed, as the cache stores it) and V in shared memory for all
  its warps with vector loads of up to 16 bytes, and walks the tiles from the first row's
  window / chunk start to the last row's position.
- Decode kernel (one query token per sequence): a block owns one sequence, `hg` query heads of
  a kv head and one of up to MAX_SPLITS ranges of the key tiles (a split per SPLIT_KEYS visible
  keys); its warps take the range's tiles in turn, reading K and V straight from the cache (no
  reuse across warps), and merge through shared memory. A sequence cut into several ranges has
  its partial results (output rows, max, sum) written to the scratch output and merged by a
  second kernel (log-sum-exp).

Positions are int32, offsets into the tensors int64. Rows past a sequence, heads past a group
and blocks past the grid work on clamped indices and write nothing; keys are read only at
positions below kv_len (through block-table entries the sequence owns).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tvm import tirx
from tvm.script import tirx as T

from moec.codegen.cuda.base import FLOATS, WARP, Kernel, Shapes, finalize
from moec.errors import CodegenError

__all__ = ["MAX_SPLITS", "PagedConfig", "cache_write", "paged_attention", "paged_config"]

FULL = 0xFFFFFFFF
NW = 4  # warps per block
NT = NW * WARP
SMEM_BUDGET = 46 * 1024  # static shared memory: 48 KiB is the most without an opt-in
MAX_SPLITS = 8  # decode: the most ranges one sequence's keys are cut into
SPLIT_KEYS = 256  # decode: visible keys per range at least
M0 = -3.0e38  # the running max before any key: finite, so exp2(M0 - m) is 0, never NaN
LOG2E = math.log2(math.e)


@dataclass(frozen=True)
class PagedConfig:
    """`ds` (1, 2, 4 or 8) lanes per key (key tiles of 32 / ds positions; larger ds = smaller
    K / V tiles in shared memory); `rows`: rows per block of the general kernel (query heads of
    a kv head x tokens; a larger GQA group is cut into groups of `rows` heads); `decode_heads`:
    query heads per decode block (each warp holds them all); `split_keys`: decode keys per
    split at least."""

    ds: int = 1
    rows: int = 16
    decode_heads: int = 8
    split_keys: int = SPLIT_KEYS

    @property
    def kt(self) -> int:
        return WARP // self.ds

    def general(self, rep: int) -> tuple[int, int, int, int]:
        """(heads per block hg, head groups, tokens per tile qt, rows per warp)."""
        hg = min(rep, self.rows)
        qt = max(1, self.rows // hg)
        return hg, -(-rep // hg), qt, -(-(qt * hg) // NW)

    def decode(self, rep: int) -> tuple[int, int]:
        """(heads per block hg = rows per warp, head groups)."""
        hg = min(rep, self.decode_heads)
        return hg, -(-rep // hg)

    def dp(self, D: int) -> int:
        """The head dim padded to a multiple of ds (zero columns)."""
        return -(-D // self.ds) * self.ds

    def smem(self, rep: int, D: int, Dv: int, dtype: str, decode: bool) -> int:
        es = 4 if dtype == "float32" else 2
        dvp = -(-Dv // WARP) * WARP
        if decode:
            hg, _ = self.decode(rep)
            return hg * self.dp(D) * es + NW * hg * (dvp + 2 + self.kt) * 4
        _, _, _, r = self.general(rep)
        return (self.dp(D) * self.kt + self.kt * dvp + NW * r * self.dp(D)) * es \
            + NW * r * self.kt * 4


def paged_config(rep: int, D: int, Dv: int, dtype: str) -> PagedConfig:
    """The most rows per block of the general kernel, then the widest key tiles (fewest lanes
    per key), then the most heads per decode block, whose shared memory fits the budget."""
    general = next(((rows, ds) for rows in (16, 8, 4, 2, 1) for ds in (1, 2, 4, 8)
                    if PagedConfig(ds, rows).smem(rep, D, Dv, dtype, False) <= SMEM_BUDGET),
                   None)
    if general is not None:
        rows, ds = general
        heads = next((h for h in (8, 4, 2, 1) if PagedConfig(ds, rows, h).smem(
            rep, D, Dv, dtype, True) <= SMEM_BUDGET), None)
        if heads is not None:
            return PagedConfig(ds, rows, heads)
    raise CodegenError(f"paged_attention: head dims D={D}, Dv={Dv} ({dtype}) do not fit a "
                       f"thread block's shared memory")


# --------------------------------------------------------------------------- cache_write


def cache_write(L: int, H: int, BS: int, D: int, layer: int, transposed: bool,
                dtype: str = "float32", x_dtype: str | None = None) -> Kernel:
    """Write x [1, H, T, D] into the cache at slots [T] of `layer`, in place. Kernel args
    `(cache, x, slots)`; the cache is `[L, NB, H, BS, D]`, or `[L, NB, H, D, BS]` if
    `transposed`. One thread per element of x (coalesced reads); slots outside the pool are
    skipped (the runtime never passes them)."""
    x_dtype = x_dtype or dtype
    for dt in (dtype, x_dtype):
        if dt not in FLOATS:
            raise CodegenError(f"cache_write: dtype {dt!r} not supported; expected one of "
                               f"{FLOATS}")
    if not 0 <= layer < L or min(H, BS, D) < 1:
        raise CodegenError(f"cache_write: layer {layer} of {L}, H={H}, BS={BS}, D={D}")
    sh = Shapes()
    nb, t = sh.dim("NB"), sh.dim("T")
    shape = (L, nb, H, D, BS) if transposed else (L, nb, H, BS, D)
    per = 256

    @T.prim_func
    def func(c_h: T.handle, x_h: T.handle, s_h: T.handle):
        C = T.match_buffer(c_h, shape, dtype)
        X = T.match_buffer(x_h, (1, H, t, D), x_dtype)
        S = T.match_buffer(s_h, (t,), "int32")
        cf = T.decl_buffer((L * nb * H * D * BS,), dtype, data=C.data)
        xf = T.decl_buffer((H * t * D,), x_dtype, data=X.data)
        n: T.let = H * t * D
        bx = T.launch_thread("blockIdx.x", T.max((n + (per - 1)) // per, T.int64(1)))
        tx = T.launch_thread("threadIdx.x", per)
        f: T.let = T.Cast("int64", bx) * per + tx
        if f < n:
            d: T.let = f % D
            tok: T.let = f // D % t
            h: T.let = f // (D * t)
            slot: T.let = T.Cast("int64", S[tok])
            if slot >= T.int64(0) and slot < nb * BS:
                base: T.let = (layer * nb + slot // BS) * H + h
                if transposed:
                    cf[(base * D + d) * BS + slot % BS] = T.Cast(dtype, xf[f])
                else:
                    cf[(base * BS + slot % BS) * D + d] = T.Cast(dtype, xf[f])

    name = f"cache_write_{dtype}"
    return Kernel(finalize(func, name), name, {})


# --------------------------------------------------------------------------- paged_attention


def _check(Hq: int, Hkv: int, D: int, Dv: int, BS: int, window: int, chunk: int) -> int:
    if Hkv < 1 or Hq % Hkv:
        raise CodegenError(f"paged_attention: {Hq} query heads are not a multiple of {Hkv}")
    if BS < 1 or BS & (BS - 1):
        raise CodegenError(f"paged_attention: block size {BS} is not a power of two")
    if min(D, Dv) < 1 or window < 0 or chunk < 0:
        raise CodegenError(f"paged_attention: D={D}, Dv={Dv}, window={window}, chunk={chunk}")
    return Hq // Hkv


def paged_attention(L: int, Hq: int, Hkv: int, D: int, Dv: int, BS: int, layer: int,
                    scale: float, window: int = 0, chunk: int = 0, sinks: bool = False,
                    dtype: str = "float32", decode: bool = False, *,
                    config: PagedConfig | None = None) -> Kernel:
    """Attention of a step's queries over the paged caches (module doc). Kernel args
    `(q, k_cache, v_cache, q_start, q_len, kv_len, block_table, [sinks], out)`, and for the
    decode kernel a last scratch output `[T, Hq, MAX_SPLITS, Dv + 2]` float32 (partial
    results). `config` forces a tiling (tests); default `paged_config`."""
    if dtype not in FLOATS:
        raise CodegenError(f"paged_attention: dtype {dtype!r} not supported; expected one of "
                           f"{FLOATS}")
    rep = _check(Hq, Hkv, D, Dv, BS, window, chunk)
    if not 0 <= layer < L:
        raise CodegenError(f"paged_attention: layer {layer} is not in 0..{L - 1}")
    cfg = config or paged_config(rep, D, Dv, dtype)
    if cfg.ds not in (1, 2, 4, 8) or cfg.rows < 1 or cfg.decode_heads < 1 \
            or cfg.split_keys < 1:
        raise CodegenError(f"paged_attention: bad tiling {cfg}")
    if cfg.smem(rep, D, Dv, dtype, decode) > SMEM_BUDGET:
        raise CodegenError(f"paged_attention: tiling {cfg} needs more than {SMEM_BUDGET} B of "
                           f"shared memory for D={D}, Dv={Dv} ({dtype})")
    geo = (L, Hq, Hkv, D, Dv, BS, layer, float(scale), window, chunk, sinks, dtype, cfg)
    func = _decode(*geo) if decode else _general(*geo)
    if not sinks:  # a TVMScript signature cannot vary: drop the unused operand
        func = tirx.PrimFunc([p for p in func.params if p.name != "SK"], func.body,
                             func.ret_type, func.attrs)
    name = f"paged_{'decode' if decode else 'attention'}_{dtype}"
    return Kernel(finalize(func, name), name, {})


def _lo(p, window: int, chunk: int):
    """The first position a query at position p sees (int32)."""
    lo = T.int32(0)
    if window:
        lo = T.max(lo, p - (window - 1))
    if chunk:
        lo = T.max(lo, p // chunk * chunk)
    return lo


def _shfl_xor(v, mask: int):
    return T.tvm_warp_shuffle_xor(T.uint32(FULL), v, mask, WARP, WARP)


def _general(L, Hq, Hkv, D, Dv, BS, layer, scale, window, chunk, sinks, dtype, cfg):
    rep = Hq // Hkv
    HG, NG, QT, R = cfg.general(rep)
    M = QT * HG
    DS, KT = cfg.ds, cfg.kt
    LOG_DS, LOG_KT = DS.bit_length() - 1, KT.bit_length() - 1
    DP = cfg.dp(D)
    NCOL = -(-Dv // WARP)
    DVP = NCOL * WARP
    RW = NW * R
    # K / V elements per vector load: up to 16 bytes of a K row (keys of one block), and of a
    # V row
    VEC = 16 // (4 if dtype == "float32" else 2)
    VK, VV = min(VEC, BS, KT), math.gcd(Dv, VEC)
    KV, VPR = KT // VK, DVP // VV  # vectors per K row, per V row (of the tiles)
    nq_load, nk_load, nv_load = (-(-n // NT) for n in (RW * DP, DP * KV, KT * VPR))
    c2 = scale * LOG2E
    sh = Shapes()
    t, nb, b_, mb = sh.dim("T"), sh.dim("NB"), sh.dim("B"), sh.dim("MB")

    @T.prim_func
    def kernel(q_h: T.handle, kc_h: T.handle, vc_h: T.handle, qs_h: T.handle, ql_h: T.handle,
               kl_h: T.handle, bt_h: T.handle, sk_h: T.handle, o_h: T.handle):
        Q = T.match_buffer(q_h, (1, Hq, t, D), dtype)
        KC = T.match_buffer(kc_h, (L, nb, Hkv, D, BS), dtype)
        VC = T.match_buffer(vc_h, (L, nb, Hkv, BS, Dv), dtype)
        QS = T.match_buffer(qs_h, (b_,), "int32")
        QL = T.match_buffer(ql_h, (b_,), "int32")
        KL = T.match_buffer(kl_h, (b_,), "int32")
        BT = T.match_buffer(bt_h, (b_, mb), "int32")
        SK = T.match_buffer(sk_h, (Hq,), dtype)
        O = T.match_buffer(o_h, (1, t, Hq, Dv), dtype)
        qf = T.decl_buffer((Hq * t * D,), dtype, data=Q.data)
        kf = T.decl_buffer((L * nb * Hkv * D * BS,), dtype, data=KC.data)
        vf = T.decl_buffer((L * nb * Hkv * BS * Dv,), dtype, data=VC.data)
        btf = T.decl_buffer((b_ * mb,), "int32", data=BT.data)
        of = T.decl_buffer((t * Hq * Dv,), dtype, data=O.data)
        t32: T.let = T.Cast("int32", t)
        nseq: T.let = T.Cast("int32", b_)
        bx = T.launch_thread("blockIdx.x", T.max((t32 + (QT - 1)) // QT + nseq, 1))
        by = T.launch_thread("blockIdx.y", Hkv * NG)
        tid = T.launch_thread("threadIdx.x", NT)
        # __launch_bounds__(NT, 1): without a minimum ptxas aims at a register count of its
        # own and may spill to meet it
        T.attr(0, "tirx.launch_bounds_min_blocks_per_sm", 1)
        Qs = T.alloc_buffer((RW * DP,), dtype, scope="shared")
        Ks = T.alloc_buffer((DP * KT,), dtype, scope="shared")  # [d, key]
        Vs = T.alloc_buffer((KT * DVP,), dtype, scope="shared")  # [key, column]
        Ps = T.alloc_buffer((RW * KT,), "float32", scope="shared")  # [row, key]
        fd = T.alloc_buffer((3,), "int32", scope="local")  # sequence, first token, tiles seen
        s = T.alloc_buffer((R,), "float32", scope="local")
        mx = T.alloc_buffer((R,), "float32", scope="local")
        ls = T.alloc_buffer((R,), "float32", scope="local")
        acc = T.alloc_buffer((R * NCOL,), "float32", scope="local")
        pv = T.alloc_buffer((R * 4,), "float32", scope="local")
        red = T.alloc_buffer((3,), "float32", scope="local")  # tile max, rescale, k / v
        h: T.let = by // NG
        g: T.let = by % NG
        w: T.let = tid // WARP
        lane: T.let = tid % WARP
        j: T.let = lane % KT  # the lane's key in the tile
        sl: T.let = lane // KT  # and its slice of the head dim
        # the block's (sequence, first token): walk the sequences' tiles
        fd[0] = -1
        fd[1] = 0
        fd[2] = 0
        for bb in range(nseq):
            if fd[0] < 0 and bx < fd[2] + (QL[bb] + (QT - 1)) // QT:
                fd[0] = bb
                fd[1] = (bx - fd[2]) * QT
            fd[2] = fd[2] + (QL[bb] + (QT - 1)) // QT
        ok: T.let = fd[0] >= 0
        b: T.let = T.max(fd[0], 0)
        i0: T.let = fd[1]
        n: T.let = T.if_then_else(ok, QL[b], 0)
        kv: T.let = T.if_then_else(ok, KL[b], 0)
        s0: T.let = T.if_then_else(ok, QS[b], 0)
        last: T.let = T.min(i0 + (QT - 1), n - 1)  # the tile's last token in the sequence
        p_last: T.let = kv - n + last
        kt0: T.let = _lo(kv - n + i0, window, chunk) // KT
        for it in range(nq_load):  # query rows (clamped into the tile and the group)
            f: T.let = it * NT + tid
            if f < RW * DP:
                if ok and f % DP < D:
                    Qs[f] = qf[(T.Cast("int64", h * rep + T.min(g * HG + f // DP % HG, rep - 1))
                                * t + s0 + T.min(i0 + f // DP // HG, last)) * D + f % DP]
                else:
                    Qs[f] = T.Cast(dtype, 0)
        for r in T.unroll(R):
            if sinks:
                mx[r] = T.Cast("float32", SK[h * rep + T.min(g * HG + (w * R + r) % HG,
                                                               rep - 1)]) * T.float32(LOG2E)
                ls[r] = T.Select(lane == 0, T.float32(1), T.float32(0))
            else:
                mx[r] = T.float32(M0)
                ls[r] = T.float32(0)
            for c in T.unroll(NCOL):
                acc[r * NCOL + c] = T.float32(0)
        for kt in range(T.Select(ok, p_last // KT - kt0 + 1, 0)):
            k0: T.let = (kt0 + kt) * KT
            T.tvm_storage_sync("shared")  # every warp is done with the last tile
            # K in vectors of VK keys (one block's slots) of one row d: the thread's keys are
            # the same in every pass, so their block is looked up once. Keys past the last
            # row's position may hold anything (their scores are masked), not so values.
            kpos: T.let = k0 + tid % KV * VK
            kblk: T.let = T.if_then_else(kpos <= p_last, btf[T.Cast("int64", b) * mb
                                                             + kpos // BS], 0)
            for it in range(nk_load):
                f: T.let = it * NT + tid  # the f-th vector of the tile: row f / KV
                if f < DP * KV:
                    if f // KV < D and kpos <= p_last:
                        for e in T.vectorized(VK):
                            Ks[f * VK + e] = kf[((T.Cast("int64", layer) * nb + T.Cast(
                                "int64", kblk)) * Hkv + h) * (D * BS) + f // KV * BS
                                + kpos % BS + e]
                    else:
                        for e in T.vectorized(VK):
                            Ks[f * VK + e] = T.Cast(dtype, 0)
            for it in range(nv_load):
                f: T.let = it * NT + tid  # the f-th vector of VV columns: key f / VPR
                if f < KT * VPR:
                    # keys past the tile's last row are zeros, not garbage: 0 * NaN is NaN
                    if f % VPR * VV < Dv and k0 + f // VPR <= p_last:
                        for e in T.vectorized(VV):
                            Vs[f * VV + e] = vf[((T.Cast("int64", layer) * nb + T.Cast(
                                "int64", btf[T.Cast("int64", b) * mb + (k0 + f // VPR) // BS]))
                                * Hkv + h) * (BS * Dv) + (k0 + f // VPR) % BS * Dv
                                + f % VPR * VV + e]
                    else:
                        for e in T.vectorized(VV):
                            Vs[f * VV + e] = T.Cast(dtype, 0)
            T.tvm_storage_sync("shared")
            for r in T.unroll(R):
                s[r] = T.float32(0)
            for dd in range(DP // DS):
                red[2] = T.Cast("float32", Ks[(dd * DS + sl) * KT + j])
                for r in T.unroll(R):
                    s[r] = s[r] + T.Cast("float32", Qs[(w * R + r) * DP + dd * DS + sl]) * red[2]
            for r in T.unroll(R):
                for st in T.unroll(LOG_DS):
                    s[r] = s[r] + _shfl_xor(s[r], KT << st)
                # row r's position (clamped token) and the keys it sees
                pr: T.let = kv - n + T.min(i0 + (w * R + r) // HG, last)
                s[r] = T.Select(k0 + j <= pr and k0 + j >= _lo(pr, window, chunk),
                                s[r] * T.float32(c2), T.float32(-math.inf))
                red[0] = s[r]
                for st in T.unroll(LOG_KT):
                    red[0] = T.max(red[0], _shfl_xor(red[0], KT >> (st + 1)))
                red[0] = T.max(mx[r], red[0])  # the new running max
                red[1] = T.exp2(mx[r] - red[0])  # rescales what the row has so far
                s[r] = T.exp2(s[r] - red[0])
                ls[r] = ls[r] * red[1] + T.Select(sl == 0, s[r], T.float32(0))
                mx[r] = red[0]
                for c in T.unroll(NCOL):
                    acc[r * NCOL + c] = acc[r * NCOL + c] * red[1]
                if sl == 0:
                    Ps[(w * R + r) * KT + j] = s[r]
            T.tvm_storage_sync("shared")  # P is warp-private, but TVM's planner cannot tell
            for j4 in range(KT // 4):  # P read 4 keys at a time (broadcast)
                for r in T.unroll(R):
                    for e in T.vectorized(4):
                        pv[r * 4 + e] = Ps[(w * R + r) * KT + j4 * 4 + e]
                for e in T.unroll(4):
                    for c in T.unroll(NCOL):
                        red[2] = T.Cast("float32", Vs[(j4 * 4 + e) * DVP + c * WARP + lane])
                        for r in T.unroll(R):
                            acc[r * NCOL + c] = acc[r * NCOL + c] + pv[r * 4 + e] * red[2]
        for r in T.unroll(R):
            for st in T.unroll(5):
                ls[r] = ls[r] + _shfl_xor(ls[r], 16 >> st)
            if ok and w * R + r < M and i0 + (w * R + r) // HG <= last \
                    and g * HG + (w * R + r) % HG < rep:
                for c in T.unroll(NCOL):
                    if c * WARP + lane < Dv:
                        of[(T.Cast("int64", s0 + i0 + (w * R + r) // HG) * Hq + h * rep
                            + g * HG + (w * R + r) % HG) * Dv + c * WARP + lane] = T.Cast(
                                dtype, acc[r * NCOL + c] / ls[r])

    return kernel


def _decode(L, Hq, Hkv, D, Dv, BS, layer, scale, window, chunk, sinks, dtype, cfg):
    rep = Hq // Hkv
    R, NG = cfg.decode(rep)
    DS, KT = cfg.ds, cfg.kt
    LOG_DS, LOG_KT = DS.bit_length() - 1, KT.bit_length() - 1
    DP = cfg.dp(D)
    NCOL = -(-Dv // WARP)
    DVP = NCOL * WARP
    S, SK_ = MAX_SPLITS, cfg.split_keys
    W2 = Dv + 2  # a partial result: Dv outputs (scaled by exp2(-max)), max, sum
    nq_load, no_load, nm_load = (-(-n // NT) for n in (R * DP, R * DVP, Dv))
    c2 = scale * LOG2E
    sh = Shapes()
    t, nb, b_, mb = sh.dim("T"), sh.dim("NB"), sh.dim("B"), sh.dim("MB")

    def splits(p, lo):
        # at most one range per key tile, so that every range has a visible key
        return T.max(1, T.min(T.min(S, p // KT + 1 - lo // KT), (p - lo + 1) // SK_))

    @T.prim_func
    def kernel(q_h: T.handle, kc_h: T.handle, vc_h: T.handle, qs_h: T.handle, ql_h: T.handle,
               kl_h: T.handle, bt_h: T.handle, sk_h: T.handle, o_h: T.handle, pt_h: T.handle):
        Q = T.match_buffer(q_h, (1, Hq, t, D), dtype)
        KC = T.match_buffer(kc_h, (L, nb, Hkv, D, BS), dtype)
        VC = T.match_buffer(vc_h, (L, nb, Hkv, BS, Dv), dtype)
        QS = T.match_buffer(qs_h, (b_,), "int32")
        QL = T.match_buffer(ql_h, (b_,), "int32")
        KL = T.match_buffer(kl_h, (b_,), "int32")
        BT = T.match_buffer(bt_h, (b_, mb), "int32")
        SK = T.match_buffer(sk_h, (Hq,), dtype)
        O = T.match_buffer(o_h, (1, t, Hq, Dv), dtype)
        P = T.match_buffer(pt_h, (t, Hq, S, W2), "float32")
        qf = T.decl_buffer((Hq * t * D,), dtype, data=Q.data)
        kf = T.decl_buffer((L * nb * Hkv * D * BS,), dtype, data=KC.data)
        vf = T.decl_buffer((L * nb * Hkv * BS * Dv,), dtype, data=VC.data)
        btf = T.decl_buffer((b_ * mb,), "int32", data=BT.data)
        of = T.decl_buffer((t * Hq * Dv,), dtype, data=O.data)
        pf = T.decl_buffer((t * Hq * S * W2,), "float32", data=P.data)
        nseq: T.let = T.Cast("int32", b_)
        with T.launch_thread("blockIdx.x", T.max(nseq * S, 1)) as bx:
            by = T.launch_thread("blockIdx.y", Hkv * NG)
            tid = T.launch_thread("threadIdx.x", NT)
            T.attr(0, "tirx.launch_bounds_min_blocks_per_sm", 1)
            Qs = T.alloc_buffer((R * DP,), dtype, scope="shared")
            Os = T.alloc_buffer((NW * R * DVP,), "float32", scope="shared")  # [warp, row, col]
            Ms = T.alloc_buffer((NW * R,), "float32", scope="shared")  # each warp's max, sum
            Ls = T.alloc_buffer((NW * R,), "float32", scope="shared")
            Ps = T.alloc_buffer((NW * R * KT,), "float32", scope="shared")  # [warp, row, key]
            s = T.alloc_buffer((R,), "float32", scope="local")
            mx = T.alloc_buffer((R,), "float32", scope="local")
            ls = T.alloc_buffer((R,), "float32", scope="local")
            acc = T.alloc_buffer((R * NCOL,), "float32", scope="local")
            pv = T.alloc_buffer((R,), "float32", scope="local")
            red = T.alloc_buffer((3,), "float32", scope="local")
            b: T.let = T.min(bx // S, T.max(nseq - 1, 0))
            sp: T.let = bx % S  # the block's range of the sequence's keys
            ok: T.let = bx // S < nseq and T.if_then_else(bx // S < nseq, QL[b], 0) == 1
            kv: T.let = T.if_then_else(ok, KL[b], 1)
            tok: T.let = T.if_then_else(ok, QS[b], 0)
            h: T.let = by // NG
            g: T.let = by % NG
            w: T.let = tid // WARP
            lane: T.let = tid % WARP
            j: T.let = lane % KT
            sl: T.let = lane // KT
            p: T.let = kv - 1
            lo: T.let = _lo(p, window, chunk)
            ns: T.let = splits(p, lo)
            t_first: T.let = lo // KT
            nt: T.let = p // KT + 1 - t_first
            a: T.let = t_first + sp * nt // ns
            cnt: T.let = T.Select(ok and sp < ns, t_first + (sp + 1) * nt // ns - a, 0)
            for it in range(nq_load):
                f: T.let = it * NT + tid
                if f < R * DP:
                    if ok and f % DP < D:
                        Qs[f] = qf[(T.Cast("int64", h * rep + T.min(g * R + f // DP, rep - 1))
                                    * t + tok) * D + f % DP]
                    else:
                        Qs[f] = T.Cast(dtype, 0)
            for r in T.unroll(R):
                if sinks:
                    mx[r] = T.Select(sp == 0 and w == 0, T.Cast(
                        "float32", SK[h * rep + T.min(g * R + r, rep - 1)]) * T.float32(LOG2E),
                        T.float32(M0))
                    ls[r] = T.Select(sp == 0 and w == 0 and lane == 0, T.float32(1),
                                     T.float32(0))
                else:
                    mx[r] = T.float32(M0)
                    ls[r] = T.float32(0)
                for c in T.unroll(NCOL):
                    acc[r * NCOL + c] = T.float32(0)
            T.tvm_storage_sync("shared")
            # warp w takes tiles w, w + NW, ...; every warp makes the same number of rounds
            # (the last ones idle), so that the block barriers around P are uniform
            for i in range((cnt + (NW - 1)) // NW):
                ti: T.let = i * NW + w
                k0: T.let = (a + ti) * KT
                for r in T.unroll(R):
                    s[r] = T.float32(0)
                if ti < cnt and k0 + j >= lo and k0 + j <= p:
                    for dd in range(DP // DS):
                        if dd * DS + sl < D:
                            red[2] = T.Cast("float32", kf[((T.Cast("int64", layer) * nb
                                + T.Cast("int64", btf[T.Cast("int64", b) * mb + (k0 + j) // BS]))
                                * Hkv + h) * (D * BS) + (dd * DS + sl) * BS + (k0 + j) % BS])
                            for r in T.unroll(R):
                                s[r] = s[r] + T.Cast("float32", Qs[r * DP + dd * DS + sl]) \
                                    * red[2]
                for r in T.unroll(R):
                    for st in T.unroll(LOG_DS):
                        s[r] = s[r] + _shfl_xor(s[r], KT << st)
                    s[r] = T.Select(ti < cnt and k0 + j >= lo and k0 + j <= p,
                                    s[r] * T.float32(c2), T.float32(-math.inf))
                    red[0] = s[r]
                    for st in T.unroll(LOG_KT):
                        red[0] = T.max(red[0], _shfl_xor(red[0], KT >> (st + 1)))
                    red[0] = T.max(mx[r], red[0])
                    red[1] = T.exp2(mx[r] - red[0])
                    s[r] = T.exp2(s[r] - red[0])
                    ls[r] = ls[r] * red[1] + T.Select(sl == 0, s[r], T.float32(0))
                    mx[r] = red[0]
                    for c in T.unroll(NCOL):
                        acc[r * NCOL + c] = acc[r * NCOL + c] * red[1]
                    if sl == 0:
                        Ps[(w * R + r) * KT + j] = s[r]
                T.tvm_storage_sync("shared")  # P is warp-private, but TVM's planner cannot tell
                # only the visible keys of the tile: no value is read past kv_len
                for jj in range(T.max(lo - k0, 0), T.Select(ti < cnt, T.min(p - k0 + 1, KT), 0)):
                    for r in T.unroll(R):
                        pv[r] = Ps[(w * R + r) * KT + jj]
                    for c in T.unroll(NCOL):
                        red[2] = T.if_then_else(c * WARP + lane < Dv, T.Cast("float32", vf[(
                            (T.Cast("int64", layer) * nb + T.Cast("int64", btf[
                                T.Cast("int64", b) * mb + (k0 + jj) // BS])) * Hkv + h)
                            * (BS * Dv) + (k0 + jj) % BS * Dv + c * WARP + lane]), T.float32(0))
                        for r in T.unroll(R):
                            acc[r * NCOL + c] = acc[r * NCOL + c] + pv[r] * red[2]
                T.tvm_storage_sync("shared")  # every warp is done with its P
            # merge the warps: each one's max, sum and outputs through shared memory
            for r in T.unroll(R):
                for st in T.unroll(5):
                    ls[r] = ls[r] + _shfl_xor(ls[r], 16 >> st)
                if lane == 0:
                    Ms[w * R + r] = mx[r]
                    Ls[w * R + r] = ls[r]
                for c in T.unroll(NCOL):
                    Os[(w * R + r) * DVP + c * WARP + lane] = acc[r * NCOL + c]
            T.tvm_storage_sync("shared")
            for it in range(no_load):
                f: T.let = it * NT + tid
                rf: T.let = f // DVP  # the element's row and column
                cf: T.let = f % DVP
                if cnt > 0 and f < R * DVP and cf < Dv and g * R + rf < rep:
                    red[0] = Ms[rf]
                    for w2 in T.unroll(1, NW):
                        red[0] = T.max(red[0], Ms[w2 * R + rf])
                    red[1] = T.float32(0)
                    red[2] = T.float32(0)
                    for w2 in T.unroll(NW):
                        pv[0] = T.exp2(Ms[w2 * R + rf] - red[0])
                        red[1] = red[1] + Ls[w2 * R + rf] * pv[0]
                        red[2] = red[2] + Os[(w2 * R + rf) * DVP + cf] * pv[0]
                    hq: T.let = T.Cast("int64", tok) * Hq + h * rep + g * R + rf
                    if ns == 1:
                        of[hq * Dv + cf] = T.Cast(dtype, red[2] / red[1])
                    else:
                        pf[(hq * S + sp) * W2 + cf] = red[2]
                        if cf == 0:
                            pf[(hq * S + sp) * W2 + Dv] = red[0]
                            pf[(hq * S + sp) * W2 + Dv + 1] = red[1]
        # merge the ranges of sequences that were cut (log-sum-exp of the partial results)
        with T.launch_thread("blockIdx.x", T.max(nseq * Hq, 1)) as bx:
            tid = T.launch_thread("threadIdx.x", NT)
            red = T.alloc_buffer((3,), "float32", scope="local")
            b: T.let = T.min(bx // Hq, T.max(nseq - 1, 0))
            hq: T.let = bx % Hq
            ok: T.let = bx // Hq < nseq and T.if_then_else(bx // Hq < nseq, QL[b], 0) == 1
            kv: T.let = T.if_then_else(ok, KL[b], 1)
            row: T.let = (T.Cast("int64", T.if_then_else(ok, QS[b], 0)) * Hq + hq) * S
            ns: T.let = splits(kv - 1, _lo(kv - 1, window, chunk))
            if ok and ns > 1:
                red[0] = T.float32(M0)
                for sp in range(ns):
                    red[0] = T.max(red[0], pf[(row + sp) * W2 + Dv])
                red[1] = T.float32(0)
                for sp in range(ns):
                    red[1] = red[1] + T.exp2(pf[(row + sp) * W2 + Dv] - red[0]) \
                        * pf[(row + sp) * W2 + Dv + 1]
                for it in range(nm_load):
                    if it * NT + tid < Dv:
                        red[2] = T.float32(0)
                        for sp in range(ns):
                            red[2] = red[2] + T.exp2(pf[(row + sp) * W2 + Dv] - red[0]) \
                                * pf[(row + sp) * W2 + it * NT + tid]
                        of[row // S * Dv + it * NT + tid] = T.Cast(dtype, red[2] / red[1])

    return kernel
