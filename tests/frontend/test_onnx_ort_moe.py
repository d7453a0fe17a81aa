"""ONNX Runtime's MoE and QMoE forms (the configurations of its CPU, CUDA-parity and quantised
MoE tests), each built with onnx.helper, translated by moec, compiled, and compared with
onnxruntime (CPU provider) on the same file, or with a numpy reference of ORT's definition where
its CPU provider does not run the form. Refused forms must name what they refuse."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnx", reason="onnx not installed")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed")

import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import moec  # noqa: E402
from moec.errors import UnsupportedError  # noqa: E402
from moec.frontend.onnx_frontend import from_onnx  # noqa: E402
from moec.ir import interpret, verify  # noqa: E402

E, K = 4, 2
TOKENS = (0, 1, 5, 33)
TOL = 1e-4
# ORT's test_qmoe_cpu.py: FP32 absolute tolerance per bit width, x1.5 for asymmetric
ORT_QMOE_ATOL = {8: 0.11, 4: 0.11, 2: 0.20}
GPT_OSS = {"activation_alpha": 1.702, "activation_beta": 1.0, "swiglu_limit": 7.0}


def _rel(got: np.ndarray, ref: np.ndarray) -> float:
    if ref.size == 0:
        return 0.0 if got.shape == ref.shape else float("inf")
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))


def _sigmoid(v: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-v))


def ort_moe_reference(x: np.ndarray, logits: np.ndarray, at: dict, w1: np.ndarray,
                      w2: np.ndarray, w3: np.ndarray | None = None, b1: np.ndarray | None = None,
                      b2: np.ndarray | None = None) -> np.ndarray:
    """ONNX Runtime's MoE definition (contrib_defs.cc) in float64: softmax over the logits,
    top-k, optional renormalisation, per expert fc2(act(fc1 x)) weighted and summed."""
    x, logits = x.astype(np.float64), logits.astype(np.float64)
    k, act = at.get("k", 1), at.get("activation_type", "relu")
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ids = np.argsort(-p, -1, kind="stable")[:, :k]
    w = np.take_along_axis(p, ids, -1)
    if at.get("normalize_routing_weights", 0):
        w /= w.sum(-1, keepdims=True)
    y = np.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(k):
            e = ids[t, j]
            h = w1[e] @ x[t] + (0 if b1 is None else b1[e])
            if act == "swiglu":
                g, u = (h, w3[e] @ x[t]) if w3 is not None else (h[0::2], h[1::2])
                lim = at.get("swiglu_limit")
                if lim is not None:
                    g, u = np.minimum(g, lim), np.clip(u, -lim, lim)
                alpha, beta = at.get("activation_alpha", 1.0), at.get("activation_beta", 0.0)
                a = g * _sigmoid(alpha * g) * (u + beta)
            else:
                a = {"silu": lambda v: v * _sigmoid(v), "relu": lambda v: np.maximum(v, 0),
                     "identity": lambda v: v}[act](h)
                if w3 is not None:
                    a = a * (w3[e] @ x[t])
            y[t] += w[t, j] * (w2[e] @ a + (0 if b2 is None else b2[e]))
    return y


def _pack(v: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned `bits`-bit values [..., n] -> uint8 [..., ceil(n*bits/8)], first value in the
    least significant bits (ORT's packing)."""
    per = 8 // bits
    v = np.pad(v.astype(np.uint8), [(0, 0)] * (v.ndim - 1) + [(0, (-v.shape[-1]) % per)])
    v = v.reshape(*v.shape[:-1], -1, per)
    out = np.zeros(v.shape[:-1], np.uint8)
    for j in range(per):
        out |= (v[..., j] << (bits * j)).astype(np.uint8)
    return out


def quantize(w: np.ndarray, bits: int, block: int, asym: bool
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """w [E, N, K] -> (packed q, scales, packed zero points or None, dequantised w) in QMoE's
    format: per row (block 0) or per block of K, symmetric (implicit zero point 2^(bits-1))
    or asymmetric (min/max)."""
    e, n, k = w.shape
    bs = block or k
    g = w.reshape(e, n, k // bs, bs).astype(np.float64)
    top = (1 << bits) - 1
    if asym:
        lo, hi = np.minimum(g.min(-1), 0), np.maximum(g.max(-1), 0)
        s = np.maximum((hi - lo) / top, 1e-8)
        z = np.clip(np.rint(-lo / s), 0, top)
    else:
        s = np.maximum(np.abs(g).max(-1) / ((1 << (bits - 1)) - 1 or 1), 1e-8)
        z = np.full(s.shape, 1 << (bits - 1))
    s = s.astype(np.float32)
    q = np.clip(np.rint(g / s[..., None]) + z[..., None], 0, top)
    deq = ((q - z[..., None]) * s[..., None]).astype(np.float32).reshape(e, n, k)
    q = q.reshape(e, n, k)
    packed = q.astype(np.uint8) if bits == 8 else _pack(q, bits)
    scale = s if block else s[..., 0]
    zp = None
    if asym:
        zp = z.astype(np.uint8) if block else z[..., 0].astype(np.uint8)
        if bits < 8:
            zp = _pack(zp, bits)
    return packed, scale, zp, deq


def _init(name: str, a: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(a), name)


def build(op: str, moe_inputs: list[str], inits: dict[str, np.ndarray], attrs: dict,
          hidden: int, seq: int | None = None, weight_inputs: tuple[str, ...] = ()
          ) -> onnx.ModelProto:
    """x -> router MatMul -> logits -> com.microsoft `op`. seq: x is [B, seq, H] (the router
    runs on x reshaped to [B*seq, H]); weight_inputs: these tensors become graph inputs."""
    router = np.random.default_rng(7).standard_normal((hidden, E)).astype(np.float32)
    xshape = ["T", hidden] if seq is None else ["B", seq, hidden]
    nodes, xin = [], "x"
    if seq is not None:
        nodes.append(helper.make_node("Reshape", ["x", "flat"], ["x2"], name="flatten"))
        xin = "x2"
    nodes += [helper.make_node("MatMul", [xin, "router"], ["logits"], name="router"),
              helper.make_node(op, moe_inputs, ["y"], name="moe", domain="com.microsoft",
                               **attrs)]
    tensors = [_init("router", router), _init("flat", np.array([-1, hidden], np.int64))]
    ins = [helper.make_tensor_value_info("x", TensorProto.FLOAT, xshape)]
    for name, a in inits.items():
        if name in weight_inputs:
            ins.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(a.shape)))
        else:
            tensors.append(_init(name, a))
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, xshape)
    g = helper.make_graph(nodes, "g", ins, [out], tensors)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17),
                                               helper.make_opsetid("com.microsoft", 1)])


def run_all(model: onnx.ModelProto, hidden: int, ref_fn=None, use_ort: bool = True,
            seq: int | None = None, ir: list | None = None) -> dict[int, dict[str, float]]:
    """{tokens: {'interp': rel err, 'compiled': rel err vs the reference, ...}}; the reference
    is onnxruntime on the same model, and `ref_fn(x, logits)` (ORT's definition) if given.
    `ir`: the compiled artifact's final IR text is appended to it."""
    graph = from_onnx(model)
    verify(graph)
    art = moec.compile(graph, max_tokens=256)
    if ir is not None:
        ir.append(art.ir_text)
    compiled = art.load_model()
    sess = ort.InferenceSession(model.SerializeToString(),
                                providers=["CPUExecutionProvider"]) if use_ort else None
    router = numpy_helper.to_array(next(i for i in model.graph.initializer
                                        if i.name == "router"))
    rng = np.random.default_rng()  # fresh inputs every run
    out = {}
    for t in TOKENS:
        shape = (t, hidden) if seq is None else (t, seq, hidden)
        x = rng.standard_normal(shape).astype(np.float32)
        got_c = np.asarray(compiled(x))
        got_i = interpret(graph, [x])[0]
        assert got_c.shape == shape and got_i.shape == shape
        errs = {}
        flat = x.reshape(-1, hidden)
        if ref_fn is not None:
            r = ref_fn(flat, flat @ router).reshape(shape)
            errs.update(interp=_rel(got_i, r), compiled=_rel(got_c, r))
        if sess is not None:  # ORT's CPU MoE / QMoE take 0 tokens too
            r = sess.run(None, {"x": x})[0]
            errs.update(ort_interp=_rel(got_i, r), ort_compiled=_rel(got_c, r),
                        ort_abs=float(np.abs(got_c - r).max()) if t else 0.0)
        out[t] = errs
    return out


def _experts(hidden: int, inter: int, fused: bool, seed: int = 0, scale: float = 1.0
             ) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((E, (2 if fused else 1) * inter, hidden)) * scale / np.sqrt(hidden)
    w2 = rng.standard_normal((E, hidden, inter)) * scale / np.sqrt(inter)
    return w1.astype(np.float32), w2.astype(np.float32)


# --------------------------------------------------------------------------- MoE (float)

H, I = 16, 24
MOE_FORMS = {
    # ORT's CPU test form: swiglu, alpha 1.702, beta 1, no limit
    "swiglu-a1.702-b1-nolimit": {"activation_type": "swiglu", "swiglu_fusion": 1,
                                 "activation_alpha": 1.702, "activation_beta": 1.0},
    "swiglu-a1.3-b0.5-nolimit": {"activation_type": "swiglu", "swiglu_fusion": 1,
                                 "activation_alpha": 1.3, "activation_beta": 0.5},
    # a limit with beta other than 1: clamped_swiglu with offset=beta (beta 0: no +1)
    "swiglu-a1-b0-limit": {"activation_type": "swiglu", "swiglu_fusion": 1,
                           "activation_alpha": 1.0, "activation_beta": 0.0, "swiglu_limit": 0.4},
    "swiglu-a1.3-b0.5-limit": {"activation_type": "swiglu", "swiglu_fusion": 1,
                               "activation_alpha": 1.3, "activation_beta": 0.5,
                               "swiglu_limit": 0.4},
    "identity": {"activation_type": "identity"},
    "silu-with-alpha": {"activation_type": "silu", **GPT_OSS},  # ORT's silu ignores them
}


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("form", list(MOE_FORMS))
def test_moe_forms_match_onnxruntime(form: str, bias: bool) -> None:
    at = {"k": K, "normalize_routing_weights": 1, **MOE_FORMS[form]}
    fused = at["activation_type"] == "swiglu"
    w1, w2 = _experts(H, I, fused)
    rng = np.random.default_rng(1)
    inits = {"fc1": w1, "fc2": w2}
    ins = ["x", "logits", "fc1", "", "fc2", ""]
    if bias:
        inits.update(b1=rng.standard_normal(w1.shape[:2]).astype(np.float32) / 4,
                     b2=rng.standard_normal((E, H)).astype(np.float32) / 4)
        ins = ["x", "logits", "fc1", "b1", "fc2", "b2"]
    model = build("MoE", ins, inits, at, H)

    def ref(x: np.ndarray, logits: np.ndarray) -> np.ndarray:
        return ort_moe_reference(x, logits, at, w1, w2, b1=inits.get("b1"), b2=inits.get("b2"))

    errs = run_all(model, H, ref)
    assert all(v <= TOL for e in errs.values() for n, v in e.items() if n != "ort_abs"), errs


@pytest.mark.parametrize("act", ["silu", "relu"])
def test_moe_separate_fc3(act: str) -> None:
    """Mixtral / Phi layout: act(fc1 x) * (fc3 x). ORT's CPU provider refuses fc3 ('FC3 is not
    implemented for CPU MoE'), so the reference is numpy of ORT's definition."""
    at = {"k": K, "normalize_routing_weights": 0, "activation_type": act}
    w1, w2 = _experts(H, I, False)
    w3 = _experts(H, I, False, seed=3)[0]
    model = build("MoE", ["x", "logits", "fc1", "", "fc2", "", "fc3"],
                  {"fc1": w1, "fc2": w2, "fc3": w3}, at, H)
    errs = run_all(model, H, lambda x, lg: ort_moe_reference(x, lg, at, w1, w2, w3),
                   use_ort=False)
    assert all(v <= TOL for e in errs.values() for v in e.values()), errs


def test_moe_3d_input() -> None:
    """x [B, S, H] (router_probs [B*S, E] from the flattened x): moec flattens, runs the
    experts on B*S tokens and restores [B, S, H]."""
    at = {"k": K, "normalize_routing_weights": 1, "activation_type": "swiglu",
          "swiglu_fusion": 1, **GPT_OSS}
    w1, w2 = _experts(H, I, True)
    model = build("MoE", ["x", "logits", "fc1", "", "fc2"], {"fc1": w1, "fc2": w2}, at, H,
                  seq=3)
    errs = run_all(model, H, lambda x, lg: ort_moe_reference(x, lg, at, w1, w2), seq=3)
    assert all(v <= TOL for e in errs.values() for n, v in e.items() if n != "ort_abs"), errs


def test_moe_weights_as_graph_inputs_refused() -> None:
    w1, w2 = _experts(H, I, False)
    model = build("MoE", ["x", "logits", "fc1", "", "fc2"], {"fc1": w1, "fc2": w2},
                  {"k": K, "activation_type": "relu"}, H, weight_inputs=("fc1",))
    with pytest.raises(UnsupportedError,
                       match="fc1_experts_weights 'fc1' is a graph input.*'moe'"):
        from_onnx(model)


def test_moe_declared_shape_unlike_layout_refused() -> None:
    """ORT's older CUDA test declares fc1 [E, H, I] (and fc2 [E, I, H]) over [E, I, H] data: a
    frontend error naming the node and the tensor, not an IR builder crash."""
    w1, w2 = _experts(H, I, False)
    model = build("MoE", ["x", "logits", "fc1", "", "fc2"],
                  {"fc1": w1.reshape(E, H, I), "fc2": w2.reshape(E, I, H)},
                  {"k": K, "activation_type": "relu"}, H)
    with pytest.raises(UnsupportedError, match=r"fc2_experts_weights 'fc2' is \[4, 24, 16\], "
                                               r"want \[4, 16, I\].*'moe'"):
        from_onnx(model)
    model = build("MoE", ["x", "logits", "fc1", "", "fc2"], {"fc1": w1.reshape(E, H, I),
                                                            "fc2": w2}, {"k": K}, H)
    with pytest.raises(UnsupportedError, match=r"fc1_experts_weights 'fc1' is \[4, 16, 24\], "
                                               r"want \[4, 24, 16\].*'moe'"):
        from_onnx(model)


@pytest.mark.parametrize("attr,value,match", [
    ("num_shared_experts", 1, "attribute num_shared_experts is not implemented"),
    ("swiglu_limit_after_activation", 1, "attribute swiglu_limit_after_activation=1"),
    ("some_future_knob", 2, "attribute some_future_knob is not implemented"),
])
def test_moe_unknown_attributes_refused(attr: str, value: int, match: str) -> None:
    """Attributes moec does not implement are refused by name, never ignored (routing over
    every expert while the model has shared ones would give wrong numbers)."""
    w1, w2 = _experts(H, I, False)
    model = build("MoE", ["x", "logits", "fc1", "", "fc2"], {"fc1": w1, "fc2": w2},
                  {"k": K, "activation_type": "relu", attr: value}, H)
    with pytest.raises(UnsupportedError, match=match + ".*'moe'"):
        from_onnx(model)


# --------------------------------------------------------------------------- QMoE

QH, QI = 64, 64  # divisible by the block sizes, as ORT requires


def qmoe_model(bits: int, block: int, asym: bool, act: str = "swiglu", normalize: int = 1,
               bias: bool = False, **extra: object
               ) -> tuple[onnx.ModelProto, dict, np.ndarray, np.ndarray, dict]:
    """A QMoE in ORT's test configuration (interleaved SwiGLU with alpha 1.702, beta 1,
    limit 7) with quantised experts; also returns the dequantised weights."""
    fused = act == "swiglu"
    w1, w2 = _experts(QH, QI, fused, seed=bits * 100 + block + asym)
    q1, s1, z1, d1 = quantize(w1, bits, block, asym)
    q2, s2, z2, d2 = quantize(w2, bits, block, asym)
    at = {"k": K, "normalize_routing_weights": normalize, "activation_type": act,
          "expert_weight_bits": bits, **extra}
    if fused:
        at.update(swiglu_fusion=1, **GPT_OSS)
    if block:
        at["block_size"] = block
    inits: dict[str, np.ndarray] = {"q1": q1, "s1": s1, "q2": q2, "s2": s2}
    rng = np.random.default_rng(4)
    b = {}
    if bias:
        b = {"b1": rng.standard_normal(w1.shape[:2]).astype(np.float32) / 4,
             "b2": rng.standard_normal((E, QH)).astype(np.float32) / 4}
        inits.update(b)
    if asym:
        inits.update(z1=z1, z2=z2)
    ins = ["x", "logits", "q1", "s1", "b1" if bias else "", "q2", "s2", "b2" if bias else "",
           "", "", "", "z1" if asym else "", "z2" if asym else ""]
    return build("QMoE", ins, inits, at, QH), at, d1, d2, b


@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
@pytest.mark.parametrize("block", [0, 32, 64], ids=["row", "block32", "block64"])
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_qmoe_matches_onnxruntime(bits: int, block: int, asym: bool) -> None:
    """moec dequantises exactly as ORT defines (`(q - zero_point) * scale`): it matches numpy of
    that definition to 1e-4 and ORT within ORT's own test tolerance (ORT's CPU kernels compute
    block-wise 8-bit (int8 activations) and 2-bit experts ~2% apart from the exact product;
    the other forms agree with it to ~1e-6)."""
    model, at, d1, d2, _ = qmoe_model(bits, block, asym)
    ir: list[str] = []
    errs = run_all(model, QH, lambda x, lg: ort_moe_reference(x, lg, at, d1, d2), ir=ir)
    atol = ORT_QMOE_ATOL[bits] * (1.5 if asym else 1.0)
    for e in errs.values():
        assert e["interp"] <= TOL and e["compiled"] <= TOL, errs
        assert e.get("ort_abs", 0.0) <= atol, errs
    # 8-bit symmetric and 4-bit run on moec's quantised kernels with the model's own values
    # (gate+up GEMM and down GEMM); 2-bit and 8-bit with zero points on fp32 experts
    exact = bits == 4 or (bits == 8 and not asym)
    assert ir[0].count("moe.grouped_matmul_q(") == (2 if exact else 0), ir[0]
    assert ir[0].count(f"bits={bits}") == (2 if exact else 0)


@pytest.mark.parametrize("bits,act,bias", [(4, "silu", True), (8, "silu", False),
                                           (4, "relu", True), (2, "identity", False)])
def test_qmoe_other_activations(bits: int, act: str, bias: bool) -> None:
    model, at, d1, d2, b = qmoe_model(bits, 0, False, act, 1, bias)
    errs = run_all(model, QH, lambda x, lg: ort_moe_reference(x, lg, at, d1, d2, **b))
    for e in errs.values():
        assert e["interp"] <= TOL and e["compiled"] <= TOL, errs
        assert e.get("ort_abs", 0.0) <= ORT_QMOE_ATOL[bits], errs


def test_qmoe_unnormalized_routing_follows_the_definition() -> None:
    """normalize_routing_weights=0: moec weights by the softmax over all experts, as the
    schema defines; ORT's CPU QMoE kernel renormalises the top-k weights whatever the
    attribute says (asserted here, so a change on its side shows)."""
    model, at, d1, d2, _ = qmoe_model(4, 0, False, "silu", 0)
    errs = run_all(model, QH, lambda x, lg: ort_moe_reference(x, lg, at, d1, d2),
                   use_ort=False)
    assert all(v <= TOL for e in errs.values() for v in e.values()), errs
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    router = numpy_helper.to_array(next(i for i in model.graph.initializer
                                        if i.name == "router"))
    x = np.random.default_rng().standard_normal((7, QH)).astype(np.float32)
    renorm = {**at, "normalize_routing_weights": 1}
    assert _rel(sess.run(None, {"x": x})[0],
                ort_moe_reference(x, x @ router, renorm, d1, d2)) <= TOL


def test_qmoe_forms_refused_by_name() -> None:
    model, *_ = qmoe_model(4, 0, False)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.node[-1].attribute.append(helper.make_attribute("quant_type", "fp4"))
    with pytest.raises(UnsupportedError, match="attribute quant_type=fp4.*'moe'"):
        from_onnx(m)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    moe = m.graph.node[-1]
    moe.input.extend(["", "logits"])  # router_weights (input 14)
    with pytest.raises(UnsupportedError, match="router_weights 'logits' is not implemented"):
        from_onnx(m)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for a in m.graph.node[-1].attribute:
        if a.name == "expert_weight_bits":
            a.i = 3
    with pytest.raises(UnsupportedError, match="attribute expert_weight_bits=3"):
        from_onnx(m)


def test_moe_fp16() -> None:
    """fp16 activations and experts (ORT's CUDA-parity tests' dtype, on its CPU provider),
    at ORT's fp16 tolerance (test_moe_cuda.py: 5e-2 absolute)."""
    rng = np.random.default_rng(5)
    w1, w2 = (w.astype(np.float16) for w in _experts(H, I, True))
    router = rng.standard_normal((H, E)).astype(np.float16)
    nodes = [helper.make_node("MatMul", ["x", "router"], ["logits"], name="router"),
             helper.make_node("MoE", ["x", "logits", "fc1", "", "fc2"], ["y"], name="moe",
                              domain="com.microsoft", k=K, activation_type="swiglu",
                              swiglu_fusion=1, normalize_routing_weights=1, **GPT_OSS)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT16, ["T", H])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT16, ["T", H])],
        [_init("router", router), _init("fc1", w1), _init("fc2", w2)])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17),
                                                helper.make_opsetid("com.microsoft", 1)])
    graph = from_onnx(model)
    compiled = moec.compile(graph, max_tokens=64).load_model()
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for t in TOKENS:
        x = np.random.default_rng().standard_normal((t, H)).astype(np.float16)
        ref = sess.run(None, {"x": x})[0].astype(np.float32)
        for got in (interpret(graph, [x])[0], np.asarray(compiled(x))):
            assert got.shape == (t, H) and got.dtype == np.float16
            assert t == 0 or np.abs(got.astype(np.float32) - ref).max() <= 5e-2


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_qmoe_fp16(bits: int) -> None:
    """fp16 activations, router and scales (ORT's FP16 QMoE tests), at ORT's fp16 tolerances
    (test_qmoe_cpu.py: 0.02 / 0.05 / 0.12 absolute for 8 / 4 / 2 bits)."""
    model, *_ = qmoe_model(bits, 0, False)
    for i in model.graph.initializer:
        if i.name in ("s1", "s2", "router"):
            i.CopyFrom(_init(i.name, numpy_helper.to_array(i).astype(np.float16)))
    for v in (*model.graph.input, *model.graph.output):
        v.type.tensor_type.elem_type = TensorProto.FLOAT16
    graph = from_onnx(model)
    compiled = moec.compile(graph, max_tokens=64).load_model()
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    atol = {8: 0.02, 4: 0.05, 2: 0.12}[bits]
    for t in TOKENS:
        x = np.random.default_rng().standard_normal((t, QH)).astype(np.float16)
        ref = sess.run(None, {"x": x})[0].astype(np.float32)
        for got in (interpret(graph, [x])[0], np.asarray(compiled(x))):
            assert got.shape == (t, QH) and got.dtype == np.float16
            assert t == 0 or np.abs(got.astype(np.float32) - ref).max() <= atol
