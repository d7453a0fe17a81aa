"""Dense `y = x @ w.T (+ b)` for nn.Linear weights `[N, K]`: a register-tiled, cache-blocked GEMM.

Layout: w is packed offline (`arg_transforms[1]`) into panels `[NB, K, NR]` (NR output columns
contiguous per k), so the inner loop reads one contiguous NR-vector per k. Micro-kernel: an
MR x NR accumulator tile in registers (AVX2: 6 x 16 = 12 ymm), one broadcast of x per row and
k. Blocking: a task is (MC rows, one NR panel), tasks in parallel; within it, K is cut into KC
chunks so the KC x NR panel slice stays in L1 while the MC/MR row groups of the task reuse it.
Row tails use clamped row indices (rows past M recompute and rewrite row M-1 with the same
values), so there is no predicate in the inner loop and M may be any symbolic size, 0 included.

Decode path: at most GEMV_ROWS rows (a runtime branch on the row count; shared experts and
attention projections at decode) would recompute MR clamped copies of one row, one short K
chunk of one panel per task. Instead a task is a block of GEMV_PANELS panels (a partial last
block recomputes the last panel), rows one at a time over the whole of K with the block's panels
interleaved: every weight panel is one contiguous stream and GEMV_PANELS streams are in flight.
Measured at M=1 on the 2-core Zen 3 VM, weights from memory (both paths interleaved in one run,
medians of 30 samples, 4 runs): K=1024 N=512 18-20 -> 27-36 GB/s, K=512 N=1024 21 -> 31-38,
K=2048 N=2048 19-24 -> 29-35 (2, 6 or 8 interleaved panels measured the same as 4).
"""

from __future__ import annotations

import numpy as np
from tvm.script import tirx as T

from moec.codegen.kernels.base import (
    Dim,
    Dims,
    Kernel,
    ceildiv,
    check_dtype,
    check_weight_dtype,
    finish,
    i64,
    kernel_name,
    prod,
    vector_lanes,
)
from moec.errors import CodegenError

KC_MAX = 1024  # K slices above this are split (KC x NR x 4 B = 64 KiB at NR=16)
GEMV_ROWS = 2  # at most this many rows (decode) take the row-at-a-time path (module docstring)
GEMV_PANELS = 4  # panels interleaved per task of that path


def k_blocking(K: int) -> tuple[int, int]:
    """(chunk size, number of chunks) for the K loop: chunks of at most KC_MAX, near-equal."""
    nkc = max(1, -(-K // KC_MAX))
    return -(-K // nkc), nkc


def pack_nk(w: np.ndarray, nr: int) -> np.ndarray:
    """`[..., N, K]` -> `[..., ceil(N/nr), K, nr]`, zero-padding N: panel p, row k holds
    w[..., p*nr:(p+1)*nr, k] contiguously."""
    import torch  # noqa: PLC0415  (its transposing copy is parallel: 10x numpy's here)

    *lead, n, k = w.shape
    nb = -(-n // nr)
    dt = w.dtype
    raw = w.view(f"u{dt.itemsize}") if dt.kind == "V" else w  # bfloat16 etc.: copy the bits
    raw = np.ascontiguousarray(raw)
    if not raw.flags.writeable:  # weights mapped read-only: torch.from_numpy warns ("not
        raw = raw.copy()  # writable"), and a warning filter would be process-wide state
    src = torch.from_numpy(raw)
    if nb * nr != n:
        src = torch.nn.functional.pad(src, (0, 0, 0, nb * nr - n))
    out = src.reshape(*lead, nb, nr, k).transpose(-1, -2).contiguous().numpy()
    return out.view(dt) if dt.kind == "V" else out


def linear_tiles(dtype: str) -> tuple[int, int, int]:
    """(MR, NR, MC) of the linear micro-kernel for the host SIMD width."""
    vl = vector_lanes(dtype)
    mr = 6
    return mr, 2 * vl, 16 * mr


def linear(
    M: Dim | tuple, K: int, N: int, dtype: str = "float32", bias: bool = False,
    w_dtype: str | None = None,
) -> Kernel:
    """`y[M, N] = x[M, K] @ w[N, K].T (+ b[N])`. Kernel args: `(x, w_packed, [b], y)`.

    M: rows, an int or a symbolic name, or a tuple of leading dims (x `[*M, K]`, y `[*M, N]`).
    `arg_transforms[1]` packs w `[N, K]` into `[ceil(N/NR), K, NR]`; pass the packed array.
    `w_dtype` (default `dtype`): float16 / bfloat16 weights under float32 x, widened in
    registers as they are read; int8 (core.linear_q): the kernel args are then
    `(x, q_packed, scale [N, 1], [b], y)` and each output column is scaled once, after the sum
    over K (y = scale[n] * sum_k x[k] q[n, k], exact for one scale per output channel)."""
    check_dtype("linear", dtype)
    scaled = w_dtype == "int8"  # float32 activations (check_dtype)
    w_dtype = "int8" if scaled else check_weight_dtype("linear", dtype, w_dtype)
    if K < 1 or N < 1:
        raise CodegenError(f"linear: K={K} and N={N} must be >= 1")
    mr, nr, mc = linear_tiles(dtype)
    kc, nkc = k_blocking(K)
    nb = -(-N // nr)
    full_nb = N // nr  # panels with all NR columns inside N
    lead = list(M) if isinstance(M, (tuple, list)) else [M]
    dims = Dims()
    lead_sh = dims.shape(lead)
    m = prod(lead_sh)
    mg = mc // mr
    pb = min(GEMV_PANELS, nb)
    npb = -(-nb // pb)
    gemv_rows = i64(GEMV_ROWS)
    k_tail = K - (nkc - 1) * kc
    name = kernel_name("linear", dtype, *lead, K, N, "bias" if bias else "",
                       f"w{w_dtype}" if w_dtype != dtype else "")

    def row(mo, g, i):
        return T.min(mo * mc + g * mr + i, m - i64(1))

    def kc_len(kb):
        return kc if k_tail == kc else T.min(kc, K - kb * kc)

    def wide(v):
        """A weight element in the compute dtype."""
        return v if w_dtype == dtype else T.Cast(dtype, v)

    def add_bias(v, s_buf, b_buf, col):
        v = v * s_buf[col, 0] if scaled else v
        return v + b_buf[col] if bias else v

    @T.prim_func
    def func(x: T.handle, w: T.handle, s: T.handle, b: T.handle, y: T.handle):
        X = T.match_buffer(x, [*lead_sh, K], dtype)
        W = T.match_buffer(w, (nb, K, nr), w_dtype)
        S = T.match_buffer(s, (N, 1), "float32")
        B = T.match_buffer(b, (N,), dtype)
        Y = T.match_buffer(y, [*lead_sh, N], dtype)
        Xf = T.decl_buffer((m, K), dtype, data=X.data)
        Yf = T.decl_buffer((m, N), dtype, data=Y.data)
        if m <= gemv_rows:
            # Decode (at most GEMV_ROWS rows): a task is a block of GEMV_PANELS panels (the
            # last block, if partial, recomputes the last panel), rows one at a time over the
            # whole of K with the block's panels interleaved, so that every weight panel is one
            # contiguous stream and GEMV_PANELS streams are in flight.
            for task in T.parallel(npb):
                vacc = T.alloc_buffer((pb, nr), "float32")
                for i in range(m):
                    for q in T.unroll(pb):
                        for j in T.vectorized(nr):
                            vacc[q, j] = T.float32(0)
                    for kk in range(K):
                        for q in T.unroll(pb):
                            for j in T.vectorized(nr):
                                vacc[q, j] = vacc[q, j] + Xf[i, kk] * wide(W[
                                    T.min(task * pb + q, nb - 1), kk, j])
                    for q in range(pb):
                        p: T.let = task * pb + q
                        if p < nb:
                            if full_nb == nb:
                                for j in T.vectorized(nr):
                                    Yf[i, p * nr + j] = add_bias(vacc[q, j], S, B, p * nr + j)
                            else:
                                if p < full_nb:
                                    for j in T.vectorized(nr):
                                        Yf[i, p * nr + j] = add_bias(vacc[q, j], S, B, p * nr + j)
                                else:
                                    for j in range(N - full_nb * nr):
                                        Yf[i, p * nr + j] = add_bias(vacc[q, j], S, B, p * nr + j)
        else:
            # Panel index fastest: a thread's consecutive tasks reuse one MC x K block of x (in
            # L2) while streaming different weight panels.
            for task in T.parallel(ceildiv(m, mc) * nb):
                mo: T.let = task // nb
                p: T.let = task % nb
                ctile = T.alloc_buffer((mc, nr), "float32")
                acc = T.alloc_buffer((mr, nr), "float32")
                for kb in range(nkc):
                    for g in range(mg):
                        if mo * mc + g * mr < m:
                            for i in T.unroll(mr):
                                for j in T.vectorized(nr):
                                    acc[i, j] = T.Select(kb == 0, T.float32(0),
                                                         ctile[g * mr + i, j])
                            for kk in range(kc_len(kb)):
                                for i in T.unroll(mr):
                                    for j in T.vectorized(nr):
                                        acc[i, j] = acc[i, j] + Xf[
                                            row(mo, g, i), kb * kc + kk] * wide(W[
                                                p, kb * kc + kk, j])
                            for i in T.unroll(mr):
                                for j in T.vectorized(nr):
                                    ctile[g * mr + i, j] = acc[i, j]
                for g in range(mg):
                    if mo * mc + g * mr < m:
                        for i in T.unroll(mr):
                            if full_nb == nb:
                                for j in T.vectorized(nr):
                                    Yf[row(mo, g, i), p * nr + j] = add_bias(ctile[g * mr + i, j],
                                                                             S, B, p * nr + j)
                            else:
                                # Only the last panel is partial: guard its columns one by one.
                                if p < full_nb:
                                    for j in T.vectorized(nr):
                                        Yf[row(mo, g, i), p * nr + j] = add_bias(
                                            ctile[g * mr + i, j], S, B, p * nr + j)
                                else:
                                    for j in range(N - full_nb * nr):
                                        Yf[row(mo, g, i), p * nr + j] = add_bias(
                                            ctile[g * mr + i, j], S, B, p * nr + j)

    drop = (() if bias else ("B",)) + (() if scaled else ("S",))
    return finish(func, name, drop=drop,
                  arg_transforms={1: lambda w: pack_nk(w, nr)})
