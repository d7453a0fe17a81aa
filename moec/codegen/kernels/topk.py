"""Top-k along the last axis, and the insertion step it shares with the router.

Each row keeps a sorted list of k (value, index) pairs in registers; an element is inserted by
one pass that swaps it down the list. The order is lexicographic: larger value first, then lower
index first, which gives `core.topk`'s tie rule without a stable sort. NaN counts as larger than
every number (as in torch.topk); returned values are read back from x, so a NaN is returned as is.
"""

from __future__ import annotations

from tvm.script import tirx as T

from moec.codegen.kernels.base import (
    Dims,
    Kernel,
    Shape,
    check_dtype,
    finish,
    kernel_name,
    par_min,
    prod,
    static,
)
from moec.errors import CodegenError

INT32_MAX = 2**31 - 1


@T.macro(hygienic=True)
def topk_init(vals, ids, k):
    """Empty list: (-inf, INT32_MAX) loses every comparison with a real element, -inf included."""
    for j in range(k):
        vals[j] = T.float32(float("-inf"))
        ids[j] = INT32_MAX


@T.macro(hygienic=True)
def topk_insert(vals, ids, tmp, itmp, key, index, k):
    """Insert (key, index) into the sorted list (vals, ids) of length k; the last entry drops out.
    `tmp`/`itmp` are 2-element local scratch buffers (carried pair, swap temporary)."""
    if key > vals[k - 1] or (key == vals[k - 1] and index < ids[k - 1]):
        tmp[0] = key
        itmp[0] = index
        for j in range(k):
            # Once the carried pair moved into slot j, the displaced pair precedes every later
            # slot, so it keeps swapping down: a plain insertion.
            if tmp[0] > vals[j] or (tmp[0] == vals[j] and itmp[0] < ids[j]):
                tmp[1] = vals[j]
                itmp[1] = ids[j]
                vals[j] = tmp[0]
                ids[j] = itmp[0]
                tmp[0] = tmp[1]
                itmp[0] = itmp[1]


def nan_high(v):
    """The selection key of v: NaN becomes +inf (torch.topk ranks NaN above all numbers)."""
    return T.Select(T.isnan(v), T.float32(float("inf")), v)


def topk(shape: Shape, k: int, dtype: str = "float32") -> Kernel:
    """Top-k of the last axis: values `[..., k]` in descending order and int32 indices
    (ties: lower index first). Kernel args: `(x, values, indices)`. Parallel over rows."""
    check_dtype("topk", dtype)
    if not shape:
        raise CodegenError("topk: needs at least one axis")
    n_static = shape[-1]
    if not isinstance(k, int) or k < 1 or (isinstance(n_static, int) and k > n_static):
        raise CodegenError(f"topk: k={k} must be in [1, {n_static}]")
    dims = Dims()
    sh = dims.shape(shape)
    osh = [*sh[:-1], k]
    rows, n = prod(sh[:-1]), sh[-1]
    numel = prod(sh)
    name = kernel_name("topk", dtype, "k", k, *shape)

    @T.prim_func
    def func(x: T.handle, values: T.handle, indices: T.handle):
        X = T.match_buffer(x, sh, dtype)
        V = T.match_buffer(values, osh, dtype)
        ID = T.match_buffer(indices, osh, "int32")
        Xf = T.decl_buffer((numel,), dtype, data=X.data)
        Vf = T.decl_buffer((rows * k,), dtype, data=V.data)
        IDf = T.decl_buffer((rows * k,), "int32", data=ID.data)
        for r in T.parallel(rows):
            vals = T.alloc_buffer((k,), "float32")
            ids = T.alloc_buffer((k,), "int32")
            tmp = T.alloc_buffer((2,), "float32")
            itmp = T.alloc_buffer((2,), "int32")
            topk_init(vals, ids, k)
            for i in range(n):
                topk_insert(vals, ids, tmp, itmp, nan_high(Xf[r * n + i]), T.Cast("int32", i), k)
            for j in range(k):
                IDf[r * k + j] = ids[j]
                Vf[r * k + j] = Xf[r * n + T.Cast("int64", ids[j])]

    return finish(func, name, min_parallel=par_min(static(n) or 1))
