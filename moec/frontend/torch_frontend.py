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

import inspect
import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.export.graph_signature import InputKind

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
        weight = self.get_parameter(self._router_w)
        bias = self.get_parameter(self._router_b) if self._router_b else None
        sel = self.get_parameter(s.select_bias_name) if s.select_bias is not None else None
        h = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        # capacity is counted per sequence (the block routes [B, S, H] unflattened): that
        # router takes the sequences, the rest the flattened tokens
        seqs = x if x.dim() == 3 or not s.capacity else x.reshape(-1, *x.shape[-2:])
        w, ids = torch.ops.moec.moe_router(
            seqs if s.capacity and x.dim() > 2 else h, weight, bias, sel, s.k, s.scoring,
            s.order, s.norm_topk, float(s.scale), s.n_groups, s.topk_groups, s.group_score,
            s.capacity, float(s.jitter_eps))
        if w.dim() > 2:
            w, ids = w.reshape(-1, s.k), ids.reshape(-1, s.k)
        y = torch.ops.moec.moe_experts(h, w, ids, ex.w_gate, ex.w_up, ex.w_down, ex.b_gate,
                                       ex.b_up, ex.b_down, s.activation, float(s.alpha),
                                       float(s.limit), s.weight_on, float(s.offset),
                                       int(s.identity_experts))
        if s.shared_experts:
            shared = self.get_submodule(s.shared_experts[0])(h)
            for name in s.shared_experts[1:]:
                shared = shared + self.get_submodule(name)(h)
            if s.shared_gate:
                shared = torch.sigmoid(self.get_submodule(s.shared_gate)(h)) * shared
            if s.shared_scale != 1.0:
                shared = shared * float(s.shared_scale)
            y = y + shared
        if s.out_bias_name:
            y = y + self.get_parameter(s.out_bias_name)
        if x.dim() != 2 and not s.flat_output:
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


DimRequest = str | tuple[str, int, int]
"""A dynamic dim as `dynamic_dims` names it: its name, or (name, min, max)."""


def default_dynamic_dims(example: object) -> dict[int, str]:
    """The guess for one example input: every leading dim of a floating-point tensor is dynamic
    (all but the last, the hidden size): `[T, H]` -> T, `[B, S, H]` -> B and S, rank 4 and up
    -> D0, D1, ...; a 1-D `[T]` -> T. Other inputs keep their shapes."""
    if not isinstance(example, torch.Tensor) or not example.is_floating_point() \
            or example.dim() == 0:
        return {}
    lead = max(example.dim() - 1, 1)
    names = ("T",) if lead == 1 else ("B", "S") if lead == 2 else tuple(
        f"D{i}" for i in range(lead))
    return dict(enumerate(names))


def _dynamic_dims(module: nn.Module, examples: Sequence[object], max_tokens: int,
                  requested: Mapping[int | str, Mapping[int, DimRequest] | None] | None
                  ) -> tuple[list[dict[int, str]], dict[str, tuple[int, int]]]:
    """Per example input {axis: dim name}, and the bounds of each name: the guess
    (default_dynamic_dims), with `requested` (by position or forward-argument name) replacing
    it for the inputs it names."""
    axes = [default_dynamic_dims(a) for a in examples]
    bounds: dict[str, tuple[int, int]] = {}
    if requested:
        try:
            params = [p for p in inspect.signature(module.forward).parameters]
        except (TypeError, ValueError):
            params = []
        for key, spec in requested.items():
            index = key if isinstance(key, int) and not isinstance(key, bool) else (
                params.index(key) if key in params else None)
            if index is None or not 0 <= index < len(examples):
                raise UnsupportedError(
                    f"dynamic_dims names input {key!r}, which is not one of the "
                    f"{len(examples)} example input(s) (by position, or by name: {params})")
            a = examples[index]
            if spec and not isinstance(a, torch.Tensor):
                raise UnsupportedError(f"dynamic_dims names input {key!r}, which is not a "
                                       f"tensor ({type(a).__name__})")
            axes[index] = {}
            for axis, want in (spec or {}).items():
                name, lo, hi = (want, 0, max_tokens) if isinstance(want, str) else tuple(want)
                if not isinstance(axis, int) or not -a.dim() <= axis < a.dim():
                    raise UnsupportedError(f"dynamic_dims[{key!r}]: axis {axis!r} is not an "
                                           f"axis of its example of shape {tuple(a.shape)}")
                if not str(name).isidentifier() or not 0 <= lo <= hi:
                    raise UnsupportedError(f"dynamic_dims[{key!r}][{axis}]: want a dim name "
                                           f"or (name, min, max) with 0 <= min <= max, got "
                                           f"{want!r}")
                if bounds.get(name, (lo, hi)) != (lo, hi):
                    raise UnsupportedError(f"dynamic_dims gives dim {name} two ranges: "
                                           f"{bounds[name]} and {(lo, hi)}")
                bounds[name] = (lo, hi)
                axes[index][axis % a.dim()] = name
    for dims in axes:
        for name in dims.values():
            bounds.setdefault(name, (0, max_tokens))
    return axes, bounds


def _export_inputs(examples: Sequence[object], axes: list[dict[int, str]],
                   bounds: dict[str, tuple[int, int]]) -> tuple[tuple[object, ...], tuple]:
    """Example inputs whose dynamic dims are at least 2 (export specialises sizes 0 and 1) and
    within their bounds, and the dynamic_shapes spec (one torch Dim per name)."""
    tdims = {name: torch.export.Dim(name, min=lo, max=max(hi, 2))
             for name, (lo, hi) in bounds.items()}
    args, shapes = [], []
    gen = torch.Generator().manual_seed(0)
    for a, dims in zip(examples, axes, strict=True):
        if not dims:
            args.append(a)
            shapes.append(None)
            continue
        assert isinstance(a, torch.Tensor)
        shape = list(a.shape)
        for axis, name in dims.items():
            shape[axis] = min(max(shape[axis], 2), max(bounds[name][1], 2))
        if shape != list(a.shape):  # random data of a shape export can keep dynamic
            a = torch.randn(shape, generator=gen).to(a.dtype) if a.is_floating_point() \
                else torch.zeros(shape, dtype=a.dtype)
        args.append(a)
        shapes.append({axis: tdims[name] for axis, name in dims.items()})
    return tuple(args), tuple(shapes)


def _dims_text(axes: list[dict[int, str]]) -> str:
    return ", ".join(f"input {i} axis {ax} = {name}" for i, dims in enumerate(axes)
                     for ax, name in dims.items()) or "none"


def _swap(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path)
    old = getattr(parent, name)
    setattr(parent, name, new)
    return old


def from_torch(module: nn.Module, example_inputs: Sequence[object] | torch.Tensor, *,
               max_tokens: int = 4096,
               dynamic_dims: Mapping[int | str, Mapping[int, DimRequest] | None] | None = None
               ) -> Graph:
    """Translate `module` into a moec IR graph whose inputs keep the examples' ranks, with
    their leading dims dynamic.

    `example_inputs` are positional arguments of `module.forward` (a single tensor is allowed).
    Every leading dim of a floating-point input is dynamic (default_dynamic_dims: `[T, H]` ->
    T, `[B, S, H]` -> B and S), each in 0..max_tokens; `dynamic_dims` replaces that guess for
    the inputs it names (by position or argument name): `{0: {0: "B", 1: "S"}}`,
    `{"x": {1: ("S", 1, 512)}}`, `{"table": None}` (all static). Dims with the same name are
    the same dim in every input. MoE blocks become moe.experts ops with their routing in core
    ops (over the flattened tokens, `B*S`); the rest becomes core ops. The module is changed
    only during the call and restored afterwards. Raises UnsupportedError (naming op, module
    path and source line) for anything that has no moec translation."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if max_tokens < 1:
        raise UnsupportedError(f"max_tokens must be at least 1, got {max_tokens}")
    examples = tuple(example_inputs)
    axes, bounds = _dynamic_dims(module, examples, max_tokens, dynamic_dims)
    notes: dict[str, str] = {}
    blocks = find_moe_blocks(module, notes)
    args, shapes = _export_inputs(examples, axes, bounds)
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
            if "Constraints violated" in str(e):  # a dim moec took for dynamic is not
                head += (f"\n(moec made these dims dynamic: {_dims_text(axes)}; state the "
                         f"dynamic ones with dynamic_dims= (moec compile --dynamic-dims), "
                         f"e.g. {{0: {{0: 'B'}}}} to keep the other dims of input 0 static)")
            raise _with_notes(UnsupportedError(
                f"torch.export could not trace {type(module).__name__}: "
                f"{type(e).__name__}: {head}"), notes, anywhere=True) from e
    finally:
        for path, old in reversed(swapped):
            _swap(module, path, old)
    # the user inputs that are tensors, in order, are the tensor examples
    vals = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"}
    users = [s.arg.name for s in ep.graph_signature.input_specs
             if s.kind == InputKind.USER_INPUT and isinstance(vals.get(s.arg.name), torch.Tensor)]
    tensor_axes = [dims for a, dims in zip(args, axes, strict=True)
                   if isinstance(a, torch.Tensor)]
    input_dims = {name: dims for name, dims in zip(users, tensor_axes, strict=False) if dims}
    try:
        graph = translate_exported(ep, max_tokens=max_tokens, input_dims=input_dims,
                                   dims=bounds)
    except UnsupportedError as e:
        raise _with_notes(e, notes) from e
    for path, why in notes.items():  # traced as plain ops: say so, never silently
        warnings.warn(f"moec: module '{path or '<root>'}' has experts and a router but is not "
                      f"compiled as an MoE block ({why}); it was traced as plain ops",
                      UserWarning, stacklevel=2)
    used = {s for v in graph.inputs for d in v.shape if not isinstance(d, int)
            for s in d.free_syms()}
    for name in list(graph.dims):
        if name not in used:  # the default token dim T of a graph whose inputs are [B, S, H]
            del graph.dims[name]
        elif name in bounds:
            graph.dims[name] = bounds[name]
    return graph


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
