"""Causal attention with grouped-query heads for CUDA (`core.attention`), flash-attention style.

Both kernels give one thread block `bq` query rows of one (batch, query head) and walk the key
tiles up to the block's last row (the causal mask), heaviest query tiles first. K and V tiles
are staged in shared memory (rows past T as zeros); the softmax is online in float32: scores
are pre-scaled by scale*log2(e) and exponentiated with exp2, each row keeps its running max and
sum, and its output accumulators are rescaled when the max grows. Rows never see an all-masked
first tile (key 0 is visible to every row), so the running max is finite from the first tile on.

- Tensor cores (fp16/bf16, head dims multiples of 16): 4 warps of 16 query rows. A warp keeps
  its Q rows as WMMA fragments, computes S = Q K^T into fragments, stores them to its private
  float32 staging tile, applies mask + online softmax with 2 lanes per row (one shuffle per
  reduction), writes P in the input dtype to its private P tile, and multiplies P V on tensor
  cores, 16 or 32 output columns at a time; each chunk goes through the staging tile into the
  lane's float32 output registers (lane = row x half of the columns: the rows it did the
  softmax for, so the rescale factor is already in a register). Warp-private tiles need only
  __syncwarp; the block barriers guard the K / V tiles. Warps skip key tiles that lie
  entirely after their rows.
- SIMT (float32, odd head dims, very large heads): 4 warps; lanes form row groups; Q and K are
  staged transposed (conflict-free column reads), each thread owns `tm` rows x a slice of keys
  and of output columns in registers; row max / sum by shuffles within the row group, P through
  shared memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tvm.script import tirx as T

from moec.codegen.cuda.base import FLOATS, WARP, Kernel, Shapes, check_dtype, finalize
from moec.errors import CodegenError

FULL = 0xFFFFFFFF
SMEM_BUDGET = 46 * 1024  # static shared memory: 48 KiB is the most without an opt-in
NEG_INF = -math.inf
M0 = -3.0e38  # the running max before any key: finite, so exp2(M0 - m) is 0, never NaN


@dataclass(frozen=True)
class SimtConfig:
    """SIMT tiling: `warps` warps, each owning `rg * tm` query rows; a warp's lanes form `rg`
    row groups of `32 // rg` lanes. A thread holds `tm` rows x `bk / (32 // rg)` scores of the
    current key tile and `tm` rows x `ceil(Dv / (32 // rg))` output accumulators."""

    tm: int
    bk: int
    warps: int = 4
    rg: int = 4

    @property
    def cg(self) -> int:
        return WARP // self.rg

    @property
    def bq(self) -> int:
        return self.warps * self.rg * self.tm

    @property
    def nj(self) -> int:
        return self.bk // self.cg

    def strides(self, dtype: str) -> tuple[int, int, int]:
        """Row strides (elements) of the transposed Q and K tiles and of the P tile: an odd
        number of 32-bit words, so the transposing stores and the column reads hit distinct
        banks."""
        pad = 1 if dtype == "float32" else 2
        return self.bq + pad, self.bk + pad, self.bq + 1

    def smem(self, D: int, Dv: int, dtype: str) -> int:
        es = 4 if dtype == "float32" else 2
        sq, sk, sp = self.strides(dtype)
        dvp = -(-Dv // self.cg) * self.cg
        return (D * sq + D * sk + self.bk * dvp) * es + self.bk * sp * 4


@dataclass(frozen=True)
class WmmaConfig:
    """Tensor-core tiling: `warps` warps of 16 query rows, key tiles of `bk` (a multiple of 16).
    P.V runs `pvc(Dv)` output columns at a time."""

    bk: int
    warps: int = 4

    @property
    def bq(self) -> int:
        return 16 * self.warps

    @staticmethod
    def pvc(Dv: int) -> int:
        return 32 if Dv % 32 == 0 else 16

    def smem(self, D: int, Dv: int) -> int:
        kv = self.bk * (D + 8) * 2 + self.bk * (Dv + 8) * 2
        staging = self.warps * 16 * (max(self.bk, self.pvc(Dv)) + 4) * 4
        return kv + staging + self.warps * 16 * (self.bk + 8) * 2


def wmma_fits(D: int, Dv: int, dtype: str) -> bool:
    """Tensor cores for fp16/bf16 with head dims in 16s, while a lane's Q fragments and output
    registers (D / 4 + Dv / 2 of them) stay clear of spilling."""
    return (dtype in ("float16", "bfloat16") and D % 16 == 0 and Dv % 16 == 0
            and D // 4 + Dv // 2 <= 128)


def attention_config(D: int, Dv: int, dtype: str) -> SimtConfig | WmmaConfig:
    """Tensor cores when `wmma_fits`, with the largest key tile whose operands fit the shared
    memory budget; otherwise the largest SIMT tile (query rows x keys, then query rows) with
    at most 64 output and 32 score accumulators per thread."""
    if wmma_fits(D, Dv, dtype):
        for bk in (64, 32, 16):
            if WmmaConfig(bk).smem(D, Dv) <= SMEM_BUDGET:
                return WmmaConfig(bk)
    best: SimtConfig | None = None
    for tm in (4, 2, 1):
        for bk in (64, 32, 16, 8):
            cfg = SimtConfig(tm, bk)
            no = -(-Dv // cfg.cg)
            if tm * no > 64 or tm * cfg.nj > 32 or cfg.smem(D, Dv, dtype) > SMEM_BUDGET:
                continue
            if best is None or (cfg.bq * cfg.bk, cfg.bq) > (best.bq * best.bk, best.bq):
                best = cfg
    if best is None:
        raise CodegenError(f"attention: head dims D={D}, Dv={Dv} ({dtype}) do not fit a "
                           f"thread block's shared memory")
    return best


def attention(B: int, Hq: int, Hkv: int, D: int, Dv: int, scale: float,
              dtype: str = "float32", *, config: SimtConfig | WmmaConfig | None = None
              ) -> Kernel:
    """Causal attention with grouped-query heads. Kernel args:
    `(q [B, Hq, T, D], k [B, Hkv, T, D], v [B, Hkv, T, Dv], out [B, T, Hq, Dv])`; query head h
    reads kv head h // (Hq / Hkv); float32 math. See the module doc for the two schedules;
    `config` forces one (tests), default `attention_config`."""
    check_dtype(dtype, FLOATS)
    if min(B, Hq, Hkv, D, Dv) < 1 or Hq % Hkv:
        raise CodegenError(f"attention: B={B}, Hq={Hq}, Hkv={Hkv}, D={D}, Dv={Dv}: query heads "
                           f"must be a multiple of kv heads")
    if B * Hq > 65535:
        raise CodegenError(f"attention: {B} x {Hq} (batch x heads) exceeds gridDim.y")
    cfg = config or attention_config(D, Dv, dtype)
    if isinstance(cfg, WmmaConfig):
        if dtype == "float32" or D % 16 or Dv % 16 or cfg.bk % 16:
            raise CodegenError(f"attention: no tensor-core tiling {cfg} for D={D}, Dv={Dv}, "
                               f"{dtype}")
        func = _wmma(B, Hq, Hkv, D, Dv, float(scale), dtype, cfg)
    else:
        if cfg.bk % cfg.cg or WARP % cfg.rg or cfg.cg & (cfg.cg - 1):
            raise CodegenError(f"attention: bad tiling {cfg}")
        func = _simt(B, Hq, Hkv, D, Dv, float(scale), dtype, cfg)
    name = f"attention_{dtype}"
    return Kernel(finalize(func, name), name, {})


def _wmma(B: int, Hq: int, Hkv: int, D: int, Dv: int, scale: float, dtype: str,
          cfg: WmmaConfig):
    rep = Hq // Hkv
    t = Shapes().dim("T")
    NW, BQ, BK = cfg.warps, cfg.bq, cfg.bk
    NT = NW * WARP
    KD, NS, KK = D // 16, BK // 16, BK // 16  # Q fragments, S fragments, P.V k-steps
    PVC = cfg.pvc(Dv)
    NPF, NCH = PVC // 16, Dv // PVC  # fragments per P.V chunk, chunks
    SKD, SV = D + 8, Dv + 8  # K / V tile row strides (16 B of padding against bank conflicts)
    SW = max(BK, PVC) + 4  # float32 staging row stride
    SP = BK + 8  # P tile row stride
    HS, HO = BK // 2, PVC // 2  # scores and output columns per lane (2 lanes per row)
    DV8, DK8 = Dv // 8, D // 8  # 16-byte vectors per K / V row
    nk_load, nv_load = (-(-(BK * n) // NT) for n in (DK8, DV8))
    c2 = scale * math.log2(math.e)

    # WMMA pointers via tvm_access_ptr with an empty read/write mask: the call keeps its side
    # effect (a bare address_of load would be dropped as pure), and TVM's barrier planner does
    # not see these accesses, so it inserts no __syncthreads into the warp-private parts
    # (where a block barrier under a warp-uniform branch would be invalid). Every barrier
    # below is placed by hand.
    def ptr(buf, offset, extent):
        return T.tvm_access_ptr(T.type_annotation(dtype), buf.data, offset, extent, 0)

    @T.prim_func
    def kernel(q_h: T.handle, k_h: T.handle, v_h: T.handle, o_h: T.handle):
        Q = T.match_buffer(q_h, (B, Hq, t, D), dtype)
        K = T.match_buffer(k_h, (B, Hkv, t, D), dtype)
        V = T.match_buffer(v_h, (B, Hkv, t, Dv), dtype)
        O = T.match_buffer(o_h, (B, t, Hq, Dv), dtype)
        qf = T.decl_buffer((B * Hq * t * D,), dtype, data=Q.data)
        kf = T.decl_buffer((B * Hkv * t * D,), dtype, data=K.data)
        vf = T.decl_buffer((B * Hkv * t * Dv,), dtype, data=V.data)
        of = T.decl_buffer((B * t * Hq * Dv,), dtype, data=O.data)
        bx = T.launch_thread("blockIdx.x", T.max((T.Cast("int32", t) + (BQ - 1)) // BQ, 1))
        by = T.launch_thread("blockIdx.y", B * Hq)
        tid = T.launch_thread("threadIdx.x", NT)
        # __launch_bounds__(NT, 1): without a minimum ptxas aims at a register count of its
        # own (128, 168, ...) and spills a few bytes to meet it
        T.attr(0, "tirx.launch_bounds_min_blocks_per_sm", 1)
        Ks = T.alloc_buffer((BK * SKD,), dtype, scope="shared")
        Vs = T.alloc_buffer((BK * SV,), dtype, scope="shared")
        Sw = T.alloc_buffer((NW * 16 * SW,), "float32", scope="shared")  # per warp
        Pw = T.alloc_buffer((NW * 16 * SP,), dtype, scope="shared")  # per warp
        qa = T.alloc_buffer((KD * 256,), dtype, scope="wmma.matrix_a")
        kb = T.alloc_buffer((256,), dtype, scope="wmma.matrix_b")
        vb = T.alloc_buffer((256,), dtype, scope="wmma.matrix_b")
        pa = T.alloc_buffer((256,), dtype, scope="wmma.matrix_a")
        sacc = T.alloc_buffer((NS * 256,), "float32", scope="wmma.accumulator")
        oacc = T.alloc_buffer((NPF * 256,), "float32", scope="wmma.accumulator")
        o = T.alloc_buffer((NCH * HO,), "float32", scope="local")
        sv = T.alloc_buffer((HS,), "float32", scope="local")
        st = T.alloc_buffer((5,), "float32", scope="local")  # max, sum, tile max/sum, rescale
        # Indices inside the tensors' rows are int32 (fewer registers); the row bases int64.
        t32: T.let = T.Cast("int32", t)
        q0: T.let = (T.max((t32 + (BQ - 1)) // BQ, 1) - 1 - bx) * BQ
        b: T.let = by // Hq
        hq: T.let = by % Hq
        kvh: T.let = b * Hkv + hq // rep
        w: T.let = tid // WARP
        row: T.let = tid % WARP // 2  # this lane's row of its warp's 16, and its half
        hf: T.let = tid % 2
        qr: T.let = q0 + w * 16 + row  # this lane's query row
        sw0: T.let = w * (16 * SW)
        sp0: T.let = w * (16 * SP)
        for kd in T.unroll(KD):  # Q fragments, 16 columns at a time through the P tile
            if qr < t32:
                for e in T.vectorized(8):
                    Pw[sp0 + row * SP + hf * 8 + e] = qf[
                        (T.Cast("int64", by) * t + qr) * D + (kd * 16 + hf * 8 + e)]
            else:
                for e in T.vectorized(8):
                    Pw[sp0 + row * SP + hf * 8 + e] = T.Cast(dtype, 0)
            T.evaluate(T.call_extern("void", "__syncwarp"))
            T.evaluate(T.tvm_load_matrix_sync(qa.data, 16, 16, 16, kd, ptr(Pw, sp0, 16 * SP),
                                              SP, "row_major", dtype="void"))
            T.evaluate(T.call_extern("void", "__syncwarp"))
        st[0] = T.float32(M0)
        st[1] = T.float32(0)
        for j in T.unroll(NCH * HO):
            o[j] = T.float32(0)
        for kt in range((T.min(q0 + BQ, t32) + (BK - 1)) // BK):
            k0: T.let = kt * BK
            kv0: T.let = T.Cast("int64", kvh) * t + k0  # row of the tile's first key
            T.tvm_storage_sync("shared")  # every warp is done with the last K / V tiles
            for it in range(nk_load):
                f: T.let = it * NT + tid  # the f-th 16-byte vector of the K tile
                if f < BK * DK8:
                    if k0 + f // DK8 < t32:
                        for e in T.vectorized(8):
                            Ks[f // DK8 * SKD + f % DK8 * 8 + e] = kf[kv0 * D + (f * 8 + e)]
                    else:
                        for e in T.vectorized(8):
                            Ks[f // DK8 * SKD + f % DK8 * 8 + e] = T.Cast(dtype, 0)
            for it in range(nv_load):
                f: T.let = it * NT + tid
                if f < BK * DV8:
                    # rows past T must be zeros, not garbage: 0 * NaN would poison P.V
                    if k0 + f // DV8 < t32:
                        for e in T.vectorized(8):
                            Vs[f // DV8 * SV + f % DV8 * 8 + e] = vf[kv0 * Dv + (f * 8 + e)]
                    else:
                        for e in T.vectorized(8):
                            Vs[f // DV8 * SV + f % DV8 * 8 + e] = T.Cast(dtype, 0)
            T.tvm_storage_sync("shared")
            if k0 <= q0 + w * 16 + 15:  # warp-uniform: some key of the tile is visible
                for n in T.unroll(NS):  # S = Q K^T (K tile rows read as a col-major B)
                    T.evaluate(T.tvm_fill_fragment(sacc.data, 16, 16, 16, n, T.float32(0),
                                                   dtype="void"))
                    for kd in T.unroll(KD):
                        T.evaluate(T.tvm_load_matrix_sync(
                            kb.data, 16, 16, 16, 0, ptr(Ks, n * 16 * SKD + kd * 16, 16 * SKD),
                            SKD, "col_major", dtype="void"))
                        T.evaluate(T.tvm_mma_sync(sacc.data, n, qa.data, kd, kb.data, 0,
                                                  sacc.data, n, dtype="void"))
                    T.evaluate(T.tvm_store_matrix_sync(sacc.data, 16, 16, 16, n,
                                                       T.address_of(Sw[sw0 + n * 16]), SW,
                                                       "row_major", dtype="void"))
                T.evaluate(T.call_extern("void", "__syncwarp"))
                st[2] = T.float32(NEG_INF)
                for j in T.unroll(HS):  # mask, scale, tile max over the lane's half row
                    if k0 + hf * HS + j <= qr and k0 + hf * HS + j < t32:
                        sv[j] = Sw[sw0 + row * SW + hf * HS + j] * T.float32(c2)
                    else:
                        sv[j] = T.float32(NEG_INF)
                    st[2] = T.max(st[2], sv[j])
                st[2] = T.max(st[2], T.tvm_warp_shuffle_xor(T.uint32(FULL), st[2], 1, WARP,
                                                            WARP))
                st[2] = T.max(st[0], st[2])  # the new running max
                st[3] = T.float32(0)
                for j in T.unroll(HS):
                    sv[j] = T.exp2(sv[j] - st[2])
                    st[3] = st[3] + sv[j]
                    Pw[sp0 + row * SP + hf * HS + j] = T.Cast(dtype, sv[j])
                st[3] = st[3] + T.tvm_warp_shuffle_xor(T.uint32(FULL), st[3], 1, WARP, WARP)
                st[4] = T.exp2(st[0] - st[2])
                st[0] = st[2]
                st[1] = st[1] * st[4] + st[3]
                T.evaluate(T.call_extern("void", "__syncwarp"))
                for ch in T.unroll(NCH):  # O = O * rescale + P V, PVC columns at a time
                    for f in T.unroll(NPF):
                        T.evaluate(T.tvm_fill_fragment(oacc.data, 16, 16, 16, f, T.float32(0),
                                                       dtype="void"))
                    for kk in T.unroll(KK):
                        T.evaluate(T.tvm_load_matrix_sync(
                            pa.data, 16, 16, 16, 0, ptr(Pw, sp0 + kk * 16, 16 * SP), SP,
                            "row_major", dtype="void"))
                        for f in T.unroll(NPF):
                            T.evaluate(T.tvm_load_matrix_sync(
                                vb.data, 16, 16, 16, 0,
                                ptr(Vs, kk * 16 * SV + ch * PVC + f * 16, 16 * SV), SV,
                                "row_major", dtype="void"))
                            T.evaluate(T.tvm_mma_sync(oacc.data, f, pa.data, 0, vb.data, 0,
                                                      oacc.data, f, dtype="void"))
                    if ch > 0:  # the lanes are done reading the last chunk from the staging
                        T.evaluate(T.call_extern("void", "__syncwarp"))
                    for f in T.unroll(NPF):
                        T.evaluate(T.tvm_store_matrix_sync(oacc.data, 16, 16, 16, f,
                                                           T.address_of(Sw[sw0 + f * 16]), SW,
                                                           "row_major", dtype="void"))
                    T.evaluate(T.call_extern("void", "__syncwarp"))
                    for j in T.unroll(HO):
                        o[ch * HO + j] = o[ch * HO + j] * st[4] + Sw[sw0 + row * SW + hf * HO + j]
        if qr < t32:
            st[1] = T.float32(1) / st[1]
            for ch in T.unroll(NCH):
                for j in T.unroll(HO):
                    of[((T.Cast("int64", b) * t + qr) * Hq + hq) * Dv + (ch * PVC + hf * HO + j)] \
                        = T.Cast(dtype, o[ch * HO + j] * st[1])

    return kernel


def _simt(B: int, Hq: int, Hkv: int, D: int, Dv: int, scale: float, dtype: str,
          cfg: SimtConfig):
    rep = Hq // Hkv
    t = Shapes().dim("T")
    BQ, BK, TM, NJ, CG, RG = cfg.bq, cfg.bk, cfg.tm, cfg.nj, cfg.cg, cfg.rg
    NT = cfg.warps * WARP
    NO = -(-Dv // CG)  # output columns per thread: cg + jn * CG
    DVP = NO * CG
    SQ, SK, SP = cfg.strides(dtype)
    LOG_CG = CG.bit_length() - 1
    c2 = scale * math.log2(math.e)  # exp(x * scale) = exp2(x * c2)
    nq_load, nk_load, nv_load = (-(-n // NT) for n in (BQ * D, BK * D, BK * DVP))

    @T.prim_func
    def kernel(q_h: T.handle, k_h: T.handle, v_h: T.handle, o_h: T.handle):
        Q = T.match_buffer(q_h, (B, Hq, t, D), dtype)
        K = T.match_buffer(k_h, (B, Hkv, t, D), dtype)
        V = T.match_buffer(v_h, (B, Hkv, t, Dv), dtype)
        O = T.match_buffer(o_h, (B, t, Hq, Dv), dtype)
        qf = T.decl_buffer((B * Hq * t * D,), dtype, data=Q.data)
        kf = T.decl_buffer((B * Hkv * t * D,), dtype, data=K.data)
        vf = T.decl_buffer((B * Hkv * t * Dv,), dtype, data=V.data)
        of = T.decl_buffer((B * t * Hq * Dv,), dtype, data=O.data)
        bx = T.launch_thread("blockIdx.x", T.max((t + (BQ - 1)) // BQ, T.int64(1)))
        by = T.launch_thread("blockIdx.y", B * Hq)
        tid = T.launch_thread("threadIdx.x", NT)
        # __launch_bounds__(NT, 1): without a minimum ptxas aims at a register count of its
        # own (128, 168, ...) and spills a few bytes to meet it
        T.attr(0, "tirx.launch_bounds_min_blocks_per_sm", 1)
        # flat, so that TVM's buffer compaction keeps the bank-conflict padding of the rows
        Qt = T.alloc_buffer((D * SQ,), dtype, scope="shared")
        Kt = T.alloc_buffer((D * SK,), dtype, scope="shared")
        Vs = T.alloc_buffer((BK * DVP,), dtype, scope="shared")
        Ps = T.alloc_buffer((BK * SP,), "float32", scope="shared")
        s = T.alloc_buffer((TM * NJ,), "float32", scope="local")
        acc = T.alloc_buffer((TM * NO,), "float32", scope="local")
        mrow = T.alloc_buffer((TM,), "float32", scope="local")
        lrow = T.alloc_buffer((TM,), "float32", scope="local")
        qv = T.alloc_buffer((TM,), "float32", scope="local")
        kv = T.alloc_buffer((NJ,), "float32", scope="local")
        vv = T.alloc_buffer((NO,), "float32", scope="local")
        red = T.alloc_buffer((3,), "float32", scope="local")  # tile max / sum, new max
        # the heaviest query tiles (most keys under the causal mask) start first
        q0: T.let = (T.max((t + (BQ - 1)) // BQ, T.int64(1)) - 1 - bx) * BQ
        b: T.let = by // Hq
        hq: T.let = by % Hq
        kvh: T.let = b * Hkv + hq // rep
        r0: T.let = tid // WARP * (RG * TM) + tid % WARP // CG * TM  # the thread's rows: r0 + i
        cg: T.let = tid % CG
        for it in range(nq_load):  # the Q tile is contiguous: rows q0.. of head (b, hq)
            f: T.let = it * NT + tid
            if f < BQ * D:
                if q0 + f // D < t:
                    Qt[f % D * SQ + f // D] = qf[(by * t + q0) * D + f]
                else:
                    Qt[f % D * SQ + f // D] = T.Cast(dtype, 0)
        for i in T.unroll(TM):
            mrow[i] = T.float32(M0)
            lrow[i] = T.float32(0)
        for j in T.unroll(TM * NO):
            acc[j] = T.float32(0)
        for kt in range((T.min(q0 + BQ, t) + (BK - 1)) // BK):
            T.tvm_storage_sync("shared")  # the last tile's P.V is done with Vs and Ps
            for it in range(nk_load):
                f: T.let = it * NT + tid
                if f < BK * D:
                    if kt * BK + f // D < t:
                        Kt[f % D * SK + f // D] = kf[(kvh * t + kt * BK) * D + f]
                    else:
                        Kt[f % D * SK + f // D] = T.Cast(dtype, 0)
            for it in range(nv_load):
                f: T.let = it * NT + tid
                if f < BK * DVP:
                    # rows past T must be zeros, not garbage: 0 * NaN would poison the sums
                    if kt * BK + f // DVP < t and f % DVP < Dv:
                        Vs[f] = vf[(kvh * t + kt * BK + f // DVP) * Dv + f % DVP]
                    else:
                        Vs[f] = T.Cast(dtype, 0)
            T.tvm_storage_sync("shared")
            for j in T.unroll(TM * NJ):
                s[j] = T.float32(0)
            for d in range(D):
                for i in T.unroll(TM):
                    qv[i] = T.Cast("float32", Qt[d * SQ + r0 + i])
                for j in T.unroll(NJ):
                    kv[j] = T.Cast("float32", Kt[d * SK + cg * NJ + j])
                for i in T.unroll(TM):
                    for j in T.unroll(NJ):
                        s[i * NJ + j] = s[i * NJ + j] + qv[i] * kv[j]
            for i in T.unroll(TM):
                red[0] = T.float32(NEG_INF)
                for j in T.unroll(NJ):
                    # causal: key kt*BK + cg*NJ + j is seen by row q0 + r0 + i if not later
                    if kt * BK + cg * NJ + j <= q0 + r0 + i and kt * BK + cg * NJ + j < t:
                        s[i * NJ + j] = s[i * NJ + j] * T.float32(c2)
                    else:
                        s[i * NJ + j] = T.float32(NEG_INF)
                    red[0] = T.max(red[0], s[i * NJ + j])
                for st in T.unroll(LOG_CG):
                    red[0] = T.max(red[0], T.tvm_warp_shuffle_xor(
                        T.uint32(FULL), red[0], (CG // 2) >> st, WARP, WARP))
                red[2] = T.max(mrow[i], red[0])
                red[1] = T.float32(0)
                for j in T.unroll(NJ):
                    s[i * NJ + j] = T.exp2(s[i * NJ + j] - red[2])
                    red[1] = red[1] + s[i * NJ + j]
                    Ps[(cg * NJ + j) * SP + r0 + i] = s[i * NJ + j]
                for st in T.unroll(LOG_CG):
                    red[1] = red[1] + T.tvm_warp_shuffle_xor(
                        T.uint32(FULL), red[1], (CG // 2) >> st, WARP, WARP)
                red[0] = T.exp2(mrow[i] - red[2])  # rescales what the row has so far
                mrow[i] = red[2]
                lrow[i] = lrow[i] * red[0] + red[1]
                for jn in T.unroll(NO):
                    acc[i * NO + jn] = acc[i * NO + jn] * red[0]
            T.tvm_storage_sync("shared")
            for c in range(BK):
                for i in T.unroll(TM):
                    qv[i] = Ps[c * SP + r0 + i]
                for jn in T.unroll(NO):
                    vv[jn] = T.Cast("float32", Vs[c * DVP + cg + jn * CG])
                for i in T.unroll(TM):
                    for jn in T.unroll(NO):
                        acc[i * NO + jn] = acc[i * NO + jn] + qv[i] * vv[jn]
        for i in T.unroll(TM):
            if q0 + r0 + i < t:
                red[0] = T.float32(1) / lrow[i]
                for jn in T.unroll(NO):
                    if cg + jn * CG < Dv:
                        of[((b * t + q0 + r0 + i) * Hq + hq) * Dv + cg + jn * CG] = T.Cast(
                            dtype, acc[i * NO + jn] * red[0])

    return kernel
