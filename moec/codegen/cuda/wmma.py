"""WMMA (tensor core) tensor intrinsics for the GEMM schedules: 16x16x16 tiles, fp16/bf16
inputs, float32 accumulation, operands staged in dynamic shared memory.

TVM ships such intrinsics in `tvm.s_tir.tensor_intrin.cuda`, but importing that module
registers ~90 intrinsics and takes 15-45 s on our build machines, and it has no bf16 variants.
These are the five this library needs, registered on first use (~1 s). Operands and the
accumulator staging all live in dynamic shared memory."""

from __future__ import annotations

from tvm import tirx
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from moec.errors import CodegenError

M = N = K = 16
_registered: dict[str, dict[str, str]] = {}


def _frag_index(buf: tirx.Buffer, stride: tirx.PrimExpr) -> tirx.PrimExpr:
    """Index of the 16x16 fragment `buf` starts at, in its fragment array (row-major tiles)."""
    return buf.elem_offset // stride // M * (stride // N) + buf.elem_offset % stride // N


def _load(dtype: str, frag: str, layout: str):
    """shared.dyn [16,16] -> wmma fragment; B is stored [n, k] and loaded col-major."""

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (M, K), dtype, align=64, offset_factor=16, scope="shared.dyn")
        C = T.match_buffer(c, (M, K), dtype, align=64, offset_factor=16, scope=frag)
        with T.sblock("root"):
            T.reads(A[0:M, 0:K])
            T.writes(C[0:M, 0:K])
            for i, j in T.grid(M, K):
                with T.sblock("load"):
                    vi, vj = T.axis.remap("SS", [i, j])
                    C[vi, vj] = A[vi, vj]

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, c: T.handle) -> None:
        s1 = T.int32()
        s0 = T.int32()
        d1 = T.int32()
        d0 = T.int32()
        A = T.match_buffer(a, (M, K), dtype, align=64, offset_factor=16, scope="shared.dyn",
                           strides=[s1, s0])
        C = T.match_buffer(c, (M, K), dtype, align=64, offset_factor=16, scope=frag,
                           strides=[d1, d0])
        with T.sblock("root"):
            T.reads(A[0:M, 0:K])
            T.writes(C[0:M, 0:K])
            T.evaluate(T.tvm_load_matrix_sync(C.data, M, N, K, _frag_index(C, d1),
                                              A.access_ptr("r", ptr_type=dtype), s1, layout,
                                              dtype="void"))

    return desc, impl


def _sync(dtype: str):
    """C[i, j] += f32(A[i, k]) * f32(B[j, k]): B holds W rows, i.e. the NT layout."""

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (M, K), dtype, align=64, offset_factor=16, scope="wmma.matrix_a")
        B = T.match_buffer(b, (N, K), dtype, align=64, offset_factor=16, scope="wmma.matrix_b")
        C = T.match_buffer(c, (M, N), "float32", align=64, offset_factor=16,
                           scope="wmma.accumulator")
        with T.sblock("root"):
            T.reads(C[0:M, 0:N], A[0:M, 0:K], B[0:N, 0:K])
            T.writes(C[0:M, 0:N])
            for i, j, k in T.grid(M, N, K):
                with T.sblock(""):
                    vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                    C[vi, vj] = C[vi, vj] + T.Cast("float32", A[vi, vk]) * T.Cast(
                        "float32", B[vj, vk])

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        a1 = T.int32()
        a0 = T.int32()
        b1 = T.int32()
        b0 = T.int32()
        c1 = T.int32()
        c0 = T.int32()
        A = T.match_buffer(a, (M, K), dtype, align=64, offset_factor=16, scope="wmma.matrix_a",
                           strides=[a1, a0])
        B = T.match_buffer(b, (N, K), dtype, align=64, offset_factor=16, scope="wmma.matrix_b",
                           strides=[b1, b0])
        C = T.match_buffer(c, (M, N), "float32", align=64, offset_factor=16,
                           scope="wmma.accumulator", strides=[c1, c0])
        with T.sblock("root"):
            T.reads(C[0:M, 0:N], A[0:M, 0:K], B[0:N, 0:K])
            T.writes(C[0:M, 0:N])
            T.evaluate(T.tvm_mma_sync(C.data, _frag_index(C, c1), A.data, _frag_index(A, a1),
                                      B.data, _frag_index(B, b1), C.data, _frag_index(C, c1),
                                      dtype="void"))

    return desc, impl


def _fill():
    @T.prim_func(s_tir=True)
    def desc(c: T.handle) -> None:
        C = T.match_buffer(c, (M, N), "float32", align=64, offset_factor=16,
                           scope="wmma.accumulator")
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:M, 0:N])
            for i, j in T.grid(M, N):
                with T.sblock("init"):
                    vi, vj = T.axis.remap("SS", [i, j])
                    C[vi, vj] = T.float32(0)

    @T.prim_func(s_tir=True)
    def impl(c: T.handle) -> None:
        d1 = T.int32()
        d0 = T.int32()
        C = T.match_buffer(c, (M, N), "float32", align=64, offset_factor=16,
                           scope="wmma.accumulator", strides=[d1, d0])
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:M, 0:N])
            T.evaluate(T.tvm_fill_fragment(C.data, M, N, K, _frag_index(C, d1), T.float32(0),
                                           dtype="void"))

    return desc, impl


def _store():
    """Accumulator fragment -> float32 [16, 16] in dynamic shared memory.

    The destination pointer is `&C[0, 0]`, not `C.access_ptr`: TVM 0.27 merges all shared.dyn
    buffers into one byte array and then resolves a float32 access_ptr against a float16 alias
    of it for some tile shapes ("tvm_access_ptr element type must match the source buffer").
    Sharing that array is what we want: the accumulator staging reuses the operand tiles."""

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (M, N), "float32", align=64, offset_factor=16,
                           scope="wmma.accumulator")
        C = T.match_buffer(c, (M, N), "float32", align=64, offset_factor=16, scope="shared.dyn")
        with T.sblock("root"):
            T.reads(A[0:M, 0:N])
            T.writes(C[0:M, 0:N])
            for i, j in T.grid(M, N):
                with T.sblock("store"):
                    vi, vj = T.axis.remap("SS", [i, j])
                    C[vi, vj] = A[vi, vj]

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, c: T.handle) -> None:
        s1 = T.int32()
        s0 = T.int32()
        d1 = T.int32()
        d0 = T.int32()
        A = T.match_buffer(a, (M, N), "float32", align=64, offset_factor=16,
                           scope="wmma.accumulator", strides=[d1, d0])
        C = T.match_buffer(c, (M, N), "float32", align=64, offset_factor=16, scope="shared.dyn",
                           strides=[s1, s0])
        with T.sblock("root"):
            T.reads(A[0:M, 0:N])
            T.writes(C[0:M, 0:N])
            T.evaluate(T.tvm_store_matrix_sync(A.data, M, N, K, _frag_index(A, d1),
                                               T.address_of(C[0, 0]), s1, "row_major",
                                               dtype="void"))

    return desc, impl


def wmma_intrinsics(dtype: str) -> dict[str, str]:
    """Names of the registered intrinsics for `dtype` (float16 or bfloat16) inputs:
    load_a, load_b, sync, fill, store."""
    if dtype not in ("float16", "bfloat16"):
        raise CodegenError(f"no WMMA intrinsics for {dtype}")
    if dtype not in _registered:
        names = {
            "load_a": f"moec_wmma_load_a_{dtype}",
            "load_b": f"moec_wmma_load_b_{dtype}",
            "sync": f"moec_wmma_sync_{dtype}",
            "fill": "moec_wmma_fill_f32",
            "store": "moec_wmma_store_f32_shared_dyn",
        }
        TensorIntrin.register(names["load_a"], *_load(dtype, "wmma.matrix_a", "row_major"),
                              override=True)
        TensorIntrin.register(names["load_b"], *_load(dtype, "wmma.matrix_b", "col_major"),
                              override=True)
        TensorIntrin.register(names["sync"], *_sync(dtype), override=True)
        if not _registered:
            TensorIntrin.register(names["fill"], *_fill(), override=True)
            TensorIntrin.register(names["store"], *_store(), override=True)
        _registered[dtype] = names
    return _registered[dtype]
