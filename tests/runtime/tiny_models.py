"""Tiny Relax modules built here (not by moec's codegen) so the runtime is tested on its own.

`scale` model: main(x: f32[T, 64], s: f32[T], w: f32[64], w2: f32[64, 32])
    -> (y = x * w * s[:, None]  via a vectorised TE kernel,  z = y @ w2)
`ids` model:   main(ids: i32[T]) -> (ids * 2, ids)   (no weights)
"""

from __future__ import annotations

from typing import Any

import numpy as np

H, N, MAX_T = 64, 32, 64


def _mcpu() -> str:
    import tvm

    return tvm.target.codegen.llvm_get_system_cpu()


def _target() -> Any:
    import tvm

    return tvm.target.Target({"kind": "llvm", "mcpu": _mcpu()})


def build_scale_model(offset: float = 0.0, seed: int = 0
                      ) -> tuple[Any, dict[str, np.ndarray], dict[str, Any]]:
    """(executable, weights, signature) of the `scale` model; `offset` is added to y inside the
    kernel (other code, same signature), `seed` draws the weights."""
    import tvm
    from tvm import relax, te

    t = te.var("T", "int64")
    x = te.placeholder((t, H), "float32", name="x")
    s = te.placeholder((t,), "float32", name="s")
    w = te.placeholder((H,), "float32", name="w")
    y = te.compute((t, H), lambda i, j: x[i, j] * w[j] * s[i] + offset, name="y")
    sch = tvm.s_tir.Schedule(te.create_prim_func([x, s, w, y]))
    _, j = sch.get_loops(sch.get_sblock("y"))
    sch.vectorize(sch.split(j, [None, 16])[1])  # vector loads: the alignment-sensitive case
    kernel = sch.mod["main"].with_attr("global_symbol", "scale")

    bb = relax.BlockBuilder()
    tv = tvm.tirx.Var("T", "int64")
    rx = relax.Var("x", relax.TensorType((tv, H), "float32"))
    rs = relax.Var("s", relax.TensorType((tv,), "float32"))
    rw = relax.Var("w", relax.TensorType((H,), "float32"))
    rw2 = relax.Var("w2", relax.TensorType((H, N), "float32"))
    with bb.function("main", [rx, rs, rw, rw2]):
        gv = bb.add_func(kernel, "scale")
        with bb.dataflow():
            ry = bb.emit(relax.call_tir(gv, [rx, rs, rw], relax.TensorType((tv, H), "float32")))
            rz = bb.emit(relax.op.matmul(ry, rw2))
            out = bb.emit_output(relax.Tuple([ry, rz]))
        bb.emit_func_output(out)
    ex = tvm.compile(bb.get(), target=_target())
    rng = np.random.default_rng(seed)
    weights = {
        "w": rng.standard_normal(H).astype("float32"),
        "w2": rng.standard_normal((H, N)).astype("float32"),
    }
    signature = {
        "inputs": [
            {"name": "x", "shape": ["T", H], "dtype": "float32"},
            {"name": "s", "shape": ["T"], "dtype": "float32"},
        ],
        "outputs": [
            {"name": "y", "shape": ["T", H], "dtype": "float32"},
            {"name": "z", "shape": ["T", N], "dtype": "float32"},
        ],
        "dims": {"T": {"min": 0, "max": MAX_T}},
    }
    return ex, weights, signature


def build_ids_model() -> tuple[Any, dict[str, np.ndarray], dict[str, Any]]:
    """(executable, weights, signature) of the `ids` model: an int input, no weights."""
    import tvm
    from tvm import relax

    bb = relax.BlockBuilder()
    tv = tvm.tirx.Var("T", "int64")
    ids = relax.Var("ids", relax.TensorType((tv,), "int32"))
    with bb.function("main", [ids]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.multiply(ids, relax.const(2, "int32")))
        # Returning the input itself checks that outputs never alias inputs.
        bb.emit_func_output(relax.Tuple([out, ids]))
    signature = {
        "inputs": [{"name": "ids", "shape": ["T"], "dtype": "int32"}],
        "outputs": [
            {"name": "out", "shape": ["T"], "dtype": "int32"},
            {"name": "same", "shape": ["T"], "dtype": "int32"},
        ],
        "dims": {"T": {"min": 1, "max": 1024}},
    }
    return tvm.compile(bb.get(), target=_target()), {}, signature


def build_chain_model(width: int = 256, layers: int = 4
                      ) -> tuple[Any, dict[str, np.ndarray], dict[str, Any]]:
    """(executable, weights, signature) of `chain`: y = x @ w0 @ w1 ..., `layers` float32
    [width, width] weights (4 x 256 KiB by default): enough weight memory for a load/unload
    cycle to show in the process's RSS."""
    import tvm
    from tvm import relax

    bb = relax.BlockBuilder()
    tv = tvm.tirx.Var("T", "int64")
    x = relax.Var("x", relax.TensorType((tv, width), "float32"))
    ws = [relax.Var(f"w{i}", relax.TensorType((width, width), "float32")) for i in range(layers)]
    with bb.function("main", [x, *ws]):
        with bb.dataflow():
            y = x
            for w in ws:
                y = bb.emit(relax.op.matmul(y, w))
            out = bb.emit_output(relax.Tuple([y]))
        bb.emit_func_output(out)
    rng = np.random.default_rng(0)
    weights = {f"w{i}": (rng.standard_normal((width, width)) / np.sqrt(width)).astype("float32")
               for i in range(layers)}
    signature = {
        "inputs": [{"name": "x", "shape": ["T", width], "dtype": "float32"}],
        "outputs": [{"name": "y", "shape": ["T", width], "dtype": "float32"}],
        "dims": {"T": {"min": 0, "max": MAX_T}},
    }
    return tvm.compile(bb.get(), target=_target()), weights, signature


def reference(x: np.ndarray, s: np.ndarray, w: dict[str, np.ndarray], offset: float = 0.0
              ) -> tuple[Any, Any]:
    y = x.astype("float32") * w["w"] * s.astype("float32")[:, None] + np.float32(offset)
    return y, y @ w["w2"]


_IR_DTYPE = {"float32": "f32", "int32": "i32"}


def ir_header(weights: dict[str, np.ndarray], signature: dict[str, Any]) -> str:
    """The `dim`, `input` and `param` lines of an IR text for a tiny model (what load checks
    against the signature and the stored weights)."""
    lines = [f"dim {n}: {d['min']}..{d['max']}" for n, d in signature["dims"].items()]
    lines += [f"input %{s['name']}: {_IR_DTYPE[s['dtype']]}[{', '.join(map(str, s['shape']))}]"
              for s in signature["inputs"]]
    lines += [f"param @{n}: {_IR_DTYPE[a.dtype.name]}[{', '.join(map(str, a.shape))}]"
              for n, a in weights.items()]
    return "\n".join(lines) + "\n"


def make_artifact(builder: Any = build_scale_model, **overrides: Any) -> Any:
    from moec.runtime import Artifact

    ex, weights, signature = builder()
    kwargs: dict[str, Any] = {
        "signature": signature,
        "target": {"kind": "llvm", "mcpu": _mcpu()},
        "ir_text": ir_header(weights, signature) + "%y: f32[T, 64] = test.scale(%x, %s, @w)\n"
                   "%z: f32[T, 32] = core.matmul(%y, @w2)",
        "pipeline": ["canonicalize", "plan-memory"],
        "meta": {"model": "runtime-test"},
    }
    kwargs.update(overrides)
    return Artifact(ex, weights, **kwargs)
