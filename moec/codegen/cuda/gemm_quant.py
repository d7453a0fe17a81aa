"""The grouped GEMM with weight-only quantised experts (`moe.grouped_matmul_q`) for CUDA.

Same te stages and hand schedules as gemm.py (read its module doc): Xg (gathered x rows), Wt (the
tile's expert weights, gate/up rows interleaved for `*_mul`), Y (float32 accumulation), O
(epilogue). Only the B-operand stage differs: Wt is *computed from the quantised weights*, so
the shared-memory fill that gemm.py schedules once per K step is where the dequantisation
happens. Weights stay int8 / packed int4 in global memory and in the caches; shared memory holds
the step's dequantised tile in the compute dtype, and fp16/bf16 products run on tensor cores
(WMMA), float32 and shapes WMMA cannot tile on the SIMT schedule.

Layout: the op's own, no `arg_transforms`. q `int8[E, N, K]` or `uint8[E, N, K/2]` (int4: even
k in the low nibble), scale and zero `float32[E, N, G]`, G = ceil(K / group_size).

Dequantisation, per weight element, in float32, then cast to the compute dtype:
- one group along K (group_size >= K: int8 per channel, what quantize-experts writes by
  default): Wt = q (int8) or q - zero (int4), both exact in fp16/bf16; the scale multiplies
  the float32 accumulator in the epilogue, once per output element;
- several groups: Wt = (q - zero) * scale[group] (int8: q * scale), rounded once to the compute
  dtype (relative error 2^-11 for fp16, 2^-8 for bf16 per weight, as if the model shipped that
  dtype's dequantised weights).

Each thread dequantises `vec` consecutive k of one weight row per fill (8 for fp16/bf16) as
scalar code into registers, then stores them with one 16-byte shared-memory store
(`GemmConfig.b_in_registers`: TVM's vector form of this bit and index arithmetic does not
compile). The row's gate/up choice is hoisted out of the element loop, so a byte of two int4
weights and the group's scale and zero are loaded once per vector. The weight bytes themselves
are loaded one at a time; the threads sharing a row read its K step's bytes together (one
32-byte sector per row and step for int8, half of one for int4).
"""

from __future__ import annotations

import numbers

from tvm import te, tirx

from moec.codegen.cuda.base import FLOATS, Kernel, Shapes, cast, check_dtype, f32
from moec.codegen.cuda.gemm import check_activation, grouped_stages, schedule_grouped
from moec.errors import CodegenError


def _check(E: int, N: int, K: int, block_m: int, top_k: int, bits: int, group_size: int
           ) -> None:
    for nm, v in (("E", E), ("N", N), ("K", K), ("block_m", block_m), ("top_k", top_k),
                  ("group_size", group_size)):
        if not isinstance(v, numbers.Integral) or v <= 0:
            raise CodegenError(f"grouped_matmul_quant: {nm} must be a positive int, got {v!r}")
    if bits not in (8, 4) or (bits == 4 and (K % 2 or group_size % 2)):
        raise CodegenError(f"grouped_matmul_quant: bits={bits}, K={K}, group_size="
                           f"{group_size}: want 8, or 4 with even K and group size")


def define_grouped_matmul_quant(E: int, N: int, K: int, block_m: int, top_k: int,
                                gather: bool, activation: str = "none", bits: int = 8,
                                group_size: int = 128, dtype: str = "float32",
                                bias: bool = False, alpha: float = 1.702, limit: float = 7.0,
                                offset: float = 1.0) -> tirx.PrimFunc:
    """Unscheduled te definition of `grouped_matmul_quant` (tests run it on the CPU)."""
    check_dtype(dtype, FLOATS)
    _check(E, N, K, block_m, top_k, bits, group_size)
    pairs = check_activation("grouped_matmul_quant", activation)
    int4 = bits == 4
    gs = min(group_size, K)
    one_group = gs == K
    sh = Shapes()
    e_, n_ = sh.dim(E), sh.dim(N)
    groups = sh.dim(-(-K // gs))
    nw = 2 if pairs else 1
    parts = []
    for w in range(nw):
        sfx = "2" if w else ""
        q = te.placeholder((e_, n_, sh.dim(K // 2 if int4 else K)), "uint8" if int4 else "int8",
                           name="q" + sfx)
        s = te.placeholder((e_, n_, groups), "float32", name="scale" + sfx)
        z = te.placeholder((e_, n_, groups), "float32", name="zero" + sfx) if int4 else None
        parts.append((q, s, z))
    bs = [te.placeholder((e_, n_), dtype, name=nm) for nm in ("b", "b2")[:nw]] if bias else []

    def weight(e, j, k, h):
        q, s, z = parts[h]
        g = k // gs
        if int4:
            # even k in the low nibble; the shift is 0 or 4
            nib = tirx.shift_right(q[e, j, k // 2].astype("int32"), (k % 2 * 4).astype("int32"))
            v = f32(tirx.bitwise_and(nib, tirx.const(15, "int32"))) - z[e, j, g]
        else:
            v = f32(q[e, j, k])
        return cast(v if one_group else v * s[e, j, g], dtype)

    def scale(e, j, h):
        return parts[h][1][e, j, 0]

    x, sid, eid, o = grouped_stages(
        sh, N, K, block_m, top_k, gather, activation, dtype, weight,
        (lambda e, j, h: bs[h][e, j]) if bias else None, scale if one_group else None,
        alpha=alpha, limit=limit, offset=offset)
    ops = [t for p in parts for t in p if t is not None]
    return te.create_prim_func([x, *ops, *bs, sid, eid, o])


def grouped_matmul_quant(E: int, N: int, K: int, block_m: int, top_k: int, gather: bool,
                         activation: str = "none", bits: int = 8, group_size: int = 128,
                         dtype: str = "float32", bias: bool = False, alpha: float = 1.702,
                         limit: float = 7.0, offset: float = 1.0) -> Kernel:
    """moe.grouped_matmul_q: operands `(x, q, scale, [zero], [q2, scale2, [zero2]], [b], [b2],
    sorted_ids, tile_expert)`, result [S, N] (zero points with bits=4 only; the second weight
    when the activation is gated), in the op's layout (no `arg_transforms`).

    Row r of a used tile is moe.grouped_matmul's with the weights dequantised as the op's
    reference does (`w = q * scale` for int8, `(q - zero) * scale` for int4, per group of
    `group_size` along K); padding rows come out as act(b[e]), rows of unused tiles are not
    written."""
    func = define_grouped_matmul_quant(E, N, K, block_m, top_k, gather, activation, bits,
                                       group_size, dtype, bias, alpha, limit, offset)
    gs = min(group_size, K)
    name = f"grouped_matmul_q{bits}_{'c' if gs == K else f'g{gs}'}_{activation}_{dtype}"
    func = schedule_grouped(func, block_m, N, K, dtype, activation.endswith("_mul"), name,
                            b_in_registers=True)
    return Kernel(func, name, {})
