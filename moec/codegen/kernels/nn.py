"""Kernels for whole transformer models (moec/ir/nn_ops.py): embedding gather, positions, cos/sin,
data movement (permute / slice / broadcast as one strided copy, concat) and fused causal
attention with grouped-query heads.

Copies are parallel over output rows and vectorised over the last axis when it is contiguous in
the input. Attention is one task per (batch, head, query row): an online softmax over the keys
`s <= t` (running max and sum, the accumulator rescaled when the max grows), the q.k dot product
and the v accumulation vectorised over the head dim. All float math is float32.
"""

from __future__ import annotations

from collections.abc import Sequence

from tvm import tirx
from tvm.script import tirx as T

from moec.codegen.kernels.base import (
    Dims,
    Kernel,
    Shape,
    check_dtype,
    finish,
    i64,
    kernel_name,
    par_min,
    prod,
    static,
    vector_lanes,
)
from moec.codegen.kernels.elementwise import _pointwise
from moec.errors import CodegenError

COPY_DTYPES = ("float32", "float16", "bfloat16", "int32", "int64")


def unary_trig(op: str, shape: Shape, dtype: str = "float32") -> Kernel:
    """`y = cos(x)` or `sin(x)` (float32 math, libm accuracy). Kernel args: `(x, y)`."""
    fn = {"cos": tirx.cos, "sin": tirx.sin}.get(op)
    if fn is None:
        raise CodegenError(f"unary_trig: op must be cos or sin, got {op!r}")
    check_dtype(op, dtype)
    return _pointwise(kernel_name(op, dtype, *shape), list(shape), dtype, [(list(shape), dtype)],
                      lambda v: fn(v[0]), False)


def broadcast_to(in_shape: Shape, out_shape: Shape, dtype: str = "float32") -> Kernel:
    """Size-1 dims of x repeated to `out_shape`. Kernel args: `(x, y)`."""
    check_dtype("broadcast_to", dtype, COPY_DTYPES)
    return _pointwise(kernel_name("broadcast", dtype, *in_shape, "to", *out_shape),
                      list(out_shape), dtype, [(list(in_shape), dtype)], lambda v: v[0], False)


def _strided_copy(name: str, in_shape: Shape, out_shape: Shape, dtype: str,
                  stride_fn, offset_fn) -> Kernel:
    """y[i0, .., in] = x_flat[offset + sum_k i_k * stride_k]: rows of y in parallel, the last
    axis vectorised when its input stride is 1. `stride_fn(in_dims)` gives the per-axis input
    strides, `offset_fn(in_dims)` the start."""
    check_dtype(name, dtype, COPY_DTYPES)
    dims = Dims()
    sh_in, sh_out = dims.shape(in_shape), dims.shape(out_shape)
    n_in, n_out = prod(sh_in), prod(sh_out)
    strides, offset = stride_fn(sh_in), i64(offset_fn(sh_in))
    inner = sh_out[-1]
    rows = prod(sh_out[:-1])
    vl = vector_lanes(dtype)
    contiguous = static(strides[-1]) == 1
    inner_s = static(inner)
    vec = contiguous and inner_s is not None
    nv, tail_n = (inner_s // vl, inner_s % vl) if vec else (0, 0)
    last = strides[-1]

    def base(r: tirx.Expr) -> tirx.Expr:
        off, rem = offset, r
        for ax in range(len(sh_out) - 2, -1, -1):
            idx = rem if ax == 0 else rem % sh_out[ax]
            rem = rem // sh_out[ax]
            off = off + idx * strides[ax]
        return off

    if vec:
        @T.prim_func
        def func(x: T.handle, y: T.handle):
            X = T.match_buffer(x, sh_in, dtype)
            Y = T.match_buffer(y, sh_out, dtype)
            Xf = T.decl_buffer((n_in,), dtype, data=X.data)
            Yf = T.decl_buffer((n_out,), dtype, data=Y.data)
            for r in T.parallel(rows):
                for v in range(nv):
                    for lane in T.vectorized(vl):
                        Yf[r * inner + v * vl + lane] = Xf[base(r) + v * vl + lane]
                for t in range(tail_n):
                    Yf[r * inner + nv * vl + t] = Xf[base(r) + nv * vl + t]
    else:
        @T.prim_func
        def func(x: T.handle, y: T.handle):
            X = T.match_buffer(x, sh_in, dtype)
            Y = T.match_buffer(y, sh_out, dtype)
            Xf = T.decl_buffer((n_in,), dtype, data=X.data)
            Yf = T.decl_buffer((n_out,), dtype, data=Y.data)
            for r in T.parallel(rows):
                for j in range(inner):
                    Yf[r * inner + j] = Xf[base(r) + j * last]

    return finish(func, name, min_parallel=par_min(inner_s or 1))


def _contiguous_strides(sh: Sequence[tirx.Expr]) -> list[tirx.Expr]:
    return [prod(list(sh[i + 1:])) for i in range(len(sh))]


def permute_dims(in_shape: Shape, perm: Sequence[int], dtype: str = "float32") -> Kernel:
    """`y = x.transpose(perm)`, materialised. Kernel args: `(x, y)`."""
    perm = [int(p) for p in perm]
    if sorted(perm) != list(range(len(in_shape))):
        raise CodegenError(f"permute_dims: {perm} is not a permutation of {len(in_shape)} axes")
    out_shape = [in_shape[p] for p in perm]
    name = kernel_name("permute", dtype, *in_shape, "p", *perm)
    return _strided_copy(name, in_shape, out_shape, dtype,
                         lambda sh: [_contiguous_strides(sh)[p] for p in perm], lambda sh: 0)


def slice_axis(in_shape: Shape, out_shape: Shape, axis: int, start: int, step: int,
               dtype: str = "float32") -> Kernel:
    """`y = x[start::step]` along `axis` (the length is `out_shape[axis]`). Args: `(x, y)`."""
    ax = axis % len(in_shape)
    name = kernel_name("slice", dtype, *in_shape, "ax", ax, start, step, "n", out_shape[ax])

    def strides(sh):
        st = _contiguous_strides(sh)
        st[ax] = st[ax] * i64(step) if step != 1 else st[ax]
        return st

    return _strided_copy(name, in_shape, out_shape, dtype, strides,
                         lambda sh: _contiguous_strides(sh)[ax] * i64(start))


def concat2(shape_a: Shape, shape_b: Shape, axis: int, dtype: str = "float32") -> Kernel:
    """`y = concat([a, b], axis)`. Kernel args: `(a, b, y)`. Rows (the dims before `axis`) in
    parallel; each row copies a's then b's contiguous run."""
    check_dtype("concat", dtype, COPY_DTYPES)
    ax = axis % len(shape_a)
    dims = Dims()
    sa, sb = dims.shape(shape_a), dims.shape(shape_b)
    sy = list(sa)
    sy[ax] = sa[ax] + sb[ax]
    rows = prod(sa[:ax])
    ra, rb = prod(sa[ax:]), prod(sb[ax:])
    na, nb, ny = prod(sa), prod(sb), prod(sy)
    name = kernel_name("concat", dtype, *shape_a, "and", *shape_b, "ax", ax)

    @T.prim_func
    def func(a: T.handle, b: T.handle, y: T.handle):
        A = T.match_buffer(a, sa, dtype)
        B = T.match_buffer(b, sb, dtype)
        Y = T.match_buffer(y, sy, dtype)
        Af = T.decl_buffer((na,), dtype, data=A.data)
        Bf = T.decl_buffer((nb,), dtype, data=B.data)
        Yf = T.decl_buffer((ny,), dtype, data=Y.data)
        for r in T.parallel(rows):
            for j in range(ra):
                Yf[r * (ra + rb) + j] = Af[r * ra + j]
            for j in range(rb):
                Yf[r * (ra + rb) + ra + j] = Bf[r * rb + j]

    return finish(func, name, min_parallel=par_min((static(ra) or 1) + (static(rb) or 1)))


def embedding(V: int | str, H: int, ids_shape: Shape, dtype: str = "float32",
              id_dtype: str = "int64") -> Kernel:
    """`y[..., :] = w[ids[...], :]`. Kernel args: `(w [V, H], ids, y [..., H])`. Ids outside
    [0, V) are clamped (never an out-of-bounds read). V may be symbolic (rows of an activation,
    e.g. the hidden states of the rows whose logits a generation step returns)."""
    check_dtype("embedding", dtype, COPY_DTYPES)
    check_dtype("embedding ids", id_dtype, ("int32", "int64"))
    dims = Dims()
    vd = dims.dim(V)
    si = dims.shape(ids_shape)
    n = prod(si)
    sy = [*si, i64(H)]
    vl = vector_lanes(dtype)
    nv, tail_n = H // vl, H % vl
    name = kernel_name("embedding", dtype, id_dtype, V, H, *ids_shape)

    @T.prim_func
    def func(w: T.handle, ids: T.handle, y: T.handle):
        W = T.match_buffer(w, (vd, H), dtype)
        IDS = T.match_buffer(ids, si, id_dtype)
        Y = T.match_buffer(y, sy, dtype)
        Wf = T.decl_buffer((vd * H,), dtype, data=W.data)
        IDf = T.decl_buffer((n,), id_dtype, data=IDS.data)
        Yf = T.decl_buffer((n * H,), dtype, data=Y.data)
        for r in T.parallel(n):
            base: T.let = T.max(T.min(T.Cast("int64", IDf[r]), vd - i64(1)), T.int64(0)) * H
            for v in range(nv):
                for lane in T.vectorized(vl):
                    Yf[r * H + v * vl + lane] = Wf[base + v * vl + lane]
            for t in range(tail_n):
                Yf[r * H + nv * vl + t] = Wf[base + nv * vl + t]

    return finish(func, name, min_parallel=par_min(H))


def arange(like_shape: Shape, axis: int, dtype: str = "int64",
           like_dtype: str = "int64") -> Kernel:
    """`y = [0, 1, ..., n-1]`, n = dim `axis` of the operand. Kernel args: `(like, y)`."""
    check_dtype("arange", dtype, ("int32", "int64"))
    dims = Dims()
    sl = dims.shape(like_shape)
    n = sl[axis % len(sl)]
    name = kernel_name("arange", dtype, like_dtype, *like_shape, "ax", axis)

    @T.prim_func
    def func(like: T.handle, y: T.handle):
        _L = T.match_buffer(like, sl, like_dtype)
        Y = T.match_buffer(y, (n,), dtype)
        for i in range(n):
            Y[i] = T.Cast(dtype, i)

    return finish(func, name)


def attention(B: int, Hq: int, Hkv: int, D: int, Dv: int, scale: float,
              dtype: str = "float32") -> Kernel:
    """Causal attention with grouped-query heads. Kernel args:
    `(q [B, Hq, T, D], k [B, Hkv, T, D], v [B, Hkv, T, Dv], out [B, T, Hq, Dv])`."""
    check_dtype("attention", dtype)
    if Hq % Hkv:
        raise CodegenError(f"attention: {Hq} query heads are not a multiple of {Hkv}")
    rep = Hq // Hkv
    dims = Dims()
    t = dims.var("T")
    vl = vector_lanes(dtype)
    nd, td = D // vl, D % vl
    nv, tv = Dv // vl, Dv % vl
    sc = float(scale)
    name = kernel_name("attention", dtype, B, Hq, Hkv, D, Dv, f"{sc:.6g}")

    @T.prim_func
    def func(q: T.handle, k: T.handle, v: T.handle, o: T.handle):
        Q = T.match_buffer(q, (B, Hq, t, D), dtype)
        K = T.match_buffer(k, (B, Hkv, t, D), dtype)
        V = T.match_buffer(v, (B, Hkv, t, Dv), dtype)
        O = T.match_buffer(o, (B, t, Hq, Dv), dtype)
        Qf = T.decl_buffer((B * Hq * t * D,), dtype, data=Q.data)
        Kf = T.decl_buffer((B * Hkv * t * D,), dtype, data=K.data)
        Vf = T.decl_buffer((B * Hkv * t * Dv,), dtype, data=V.data)
        Of = T.decl_buffer((B * t * Hq * Dv,), dtype, data=O.data)
        for task in T.parallel(B * Hq * t):
            acc = T.alloc_buffer((Dv,), "float32")
            dot = T.alloc_buffer((vl,), "float32")
            st = T.alloc_buffer((5,), "float32")  # max, sum, score, corr, p
            bh: T.let = task // t
            row: T.let = task % t
            qb: T.let = task * D
            kvh: T.let = bh // Hq * Hkv + bh % Hq // rep
            ob: T.let = ((bh // Hq * t + row) * Hq + bh % Hq) * Dv
            for j in range(Dv):
                acc[j] = T.float32(0)
            st[0] = T.float32(-3.0e38)
            st[1] = T.float32(0)
            for s in range(row + 1):
                kb: T.let = (kvh * t + s) * D
                vb: T.let = (kvh * t + s) * Dv
                for lane in T.vectorized(vl):
                    dot[lane] = T.float32(0)
                for c in range(nd):
                    for lane in T.vectorized(vl):
                        dot[lane] = dot[lane] + Qf[qb + c * vl + lane] * Kf[kb + c * vl + lane]
                for c in range(td):
                    dot[0] = dot[0] + Qf[qb + nd * vl + c] * Kf[kb + nd * vl + c]
                st[2] = T.float32(0)
                for lane in range(vl):
                    st[2] = st[2] + dot[lane]
                st[2] = st[2] * T.float32(sc)
                st[3] = T.exp(st[0] - T.max(st[0], st[2]))
                st[0] = T.max(st[0], st[2])
                st[4] = T.exp(st[2] - st[0])
                st[1] = st[1] * st[3] + st[4]
                for c in range(nv):
                    for lane in T.vectorized(vl):
                        acc[c * vl + lane] = acc[c * vl + lane] * st[3] + \
                            st[4] * Vf[vb + c * vl + lane]
                for c in range(tv):
                    acc[nv * vl + c] = acc[nv * vl + c] * st[3] + st[4] * Vf[vb + nv * vl + c]
            st[1] = T.float32(1) / st[1]
            for c in range(nv):
                for lane in T.vectorized(vl):
                    Of[ob + c * vl + lane] = acc[c * vl + lane] * st[1]
            for c in range(tv):
                Of[ob + nv * vl + c] = acc[nv * vl + c] * st[1]

    return finish(func, name)


def rope(x_shape: Shape, c_shape: Shape, dtype: str = "float32") -> Kernel:
    """Rotary embedding, rotate-half form (core.rope): `y = x * cos + rot(x) * sin`.
    Kernel args: `(x, cos, sin, y)`; cos/sin have x's rank, dims equal to x's or 1, and a last
    dim of D or D/2. Rows of x in parallel, each half of a row vectorised."""
    check_dtype("rope", dtype)
    dims = Dims()
    xs, cs = dims.shape(x_shape), dims.shape(c_shape)
    d = static(xs[-1])
    dc = static(cs[-1])
    if d is None or d % 2 or dc not in (d, d // 2):
        raise CodegenError(f"rope: want an even static last dim and tables of D or D/2, got "
                           f"{list(x_shape)} and {list(c_shape)}")
    h = d // 2
    h2 = h if dc == d else 0  # where the second half's table starts
    lead = xs[:-1]
    rows = prod(lead)
    bcast = [static(c) == 1 and static(x) != 1 for c, x in zip(cs[:-1], lead, strict=True)]
    nc = prod(cs)
    name = kernel_name("rope", dtype, *x_shape, "by", *c_shape)

    def table_row(r):
        """The row of cos/sin that row r of x reads (broadcast dims step 0)."""
        off, rem, stride = i64(0), r, i64(1)
        for i in range(len(lead) - 1, -1, -1):
            idx = rem % lead[i] if i else rem
            rem = rem // lead[i]
            if not bcast[i]:
                off = off + idx * stride
                stride = stride * cs[i]
        return off

    @T.prim_func
    def func(x: T.handle, c: T.handle, s: T.handle, y: T.handle):
        X = T.match_buffer(x, xs, dtype)
        C = T.match_buffer(c, cs, dtype)
        S = T.match_buffer(s, cs, dtype)
        Y = T.match_buffer(y, xs, dtype)
        Xf = T.decl_buffer((rows * d,), dtype, data=X.data)
        Cf = T.decl_buffer((nc,), dtype, data=C.data)
        Sf = T.decl_buffer((nc,), dtype, data=S.data)
        Yf = T.decl_buffer((rows * d,), dtype, data=Y.data)
        for r in T.parallel(rows):
            xo: T.let = r * d
            co: T.let = table_row(r) * dc
            for j in T.vectorized(h):
                Yf[xo + j] = Xf[xo + j] * Cf[co + j] - Xf[xo + h + j] * Sf[co + j]
            for j in T.vectorized(h):
                Yf[xo + h + j] = Xf[xo + h + j] * Cf[co + h2 + j] + Xf[xo + j] * Sf[co + h2 + j]

    return finish(func, name, min_parallel=par_min(d))


def linear_heads(lead: Shape, H: int, N: int, K: int, dtype: str = "float32",
                 w_dtype: str | None = None) -> Kernel:
    """`y[..., h, :] = w[h] @ x[..., h, :]` (core.linear_heads). Kernel args: `(x [*lead, H, K],
    w_packed [H, NP, K, C], y [*lead, H, N])`; `arg_transforms[1]` packs w [H, N, K] into
    panels of C = 4 SIMD vectors of columns (zero-padded). A task is (row, head, panel): C
    accumulators in registers over K, the panel one contiguous stream (memory-bound at
    decode)."""
    from moec.codegen.kernels.base import check_weight_dtype
    from moec.codegen.kernels.linear import pack_nk

    check_dtype("linear_heads", dtype)
    w_dtype = check_weight_dtype("linear_heads", dtype, w_dtype)
    c = 4 * vector_lanes(dtype)
    npan = -(-N // c)
    full = N // c  # panels with all C columns inside N
    dims = Dims()
    ls = dims.shape(lead)
    rows = prod(ls)
    name = kernel_name("linear_heads", dtype, *lead, H, N, K,
                       f"w{w_dtype}" if w_dtype != dtype else "")

    def wide(v):
        return v if w_dtype == dtype else T.Cast(dtype, v)

    @T.prim_func
    def func(x: T.handle, w: T.handle, y: T.handle):
        X = T.match_buffer(x, [*ls, H, K], dtype)
        W = T.match_buffer(w, (H, npan, K, c), w_dtype)
        Y = T.match_buffer(y, [*ls, H, N], dtype)
        Xf = T.decl_buffer((rows * H * K,), dtype, data=X.data)
        Yf = T.decl_buffer((rows * H * N,), dtype, data=Y.data)
        for task in T.parallel(rows * H * npan):
            p: T.let = task % npan
            rh: T.let = task // npan
            h: T.let = rh % H
            acc = T.alloc_buffer((c,), "float32")
            for n in T.vectorized(c):
                acc[n] = T.float32(0)
            for k in range(K):
                for n in T.vectorized(c):
                    acc[n] = acc[n] + Xf[rh * K + k] * wide(W[h, p, k, n])
            if p < full:
                for n in T.vectorized(c):
                    Yf[rh * N + p * c + n] = acc[n]
            else:
                for n in range(N - full * c):
                    Yf[rh * N + p * c + n] = acc[n]

    return finish(func, name, arg_transforms={1: lambda w: pack_nk(w, c)},
                  min_parallel=par_min(K * c))
