"""ONNX Runtime's `com.microsoft` MoE / QMoE forms for the ONNX frontend: which attributes and
inputs moec reads (anything else is refused by name), the expert tensors' layout check, and
QMoE's integer weights: dequantised exactly as ORT defines them (`(q - zero_point) * scale`),
and, where moec's quantised kernels read the same values (8-bit symmetric, 4-bit), their exact
form in moec's formats (moec/ir/quant_ops.py) for `Graph.quant_forms`.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class Skip(Exception):
    """A node's form (not its op type) that moec cannot translate; collected like op types."""


def _attrs(node: Any) -> dict[str, Any]:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


MOE_INPUTS = ("input", "router_probs", "fc1_experts_weights", "fc1_experts_bias",
               "fc2_experts_weights", "fc2_experts_bias", "fc3_experts_weights", "fc3_experts_bias")
QMOE_INPUTS = ("input", "router_probs", "fc1_experts_weights", "fc1_scales", "fc1_experts_bias",
                "fc2_experts_weights", "fc2_scales", "fc2_experts_bias", "fc3_experts_weights",
                "fc3_scales", "fc3_experts_bias", "fc1_zero_points", "fc2_zero_points",
                "fc3_zero_points", "router_weights", "fc1_global_scale", "fc2_global_scale",
                "fc1_act_scale", "fc2_act_scale", "fc1_act_block_scale", "fc2_act_block_scale")
# attribute -> the values moec implements (None: any value); anything else is refused by name
MOE_ATTRS: dict[str, tuple | None] = {
    "k": None, "activation_type": None, "normalize_routing_weights": None,
    "swiglu_fusion": None, "activation_alpha": None, "activation_beta": None,
    "swiglu_limit": None, "use_sparse_mixer": None, "swiglu_limit_after_activation": (0,)}
QMOE_ATTRS: dict[str, tuple | None] = {
    **MOE_ATTRS, "expert_weight_bits": (2, 4, 8), "fc1_expert_weight_bits": (2, 4, 8),
    "fc2_expert_weight_bits": (2, 4, 8), "fc3_expert_weight_bits": (2, 4, 8),
    "block_size": None, "quant_type": (b"int", "int"), "weights_prepacked": (-1, 0),
    # ORT's accuracy knob (int8 activations at level 4): moec computes the exact dequantised
    # product at every level
    "accuracy_level": None}


def moe_form_problems(n: Any, consts: set[str], graph_inputs: set[str]) -> list[str]:
    """What moec cannot translate about a MoE / QMoE node's form, found before translating:
    attributes it does not implement (never ignored), inputs it does not read, expert weights
    that are not constants."""
    q = n.op_type == "QMoE"
    known, names = (QMOE_ATTRS, QMOE_INPUTS) if q else (MOE_ATTRS, MOE_INPUTS)
    out = []
    for name, value in _attrs(n).items():
        if name not in known:
            out.append(f"attribute {name} is not implemented ({n.op_type} attributes moec "
                       f"reads: {', '.join(known)})")
        elif known[name] is not None and value not in known[name]:
            shown = value.decode() if isinstance(value, bytes) else value
            out.append(f"attribute {name}={shown} (moec implements "
                       f"{', '.join(str(v) for v in known[name] if not isinstance(v, bytes))})")
    for i, name in enumerate(n.input):
        if not name:
            continue
        if i >= len(names) or (q and i >= 14):
            what = names[i] if i < len(names) else f"input {i}"
            out.append(f"{what} '{name}' is not implemented")
        elif i >= 2 and name in graph_inputs and name not in consts:
            out.append(f"{names[i]} '{name}' is a graph input: moec compiles expert weights as "
                       "constants; make it an initializer")
    return out


def check_layout(n: Any, fc1: np.ndarray, fc2: np.ndarray, fc3: np.ndarray | None,
                  b1: np.ndarray | None, b2: np.ndarray | None, b3: np.ndarray | None,
                  H: Any, E: Any, fused: bool) -> None:
    """The expert tensors' shapes against ORT's layout: fc1 [E, f*I, H], fc2 [E, H, I], fc3
    [E, I, H], biases [E, rows]. A declared shape that is not that layout (ORT's older CUDA
    tests declare fc1 [E, H, I] over [E, I, H] data) is refused here, naming the node."""
    names = QMOE_INPUTS if n.op_type == "QMoE" else MOE_INPUTS
    f = 2 if fused else 1
    inter = None  # I, from whichever of fc2 / fc1 has H where the layout wants it
    if fc2.ndim == 3 and fc2.shape[1] == H:
        inter = fc2.shape[2]
    elif fc1.ndim == 3 and fc1.shape[2] == H and fc1.shape[1] % f == 0:
        inter = fc1.shape[1] // f
    want = {"fc2_experts_weights": (fc2, (E, H, inter)),
            "fc1_experts_weights": (fc1, (E, None if inter is None else f * inter, H))}
    if fc3 is not None:
        if fused:
            raise Skip("fc3_experts_weights with fused swiglu (swiglu_fusion=1|2)")
        want["fc3_experts_weights"] = (fc3, (E, inter, H))
    for name, b, rows in (("fc1_experts_bias", b1, want["fc1_experts_weights"][1][1]),
                          ("fc2_experts_bias", b2, H), ("fc3_experts_bias", b3, inter)):
        if b is not None:
            want[name] = (b, (E, rows))
    for name, (a, shape) in want.items():
        if a.shape != shape:
            arg = f"'{n.input[names.index(name)]}' " if n.input[names.index(name)] else ""
            deq = " (dequantised)" if n.op_type == "QMoE" and "weights" in name else ""
            raise Skip(f"{name} {arg}is {list(a.shape)}{deq}, want "
                        f"[{', '.join('I' if d is None else str(d) for d in shape)}] for input "
                        f"hidden size "
                        f"{H}, {E} experts, fc2 [E, H, I]: ORT's layout is fc1 [E, f*I, H], "
                        "fc2 [E, H, I], fc3 [E, I, H]; fix a declared shape that differs from "
                        "the data layout in the model")


def unpack(a: np.ndarray, bits: int, count: int) -> np.ndarray:
    """uint8 [..., B] holding 8/bits values per byte, least significant first -> [..., count]."""
    a = np.asarray(a, np.uint8)
    per = 8 // bits
    vals = np.stack([(a >> (bits * j)) & ((1 << bits) - 1) for j in range(per)], axis=-1)
    return vals.reshape(*a.shape[:-1], -1)[..., :count]


def dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, bits: int,
                block: int, fc: str) -> np.ndarray:
    """One QMoE expert weight as float32 [E, N, K], as ONNX Runtime defines it:
    `(q - zero_point) * scale`, q unsigned `bits`-bit values packed least significant first
    along K, scale [E, N] (per row) or [E, N, K/block_size], zero points packed the same way
    along N (per row) or along the blocks, default 2^(bits-1) (symmetric)."""
    if bits not in (2, 4, 8):
        raise Skip(f"{fc}: {bits}-bit weights (moec reads 2, 4 and 8)")
    if q.dtype != np.uint8 or q.ndim != 3:
        raise Skip(f"{fc}_experts_weights must be uint8 [E, N, K*bits/8], got {q.dtype} "
                    f"{list(q.shape)}")
    e, n, kb = q.shape
    k = kb * 8 // bits
    vals = unpack(q, bits, k).astype(np.float32)
    scale = np.asarray(scale, np.float32)
    if block:
        if k % block:
            raise Skip(f"{fc}: K={k} is not a multiple of block_size={block}")
        g, want = k // block, (e, n, k // block)
    else:
        g, want = 1, (e, n)
    if scale.shape != want:
        raise Skip(f"{fc}_scales is {list(scale.shape)}, want {list(want)}")
    scale = scale.reshape(e, n, g)
    if zero is None:
        z = np.full((e, n, g), 1 << (bits - 1), np.float32)
    elif block:
        zb = -(-g * bits // 8)
        if zero.shape != (e, n, zb):
            raise Skip(f"{fc}_zero_points is {list(zero.shape)}, want {[e, n, zb]}")
        z = unpack(zero, bits, g).astype(np.float32)
    else:
        zb = -(-n * bits // 8)
        if zero.shape != (e, zb):
            raise Skip(f"{fc}_zero_points is {list(zero.shape)}, want {[e, zb]}")
        z = unpack(zero, bits, n).astype(np.float32)[..., None]
    per = k // g
    return ((vals - np.repeat(z, per, axis=-1)) * np.repeat(scale, per, axis=-1)).astype(
        np.float32)


def exact_form(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, bits: int,
               block: int) -> tuple[int, int, tuple[np.ndarray, ...]] | None:
    """A QMoE weight (validated by `dequantize`) in moec's own quantised format with the very
    same values, or None where moec's kernels have no such format (2-bit, 8-bit with zero
    points): (bits, group_size, parts). 8-bit symmetric: `q - 128` as i8 and the scales;
    4-bit: the packing is the same (even k in the low nibble), zero points as f32."""
    e, n, kb = q.shape
    k = kb * 8 // bits
    g = k // block if block else 1
    s = np.ascontiguousarray(np.asarray(scale, np.float32).reshape(e, n, g))
    if bits == 8 and zero is None:
        q8 = (q.astype(np.int16) - 128).astype(np.int8)
        return 8, block or k + k % 2, (q8, s)
    if bits == 4:
        if zero is None:
            z = np.full((e, n, g), 8, np.float32)
        elif block:
            z = unpack(zero, 4, g).astype(np.float32)
        else:
            z = unpack(zero, 4, n).astype(np.float32)[..., None]
        return 4, block or k, (np.ascontiguousarray(q), s, np.ascontiguousarray(z))
    return None
