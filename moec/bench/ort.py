"""ONNX Runtime's `com.microsoft` `MoE` op as a baseline: a small ONNX model built with
onnx.helper around one MoE node, fed the transformers block's own weights.

What the op's CPU kernel (onnxruntime 1.2x) supports decides the graph:
- SwiGLU only with gate/up fused and interleaved (`swiglu_fusion=1`: row 2j is gate j, row 2j+1
  is up j), `activation_type="swiglu"`, `activation_alpha=1`, `activation_beta=0`; no fc3;
- routing: softmax over `router_probs` (the router logits), top-k, renormalised when
  `normalize_routing_weights=1`. That is exactly Mixtral's and Qwen3-MoE's routing.
- DeepSeek-V3's routing (sigmoid scores, a correction bias that steers the choice but not the
  weights, group-limited top-k, a scaling factor) and its shared expert are not in the op. They are
  built from standard ONNX ops around it: the routed weights w are computed in the graph, and the
  op gets `log w` at the chosen experts and -inf elsewhere, so that its softmax gives back
  w / sum(w) (DeepSeek-V3 renormalises) and its top-k picks the chosen experts; the scaling
  factor and the shared expert follow the op.

The big expert weights are graph inputs bound once through IOBinding (zero-copy): the fp32 CPU
kernel does not pre-pack its weights, so initializers would only double the memory.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moec.bench.layer import LayerShape


def available() -> str | None:
    """None if onnx and onnxruntime import, else why not."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        return f"{e.name} is not installed (pip install onnx onnxruntime)"
    return None


def interleave_gate_up(gate_up: np.ndarray) -> np.ndarray:
    """[E, 2I, H] as [gate; up] -> [E, 2I, H] with gate j at row 2j and up j at row 2j+1."""
    inter = gate_up.shape[1] // 2
    out = np.empty_like(gate_up)
    out[:, 0::2] = gate_up[:, :inter]
    out[:, 1::2] = gate_up[:, inter:]
    return out


def _moe_node(h: Any, inputs: list[str], out: str, k: int, normalize: int) -> Any:
    return h.make_node("MoE", inputs, [out], domain="com.microsoft", k=k,
                       activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0,
                       activation_beta=0.0, normalize_routing_weights=normalize)


def build_model(shape: LayerShape, block: Any) -> Any:
    """The ONNX ModelProto: inputs x [T, H], fc1 [E, 2I, H], fc2 [E, H, I]; output y [T, H]."""
    from onnx import TensorProto, helper, numpy_helper

    s = shape
    f32 = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("x", f32, ["T", s.hidden]),
              helper.make_tensor_value_info("fc1", f32, [s.experts, 2 * s.intermediate, s.hidden]),
              helper.make_tensor_value_info("fc2", f32, [s.experts, s.hidden, s.intermediate])]
    output = helper.make_tensor_value_info("y", f32, ["T", s.hidden])

    def init(name: str, a: np.ndarray) -> Any:
        return numpy_helper.from_array(np.ascontiguousarray(a, dtype=a.dtype), name)

    wr = block.gate.weight.detach().numpy()
    inits = [init("wr_t", wr.T)]
    n = helper.make_node
    nodes = [n("MatMul", ["x", "wr_t"], ["logits"])]
    if s.family in ("mixtral", "qwen3_moe"):  # softmax -> top-k -> renormalise: the op's own
        nodes.append(_moe_node(helper, ["x", "logits", "fc1", "", "fc2"], "y", s.top_k, 1))
    elif s.family == "deepseek_v3":
        g, per = s.n_groups, s.experts // s.n_groups
        sh = block.shared_experts
        inits += [
            init("corr", block.gate.e_score_correction_bias.detach().numpy()),
            init("grouped", np.array([-1, g, per], np.int64)),
            init("flat", np.array([-1, s.experts], np.int64)),
            init("k2", np.array([2], np.int64)), init("kg", np.array([s.topk_groups], np.int64)),
            init("k", np.array([s.top_k], np.int64)), init("last", np.array([-1], np.int64)),
            init("neg_inf", np.array(-np.inf, np.float32)),
            init("scale", np.array(s.routed_scale, np.float32)),
            init("sh_gate_t", sh.gate_proj.weight.detach().numpy().T),
            init("sh_up_t", sh.up_proj.weight.detach().numpy().T),
            init("sh_down_t", sh.down_proj.weight.detach().numpy().T),
        ]
        nodes += [
            n("Sigmoid", ["logits"], ["scores"]),
            n("Add", ["scores", "corr"], ["choice"]),
            # group score: the sum of each group's two best choice scores
            n("Reshape", ["choice", "grouped"], ["choice_g"]),
            n("Shape", ["choice_g"], ["grouped_shape"]),
            n("TopK", ["choice_g", "k2"], ["top2", "top2_i"], axis=-1),
            n("ReduceSum", ["top2", "last"], ["group_score"], keepdims=0),
            # keep the topk_group best groups: score >= the topk_group-th best
            n("TopK", ["group_score", "kg"], ["best_groups", "best_groups_i"], axis=-1),
            n("ReduceMin", ["best_groups"], ["kth_group"], axes=[-1], keepdims=1),
            n("GreaterOrEqual", ["group_score", "kth_group"], ["keep_g"]),
            n("Unsqueeze", ["keep_g", "last"], ["keep_g3"]),
            n("Expand", ["keep_g3", "grouped_shape"], ["keep_e3"]),
            n("Reshape", ["keep_e3", "flat"], ["keep_e"]),
            n("Where", ["keep_e", "choice", "neg_inf"], ["masked"]),
            n("TopK", ["masked", "k"], ["_chosen", "ids"], axis=-1),
            # routed weights: the sigmoid scores (not the biased ones) of the chosen experts,
            # handed over as log-weights so the op's softmax renormalises them
            n("GatherElements", ["scores", "ids"], ["w"], axis=1),
            n("Log", ["w"], ["log_w"]),
            n("Shape", ["logits"], ["logits_shape"]),
            n("ConstantOfShape", ["logits_shape"], ["all_neg_inf"],
              value=helper.make_tensor("v", f32, [1], [-np.inf])),
            n("ScatterElements", ["all_neg_inf", "ids", "log_w"], ["probs_in"], axis=1),
            _moe_node(helper, ["x", "probs_in", "fc1", "", "fc2"], "routed", s.top_k, 0),
            n("Mul", ["routed", "scale"], ["routed_scaled"]),
            # the shared expert: down(silu(gate(x)) * up(x))
            n("MatMul", ["x", "sh_gate_t"], ["sg"]),
            n("Sigmoid", ["sg"], ["sg_sig"]),
            n("Mul", ["sg", "sg_sig"], ["sg_act"]),
            n("MatMul", ["x", "sh_up_t"], ["su"]),
            n("Mul", ["sg_act", "su"], ["sh_h"]),
            n("MatMul", ["sh_h", "sh_down_t"], ["shared"]),
            n("Add", ["routed_scaled", "shared"], ["y"]),
        ]
    else:
        raise ValueError(f"no ONNX graph for family {s.family!r}")
    graph = helper.make_graph(nodes, f"moe_{s.name}", inputs, [output], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("com.microsoft", 1)])


class OrtMoE:
    """Callable x [T, H] -> y [T, H] running the ONNX model on the CPU execution provider."""

    def __init__(self, shape: LayerShape, block: Any, threads: int) -> None:
        import onnxruntime as ort

        model = build_model(shape, block)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # idle worker threads sleep, as torch's do under OMP_WAIT_POLICY=PASSIVE
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(model.SerializeToString(), so,
                                            providers=["CPUExecutionProvider"])
        self.version = ort.__version__
        gate_up = block.experts.gate_up_proj.detach().numpy()
        self._fc1 = ort.OrtValue.ortvalue_from_numpy(interleave_gate_up(gate_up))
        self._fc2 = ort.OrtValue.ortvalue_from_numpy(block.experts.down_proj.detach().numpy())
        self._io = self.session.io_binding()
        self._io.bind_ortvalue_input("fc1", self._fc1)
        self._io.bind_ortvalue_input("fc2", self._fc2)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        io = self._io
        io.bind_cpu_input("x", x)
        io.bind_output("y", "cpu")
        self.session.run_with_iobinding(io)
        return io.copy_outputs_to_cpu()[0]
