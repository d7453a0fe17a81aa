"""ONNX frontend: small ONNX models built with onnx.helper, run by onnxruntime, by moec's
interpreter and compiled; the com.microsoft MoE contrib op; the all-at-once unsupported-op error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx", reason="onnxruntime not installed")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed")

import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import moec  # noqa: E402
from moec.errors import UnsupportedError  # noqa: E402
from moec.frontend.onnx_frontend import from_onnx  # noqa: E402
from moec.ir import interpret, verify  # noqa: E402

H, I, E = 16, 24, 4
TOKENS = (1, 5, 64)
TOL = 1e-4


def _rel(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))


def _init(name: str, a: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(a), name)


def _model(nodes: list, inits: list, path: Path, hidden: int = H) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", hidden])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", hidden])
    g = helper.make_graph(nodes, "g", [x], [y], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17),
                                            helper.make_opsetid("com.microsoft", 1)])
    onnx.save(m, str(path))
    return path


def dense_model(path: Path) -> Path:
    rng = np.random.default_rng(0)
    inits = [_init("w1", rng.standard_normal((H, I)).astype(np.float32) / 4),
             _init("b1", rng.standard_normal(I).astype(np.float32)),
             _init("w2", rng.standard_normal((I, H)).astype(np.float32) / 4)]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="fc1_bias"),
             helper.make_node("Relu", ["hb"], ["a"], name="act"),
             helper.make_node("MatMul", ["a", "w2"], ["y"], name="fc2")]
    return _model(nodes, inits, path)


def moe_model(path: Path, act: str, k: int, normalize: int, bias: bool = False,
              fusion: int = 1, **extra: float | int) -> Path:
    """Router MatMul -> com.microsoft MoE; swiglu: fc1 holds gate and up interleaved
    (swiglu_fusion=1), as halves (2), or fc1 = gate and fc3 = up (0)."""
    rng = np.random.default_rng(1)
    gated = act == "swiglu"
    f = 2 if gated and fusion else 1
    fc1 = rng.standard_normal((E, f * I, H)).astype(np.float32) / 4
    fc2 = rng.standard_normal((E, H, I)).astype(np.float32) / 4
    inits = [_init("router", rng.standard_normal((H, E)).astype(np.float32)),
             _init("fc1", fc1), _init("fc2", fc2)]
    b1 = b2 = ""
    if bias:
        inits += [_init("fc1_b", rng.standard_normal(fc1.shape[:2]).astype(np.float32)),
                  _init("fc2_b", rng.standard_normal((E, H)).astype(np.float32))]
        b1, b2 = "fc1_b", "fc2_b"
    moe_in = ["x", "logits", "fc1", b1, "fc2", b2]
    if gated and not fusion:
        inits.append(_init("fc3", rng.standard_normal((E, I, H)).astype(np.float32) / 4))
        moe_in.append("fc3")
        if bias:
            inits.append(_init("fc3_b", rng.standard_normal((E, I)).astype(np.float32)))
            moe_in.append("fc3_b")
    attrs = {"k": k, "activation_type": act, "normalize_routing_weights": normalize, **extra}
    if gated:
        attrs["swiglu_fusion"] = fusion
    nodes = [helper.make_node("MatMul", ["x", "router"], ["logits"], name="router"),
             helper.make_node("MoE", moe_in, ["y"], name="moe", domain="com.microsoft",
                              **attrs)]
    return _model(nodes, inits, path)


def _compare(path: Path, compiled: bool = True) -> dict[int, tuple[float, float]]:
    """{T: (interpreter rel err, compiled rel err)} against onnxruntime on the same file."""
    graph = from_onnx(path)
    verify(graph)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model = moec.compile(graph).load_model() if compiled else None
    rng = np.random.default_rng(2)
    errs = {}
    for t in TOKENS:
        x = rng.standard_normal((t, H)).astype(np.float32)
        ref = sess.run(None, {"x": x})[0]
        e_int = _rel(interpret(graph, [x])[0], ref)
        e_cmp = _rel(np.asarray(model(x)), ref) if model is not None else 0.0
        errs[t] = (e_int, e_cmp)
    return errs


def test_dense_block_cli(tmp_path: Path) -> None:
    """`moec compile model.onnx -o m.moec`, then the artifact against onnxruntime."""
    from moec.cli import main

    path = dense_model(tmp_path / "dense.onnx")
    assert main(["compile", str(path), "-o", str(tmp_path / "m.moec")]) == 0
    errs = _compare(path, compiled=False)
    model = moec.load(str(tmp_path / "m.moec"))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for t in TOKENS:
        x = np.random.default_rng(t).standard_normal((t, H)).astype(np.float32)
        errs[t] = (errs[t][0], _rel(np.asarray(model(x)), sess.run(None, {"x": x})[0]))
    assert all(max(e) <= TOL for e in errs.values()), errs


GPT_OSS = {"activation_alpha": 1.702, "activation_beta": 1.0, "swiglu_limit": 0.5}
MOE_CASES = [("swiglu", 2, 1, False, {}), ("swiglu", 1, 0, False, {}), ("silu", 2, 0, False, {}),
             ("relu", 1, 1, False, {}), ("relu", 2, 1, True, {}), ("gelu", 2, 1, False, {}),
             ("swiglu", 2, 1, True, GPT_OSS)]


@pytest.mark.parametrize("act,k,normalize,bias,extra", MOE_CASES,
                         ids=["swiglu-k2-norm", "swiglu-k1", "silu-k2", "relu-k1-norm",
                              "relu-k2-norm-bias", "gelu-k2-norm", "clamped-swiglu-k2-bias"])
def test_moe_contrib_op(tmp_path: Path, act: str, k: int, normalize: int, bias: bool,
                        extra: dict) -> None:
    path = moe_model(tmp_path / "moe.onnx", act, k, normalize, bias, **extra)
    errs = _compare(path)
    assert all(max(e) <= TOL for e in errs.values()), errs


@pytest.mark.parametrize("fusion", [0, 2])
def test_moe_swiglu_layouts(tmp_path: Path, fusion: int) -> None:
    """swiglu_fusion=0 (fc1 gate, fc3 up) and 2 ([gate | up]): onnxruntime's CPU provider
    rejects both, so the same experts are written interleaved (fusion=1) and run there."""
    path = moe_model(tmp_path / "moe.onnx", "swiglu", 2, 1, True, fusion=fusion)
    m = onnx.load(str(path))
    w = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    if fusion == 0:
        g, u, bg, bu = w["fc1"], w["fc3"], w["fc1_b"], w["fc3_b"]
    else:
        g, u, bg, bu = w["fc1"][:, :I], w["fc1"][:, I:], w["fc1_b"][:, :I], w["fc1_b"][:, I:]
    fc1 = np.stack([g, u], axis=2).reshape(E, 2 * I, H)
    b1 = np.stack([bg, bu], axis=2).reshape(E, 2 * I)
    inits = [i for i in m.graph.initializer if i.name not in ("fc1", "fc1_b", "fc3", "fc3_b")]
    moe = m.graph.node[1]
    nodes = [m.graph.node[0], helper.make_node(
        "MoE", ["x", "logits", "fc1", "fc1_b", "fc2", "fc2_b"], ["y"], name="moe",
        domain="com.microsoft", k=2, activation_type="swiglu", normalize_routing_weights=1,
        swiglu_fusion=1)]
    assert moe.op_type == "MoE"
    ref = _model(nodes, inits + [_init("fc1", fc1), _init("fc1_b", b1)], tmp_path / "ref.onnx")
    sess = ort.InferenceSession(str(ref), providers=["CPUExecutionProvider"])
    graph = from_onnx(path)
    x = np.random.default_rng(3).standard_normal((5, H)).astype(np.float32)
    assert _rel(interpret(graph, [x])[0], sess.run(None, {"x": x})[0]) <= TOL


def test_moe_ir_form(tmp_path: Path) -> None:
    """The MoE op becomes the unfused form (router linear, softmax, topk, renorm, experts)
    with fc1's interleaved rows split into w_gate / w_up [E, I, H]."""
    graph = from_onnx(moe_model(tmp_path / "moe.onnx", "swiglu", 2, 1))
    ops = [n.op for n in graph.nodes]
    assert ops == ["core.linear", "core.softmax", "core.topk", "core.sum", "core.div",
                   "moe.experts"]
    ex = graph.nodes[-1]
    assert ex.attrs["activation"] == "silu" and ex.attrs["gated"]
    assert [tuple(v.shape) for v in ex.operands[3:]] == [(E, I, H), (E, I, H), (E, H, I)]


def test_unsupported_ops_listed_at_once(tmp_path: Path) -> None:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="proj"),
             helper.make_node("Erf", ["a"], ["b"], name="erf_0"),
             helper.make_node("HardSwish", ["b"], ["c"], name="hs"),
             helper.make_node("Erf", ["c"], ["d"], name="erf_1"),
             helper.make_node("FusedMatMul", ["d", "w"], ["y"], name="fmm",
                              domain="com.microsoft")]
    path = _model(nodes, [_init("w", np.eye(H, dtype=np.float32))], tmp_path / "bad.onnx")
    with pytest.raises(UnsupportedError) as exc:
        from_onnx(path)
    msg = str(exc.value)
    for part in ("Erf", "'erf_0', 'erf_1'", "HardSwish", "'hs'", "com.microsoft::FusedMatMul",
                 "'fmm'"):
        assert part in msg, msg
    assert "  MatMul:" not in msg  # supported ops are not listed as missing


def test_unsupported_moe_form_named(tmp_path: Path) -> None:
    path = moe_model(tmp_path / "moe.onnx", "swiglu", 2, 0)
    m = onnx.load(str(path))
    m.graph.node[1].attribute.extend([helper.make_attribute("swiglu_limit_after_activation", 1)])
    with pytest.raises(UnsupportedError, match="swiglu_limit_after_activation=1.*'moe'"):
        from_onnx(m)


def test_swiglu_limit_with_beta_is_the_clamped_form_with_that_offset(tmp_path: Path) -> None:
    """A limit with activation_beta other than 1: clamped_swiglu with offset=beta (it was
    refused before the offset attribute)."""
    path = moe_model(tmp_path / "moe.onnx", "swiglu", 2, 0)
    m = onnx.load(str(path))
    m.graph.node[1].attribute.extend([helper.make_attribute("activation_beta", 0.5),
                                      helper.make_attribute("swiglu_limit", 7.0)])
    (experts,) = from_onnx(m).find("moe.experts")
    assert experts.attrs["activation"] == "clamped_swiglu" and experts.attrs["offset"] == 0.5


@pytest.mark.parametrize("norm", [True, False])
def test_torch_onnx_export_of_stacked_block(tmp_path: Path, norm: bool) -> None:
    """torch.onnx (dynamo) exports moec's reference StackedMoEBlock as a dense combine: zeros
    [T, E], ScatterElements of the top-k weights into it, a Slice and a SwiGLU per expert, an
    Add chain. moec recognises it as one moe.experts (onnx_dense_moe.py), compiles it, and
    matches onnxruntime on the same file (uniform and skewed routing)."""
    pytest.importorskip("onnxscript", reason="onnxscript (torch.onnx's dynamo exporter) missing")
    import torch

    from moec.models.reference import StackedMoEBlock, skew_router

    for routing in ("uniform", "skewed"):
        torch.manual_seed(0)
        block = StackedMoEBlock(H, I, E, 2, norm_topk_prob=norm).eval()
        if routing == "skewed":
            skew_router(block, expert=1)
        path = tmp_path / f"stacked_{routing}.onnx"
        prog = torch.onnx.export(block, (torch.randn(5, H),), dynamo=True, verbose=False,
                                 dynamic_shapes=({0: torch.export.Dim("T", max=4096)},))
        prog.save(str(path))
        graph = from_onnx(path)
        ops = [n.op for n in graph.nodes]
        assert ops.count("moe.experts") == 1 and not {"core.slice", "core.concat"} & set(ops)
        model = moec.compile(str(path), max_tokens=256).load_model()
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        for t in (0, *TOKENS):
            x = np.random.default_rng(t).standard_normal((t, H)).astype(np.float32)
            got = np.asarray(model(x))
            if t == 0:
                assert got.shape == (0, H)
                continue
            ref = sess.run(None, {name: x})[0]
            assert _rel(got, ref) <= TOL, (routing, t, _rel(got, ref))
            assert _rel(interpret(graph, [x])[0], ref) <= TOL


def test_scatter_outside_the_moe_form_is_named(tmp_path: Path) -> None:
    """A ScatterElements that is not a dense MoE combine stays unsupported, named with its node."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", 4])
    idx = numpy_helper.from_array(np.zeros((1, 4), np.int64), "idx")
    upd = numpy_helper.from_array(np.ones((1, 4), np.float32), "upd")
    node = helper.make_node("ScatterElements", ["x", "idx", "upd"], ["y"], name="sc", axis=0)
    model = helper.make_model(helper.make_graph([node], "g", [x], [y], [idx, upd]),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "sc.onnx")
    with pytest.raises(UnsupportedError, match="ScatterElements: node 'sc'"):
        from_onnx(tmp_path / "sc.onnx")
