"""torch module -> moec IR, through `torch.export` with a dynamic token dimension.

    from moec.frontend.torch_frontend import from_torch
    graph = from_torch(model, (x,), max_tokens=4096)

Dim 0 of every floating-point input is the token count `T` (dynamic, 0..max_tokens); other inputs
keep their static shapes. The steps:

1. **Recognise MoE blocks** (moec.frontend.moe_recognize): every submodule that owns experts and
   a router is turned into a `MoESpec` (router, routing attributes, stacked expert weights and
   biases, activation, shared experts, output bias), found by structure and checked by running
   the block on random inputs.
2. **Swap** each recognised block for a `MoECall` module calling the custom ops
   `torch.ops.moec.moe_router` and `torch.ops.moec.moe_experts` (moec.frontend.moe_op) plus the
   block's own shared-expert modules, export with a dynamic token `Dim`, and put the original
   blocks back; the data-dependent routing and expert loops never reach the tracer.
3. **Translate** the exported ATen graph to core ops and each MoE call to the unfused moe form
   (moec.frontend.aten_translate): `core.linear -> core.softmax -> core.topk [-> core.sum,
   core.div] -> moe.experts` and its variants. Parameters keep their module paths
   (`layers.0.mlp.gate.weight`; stacked experts `layers.0.mlp.experts.w_gate`) and every node's
   `loc` is its module path.

Anything that cannot be translated raises `moec.errors.UnsupportedError` naming the op, the
module path and the source line.

Adding a recogniser for your own MoE block class
------------------------------------------------
The built-in recogniser covers the Hugging Face MoE families and anything with the same parts
(docs/frontend.md). For anything else, register a function that returns a `MoESpec` for your block
(or None for other modules); it runs before the built-in one, and its spec is checked against the
block's output on random inputs:

    from moec.frontend import MoESpec, register_moe_recognizer

    @register_moe_recognizer
    def my_block(module, path):
        if not isinstance(module, MyMoE):
            return None
        return MoESpec(router_weight=module.router.weight, router_name="router",
                       w_gate=module.w1, w_up=module.w3,    # [E, I, H] each
                       w_down=module.w2,                    # [E, H, I]
                       k=module.k, scoring="softmax", order="score_topk", norm_topk=True)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from moec.errors import UnsupportedError
from moec.frontend import moe_op  # noqa: F401  (registers torch.ops.moec.moe_router, ...)
from moec.frontend.aten_translate import translate_exported
from moec.frontend.moe_recognize import (
    HOW_TO_REGISTER,
    MoESpec,
    recognize_moe,
    register_moe_recognizer,
    unregister_moe_recognizer,
)
from moec.ir import Graph

__all__ = ["MoECall", "MoESpec", "find_moe_blocks", "from_torch", "register_moe_recognizer",
           "unregister_moe_recognizer"]


class MoECall(nn.Module):
    """Stands in for a recognised MoE block during export: one `moec::moe_router` and one
    `moec::moe_experts` call, plus the block's own shared-expert modules and output bias.

    Holds the router parameters under the block's own router path (`gate.weight`, and the
    selection bias under its own path), the stacked expert weights as `experts.w_gate`,
    `experts.w_up`, `experts.w_down` (biases `experts.b_gate`, ...), and the shared experts under
    their names, so the exported parameter names read `<block path>.gate.weight`,
    `<block path>.experts.w_up`, `<block path>.shared_expert.up_proj.weight`, ..."""

    def __init__(self, spec: MoESpec, block: nn.Module) -> None:
        super().__init__()
        self.spec = spec
        if spec.router_is_param:  # the weight itself sits at router_name
            self._router_w = spec.router_name
            self._router_b: str | None = None
        else:
            self._router_w = f"{spec.router_name}.weight"
            self._router_b = f"{spec.router_name}.bias" if spec.router_bias is not None else None
        _put(self, self._router_w, spec.router_weight)
        if self._router_b:
            _put(self, self._router_b, spec.router_bias)
        if spec.select_bias is not None:
            _put(self, spec.select_bias_name, spec.select_bias)
        self.experts = nn.Module()
        for name in ("w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down"):
            t = getattr(spec, name)
            self.experts.register_parameter(name, None if t is None else _as_param(t))
        for name in (*spec.shared_experts, *([spec.shared_gate] if spec.shared_gate else [])):
            self.add_module(name, block.get_submodule(name))
        if spec.out_bias_name:
            self.register_parameter(spec.out_bias_name,
                                    _as_param(block.get_parameter(spec.out_bias_name)))

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        s, ex = self.spec, self.experts
        if s.capacity and x.dim() > 2 and x.shape[0] != 1:
            raise UnsupportedError(
                f"a block with expert capacity {s.capacity} counts tokens per sequence; moec "
                f"compiles it for one sequence at a time, but the input has batch {x.shape[0]}")
        weight = self.get_parameter(self._router_w)
        bias = self.get_parameter(self._router_b) if self._router_b else None
        sel = self.get_parameter(s.select_bias_name) if s.select_bias is not None else None
        h = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        w, ids = torch.ops.moec.moe_router(
            h, weight, bias, sel, s.k, s.scoring, s.order, s.norm_topk, float(s.scale),
            s.n_groups, s.topk_groups, s.group_score, s.capacity, float(s.jitter_eps))
        y = torch.ops.moec.moe_experts(h, w, ids, ex.w_gate, ex.w_up, ex.w_down, ex.b_gate,
                                       ex.b_up, ex.b_down, s.activation, float(s.alpha),
                                       float(s.limit), s.weight_on)
        if s.shared_experts:
            shared = self.get_submodule(s.shared_experts[0])(h)
            for name in s.shared_experts[1:]:
                shared = shared + self.get_submodule(name)(h)
            if s.shared_gate:
                shared = torch.sigmoid(self.get_submodule(s.shared_gate)(h)) * shared
            y = y + shared
        if s.out_bias_name:
            y = y + self.get_parameter(s.out_bias_name)
        if x.dim() != 2:
            y = y.reshape(x.shape)
        if s.aux_output == "logits":
            return y, nn.functional.linear(h, weight, bias)
        if s.aux_output == "weights":
            return y, w.to(x.dtype)
        return y


def _put(root: nn.Module, path: str, t: torch.Tensor) -> None:
    """Register `t` as a parameter at the dotted `path` below `root`, creating plain modules."""
    *parts, leaf = path.split(".")
    owner = root
    for part in parts:
        if not hasattr(owner, part):
            owner.add_module(part, nn.Module())
        owner = getattr(owner, part)
    owner.register_parameter(leaf, _as_param(t))


def _as_param(t: torch.Tensor) -> nn.Parameter:
    return t if isinstance(t, nn.Parameter) else nn.Parameter(t.detach(), requires_grad=False)


def find_moe_blocks(module: nn.Module, notes: dict[str, str] | None = None
                    ) -> list[tuple[str, MoESpec]]:
    """(path, spec) of every MoE block in `module`, outermost first; blocks inside a recognised
    block are not searched. The root itself can be one (path ""). Modules that have experts and
    a router but cannot be called as module(x) are skipped, with the reason in `notes`."""
    found: list[tuple[str, MoESpec]] = []

    def visit(m: nn.Module, path: str) -> None:
        spec = recognize_moe(m, path, notes)
        if spec is not None:
            found.append((path, spec))
            return
        for name, child in m.named_children():
            visit(child, f"{path}.{name}" if path else name)

    visit(module, "")
    return found


def _export_inputs(example_inputs: Sequence[object], max_tokens: int
                   ) -> tuple[tuple[object, ...], tuple]:
    """Example inputs with at least 2 tokens (export specialises sizes 0 and 1) and the
    dynamic_shapes spec: dim 0 of every floating-point tensor is T."""
    T = torch.export.Dim("T", min=0, max=max_tokens)
    args, shapes = [], []
    for a in example_inputs:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            if a.dim() == 0:
                raise UnsupportedError("a floating-point input is 0-d: dim 0 of every "
                                       "floating-point input must be the token dimension")
            if a.shape[0] < 2:
                gen = torch.Generator().manual_seed(0)
                a = torch.randn((2, *a.shape[1:]), generator=gen).to(a.dtype)
            a = a[:max_tokens]
            shapes.append({0: T})
        else:
            shapes.append(None)
        args.append(a)
    return tuple(args), tuple(shapes)


def _swap(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path)
    old = getattr(parent, name)
    setattr(parent, name, new)
    return old


def from_torch(module: nn.Module, example_inputs: Sequence[object] | torch.Tensor, *,
               max_tokens: int = 4096) -> Graph:
    """Translate `module` into a moec IR graph with a dynamic token dim `T` in 0..max_tokens.

    `example_inputs` are positional arguments of `module.forward` (a single tensor is allowed).
    MoE blocks become moe.experts ops with their routing in core ops; the rest becomes core ops.
    The module is changed only during the call and restored afterwards. Raises UnsupportedError
    (naming op, module path and source line) for anything that has no moec translation."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if max_tokens < 1:
        raise UnsupportedError(f"max_tokens must be at least 1, got {max_tokens}")
    notes: dict[str, str] = {}
    blocks = find_moe_blocks(module, notes)
    # export needs a range with room for its 2-token example; the IR gets the real bound
    args, shapes = _export_inputs(example_inputs, max(max_tokens, 2))
    swapped: list[tuple[str, nn.Module]] = []
    target = module
    try:
        for path, spec in blocks:
            block = module.get_submodule(path) if path else module
            if path == "":
                target = MoECall(spec, block)
            else:
                swapped.append((path, _swap(module, path, MoECall(spec, block))))
        try:
            with torch.no_grad():
                ep = torch.export.export(target, args, dynamic_shapes=shapes, strict=False)
        except UnsupportedError as e:
            raise _with_notes(e, notes) from e
        except Exception as e:  # torch's message is long; its first lines say what failed
            head = "\n".join(str(e).strip().splitlines()[:6])
            raise _with_notes(UnsupportedError(
                f"torch.export could not trace {type(module).__name__}: "
                f"{type(e).__name__}: {head}"), notes, anywhere=True) from e
    finally:
        for path, old in reversed(swapped):
            _swap(module, path, old)
    try:
        return translate_exported(ep, max_tokens=max_tokens)
    except UnsupportedError as e:
        raise _with_notes(e, notes) from e


def _with_notes(e: UnsupportedError, notes: dict[str, str], anywhere: bool = False
                ) -> UnsupportedError:
    """`e`, plus why a module with experts and a router where it happened (`anywhere`: for an
    error that names no module) was not recognised as an MoE block."""
    msg = str(e)
    hits = [why for path, why in notes.items() if anywhere or (
        f"'{path}'" in msg or f"'{path}." in msg if path else "root module" in msg)]
    if not hits:
        return e
    return UnsupportedError(f"{msg}\n(not recognised as an MoE block: {hits[0]}; "
                            f"{HOW_TO_REGISTER})")
