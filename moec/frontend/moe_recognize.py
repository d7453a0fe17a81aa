"""Structural recognition of MoE blocks in torch modules, verified by probing.

A block is recognised by what it owns, never by its class name (moec.frontend.moe_parts): a
router (a linear or an `[E, H]` weight, with an optional logit bias and selection bias), experts
(a ModuleList/ModuleDict of MLPs or stacked `[E, ...]` weights, with optional biases), shared
experts (MLPs outside the experts, optionally behind a sigmoid gate `Linear(H, 1)`) and an
optional output bias. How the parts combine is then found by probing (moec.frontend.moe_probe):
the block runs on random tokens in a few scenarios, and the first candidate (expert reading,
activation, routing: scoring, order, k, renormalisation, scaling, grouped top-k, selection bias,
capacity; routing weight on the expert output or input) that reproduces every scenario is taken.
Attributes only order the candidates (`top_k`, `norm_topk_prob`, `n_group`, `topk_group`,
`routed_scaling_factor`, `expert_capacity`, ...). If nothing matches, `UnsupportedError` says which
part was not found and how to register a recogniser.

Users add recognisers for other block kinds with `register_moe_recognizer`; a recogniser returns
a `MoESpec` or None, and its spec is checked against the block's output the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from moec.errors import UnsupportedError
from moec.frontend.moe_op import ACTIVATIONS, GROUP_SCORES, ORDERS, SCORINGS
from moec.frontend.moe_parts import ExpertsPart, Parts, Reading, RouterPart, find_parts
from moec.frontend.moe_probe import (
    CAPACITY_ATTRS,
    NotCallableError,
    Probe,
    Routing,
    hint_values,
    routings,
)

HOW_TO_REGISTER = ("to compile this block anyway, register a recogniser that returns a MoESpec "
                   "for it with moec.frontend.register_moe_recognizer (see docs/frontend.md)")


@dataclass
class MoESpec:
    """One MoE block in the frontend's canonical form (semantics: moe.router + moe.experts, plus
    shared experts and an output bias).

    Expert weights are stacked: `w_gate [E, I, H]` (None for non-gated experts), `w_up [E, I, H]`,
    `w_down [E, H, I]`, optional biases `b_gate [E, I]`, `b_up [E, I]`, `b_down [E, H]`. The router
    is `logits = x @ router_weight.T (+ router_bias)`; `router_name` is its path inside the block,
    which names its IR parameters: a module (giving `<router_name>.weight`, `.bias`) or the router
    weight parameter itself (e.g. `"wg"`). `select_bias` (at `select_bias_name`) only affects the
    selection (DeepSeek-V3). Routing attributes are those of moe.router (docs/ops.md);
    `weight_on="input"` scales each expert's input instead of its output (Llama 4).
    `shared_experts` are paths of submodules whose outputs are added (times
    `sigmoid(<shared_gate>(x))` when a gate is named, and times `shared_scale`);
    `out_bias_name` names a parameter of the block added to the output."""

    router_weight: torch.Tensor
    w_up: torch.Tensor
    w_down: torch.Tensor
    w_gate: torch.Tensor | None = None
    k: int = 2
    scoring: str = "softmax"
    order: str = "score_topk"
    norm_topk: bool = False
    activation: str = "silu"
    scale: float = 1.0
    router_bias: torch.Tensor | None = None
    router_name: str = "gate"
    select_bias: torch.Tensor | None = None
    select_bias_name: str | None = None
    n_groups: int = 1
    topk_groups: int = 1
    group_score: str = "max"
    capacity: int = 0
    jitter_eps: float = 0.01
    b_gate: torch.Tensor | None = None
    b_up: torch.Tensor | None = None
    b_down: torch.Tensor | None = None
    alpha: float = 1.702
    limit: float = 7.0
    offset: float = 1.0  # clamped_swiglu: the 1 in (clamp(u) + 1); 0 for the plain clamped form
    identity_experts: int = 0  # router ids after the FFN experts' add w * x (LongCat-Flash)
    weight_on: str = "output"
    shared_experts: tuple[str, ...] = ()
    shared_gate: str | None = None
    shared_scale: float = 1.0  # coefficient of the shared experts: (routed + shared) / 2 -> 0.5
    out_bias_name: str | None = None
    aux_output: str | None = None  # the block also returns "logits" or "weights" (set by moec)
    router_is_param: bool = False  # router_name names a parameter, not a module (set by moec)
    flat_output: bool = False  # returns [B*S, H] for x [B, S, H], as Llama 4 (set by moec)

    @property
    def num_experts(self) -> int:
        return int(self.router_weight.shape[0])

    @property
    def returns_logits(self) -> bool:
        return self.aux_output == "logits"

    def reading(self) -> Reading:
        return Reading(self.w_gate, self.w_up, self.w_down, self.activation, self.b_gate,
                       self.b_up, self.b_down, self.alpha, self.limit, self.offset)

    def routing(self) -> Routing:
        return Routing(self.k, self.scoring, self.order, self.norm_topk, self.scale,
                       self.n_groups, self.topk_groups, self.group_score, self.capacity,
                       self.jitter_eps, self.select_bias is not None)

    def validate(self, where: str) -> None:
        """Raise UnsupportedError when shapes or attributes are inconsistent."""
        e, h = self.router_weight.shape
        if not 0 <= self.identity_experts < e:
            raise UnsupportedError(f"{where}: identity_experts={self.identity_experts} out of "
                                   f"range 0..{e - 1}")
        if self.identity_experts and self.weight_on != "output":
            raise UnsupportedError(f"{where}: identity experts take weight_on='output'")
        e -= self.identity_experts  # the FFN experts
        i = self.w_up.shape[1]
        want = {"w_up": (e, i, h), "w_down": (e, h, i), "b_up": (e, i), "b_down": (e, h),
                "router_bias": (e + self.identity_experts,),
                "select_bias": (e + self.identity_experts,)}
        if self.w_gate is not None:
            want.update(w_gate=(e, i, h), b_gate=(e, i))
        for name, shape in want.items():
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != shape:
                raise UnsupportedError(f"{where}: {name} has shape {tuple(t.shape)}, "
                                       f"expected {shape}")
        if (self.b_up is None) != (self.b_down is None) or self.w_gate is not None and (
                self.b_gate is None) != (self.b_up is None):
            raise UnsupportedError(f"{where}: expert biases must be given for all of gate "
                                   "(if gated), up and down, or for none")
        if not 1 <= self.k <= e:
            raise UnsupportedError(f"{where}: top-k {self.k} out of range 1..{e}")
        for attr, allowed in (("scoring", SCORINGS), ("order", ORDERS), ("activation", ACTIVATIONS),
                              ("group_score", GROUP_SCORES), ("weight_on", ("output", "input"))):
            if getattr(self, attr) not in allowed:
                raise UnsupportedError(f"{where}: {attr}={getattr(self, attr)!r} is not one of "
                                       f"{', '.join(allowed)}")
        if self.activation == "clamped_swiglu" and self.w_gate is None:
            raise UnsupportedError(f"{where}: activation clamped_swiglu needs gated experts")
        if self.activation == "relu2" and self.w_gate is not None:
            raise UnsupportedError(f"{where}: activation relu2 is for non-gated experts")
        if self.select_bias is not None and not self.select_bias_name:
            raise UnsupportedError(f"{where}: select_bias needs select_bias_name (its path)")


Recognizer = Callable[[nn.Module, str], "MoESpec | None"]
_USER_RECOGNIZERS: list[Recognizer] = []


def register_moe_recognizer(fn: Recognizer) -> Recognizer:
    """Add a recogniser `fn(module, path) -> MoESpec | None`; usable as a decorator.

    User recognisers run before the built-in structural one, newest first. The spec a user
    recogniser returns is checked against the block's own output on random inputs."""
    _USER_RECOGNIZERS.insert(0, fn)
    return fn


def unregister_moe_recognizer(fn: Recognizer) -> None:
    """Remove a recogniser added with `register_moe_recognizer`."""
    _USER_RECOGNIZERS.remove(fn)


def recognize_moe(module: nn.Module, path: str, notes: dict[str, str] | None = None
                  ) -> MoESpec | None:
    """The spec of `module` if some recogniser takes it as an MoE block, else None. A module with
    experts and a router that cannot be called as module(x) is not taken; why goes to `notes`
    ({path: reason}), so that a later tracing error there can say so."""
    where = _where(module, path)
    for fn in list(_USER_RECOGNIZERS):
        spec = fn(module, path)
        if spec is not None:
            _check_user_spec(module, spec, where, fn.__name__)
            return spec
    try:
        return recognize_structural(module, path)
    except NotCallableError as e:
        if notes is not None:
            notes[path] = str(e)
        return None


def _where(module: nn.Module, path: str) -> str:
    return f"MoE block '{path or '<root>'}' ({type(module).__name__})"


def _router_part(block: nn.Module, spec: MoESpec, where: str) -> RouterPart:
    try:
        mod = block.get_submodule(spec.router_name)
        weight, bias, is_param = mod.weight, getattr(mod, "bias", None), False
    except AttributeError:
        mod = None
        try:
            weight, bias, is_param = block.get_parameter(spec.router_name), None, True
        except AttributeError:
            raise UnsupportedError(f"{where}: router '{spec.router_name}' is neither a submodule "
                                   "with a weight nor a parameter of the block") from None
    sel = []
    if spec.select_bias_name:
        owner, _, leaf = spec.select_bias_name.rpartition(".")
        sel = [(spec.select_bias_name, getattr(block.get_submodule(owner), leaf))]
    return RouterPart(spec.router_name, weight, bias if isinstance(bias, torch.Tensor) else None,
                      is_param, mod, sel)


def _check_user_spec(block: nn.Module, spec: MoESpec, where: str, name: str) -> None:
    spec.validate(where)
    router = _router_part(block, spec, where)
    spec.router_is_param = router.is_param
    parts = Parts(router, ExpertsPart("experts", spec.num_experts, None, [], [],
                                      spec.identity_experts),
                  list(spec.shared_experts), spec.shared_gate, spec.out_bias_name, [])
    probe = Probe(block, parts, where, spec.capacity)
    probe.shared_scale = spec.shared_scale
    found = probe.search([spec.reading()], [spec.routing()])
    if found is None or found[2] != spec.weight_on:
        raise UnsupportedError(f"{where}: the MoESpec from recogniser {name} does not "
                               "reproduce the block's output")
    spec.aux_output = probe.aux_kind(spec.routing())
    spec.flat_output = flattens_output(block, spec.router_weight)


def flattens_output(block: nn.Module, router_weight: torch.Tensor) -> bool:
    """Whether the block returns its output flattened to tokens, [B*S, H], for an input
    [B, S, H] (Llama 4 does; most blocks return [B, S, H])."""
    h = router_weight.shape[1]
    x = torch.randn((2, 3, h), generator=torch.Generator().manual_seed(0)).to(
        dtype=router_weight.dtype, device=router_weight.device)
    try:
        with torch.no_grad():
            out = block(x)
    except Exception:  # a block that only takes [T, H]: the output keeps the input's shape
        return False
    out = out[0] if isinstance(out, tuple) else out
    return isinstance(out, torch.Tensor) and tuple(out.shape) == (6, h)


def recognize_structural(block: nn.Module, path: str) -> MoESpec | None:
    """The built-in recogniser (see the module docstring). None if `block` has no experts."""
    where = _where(block, path)
    parts, missing = find_parts(block)
    if parts is None:
        if missing:
            raise UnsupportedError(f"{where}: {missing}; {HOW_TO_REGISTER}")
        return None
    r, ex = parts.router, parts.experts
    owners = [r.module] + ([] if r.is_param else [block.get_submodule(r.name.split(".")[0])])
    sources: list[object] = [block, *owners, *(block.get_submodule(o) for o in ex.owners if o)]
    caps = [v for v in hint_values(sources, CAPACITY_ATTRS, int) if v > 0]
    # the first selection-bias candidate is the one the probe varies; when the routing is not
    # found with it, the next ones (an [E] tensor elsewhere in the block) take its place
    sels = list(r.select_biases)
    for first in range(max(1, min(len(sels), 4))):
        r.select_biases = sels[first:first + 1] + sels[:first] + sels[first + 1:]
        probe = Probe(block, parts, where, caps[0] if caps else 0)
        found = _search(probe, block, parts, sources, path)
        if found is not None:
            break
    if found is None:
        raise UnsupportedError(_routing_not_found(where, parts, bool(ex.listed)))
    reading, ro, weight_on = found
    sel_name, sel = r.select_biases[0] if ro.select_bias else (None, None)
    return MoESpec(
        router_weight=r.weight, w_up=reading.w_up, w_down=reading.w_down, w_gate=reading.w_gate,
        k=ro.k, scoring=ro.scoring, order=ro.order, norm_topk=ro.norm_topk,
        activation=reading.activation, scale=ro.scale, router_bias=r.bias, router_name=r.name,
        select_bias=None if sel is None else sel.reshape(-1), select_bias_name=sel_name,
        n_groups=ro.n_groups, topk_groups=ro.topk_groups, group_score=ro.group_score,
        capacity=ro.capacity, jitter_eps=ro.jitter_eps, b_gate=reading.b_gate, b_up=reading.b_up,
        b_down=reading.b_down, alpha=reading.alpha, limit=reading.limit, offset=reading.offset,
        weight_on=weight_on, identity_experts=ex.identity,
        shared_experts=tuple(parts.shared), shared_gate=parts.shared_gate,
        shared_scale=probe.shared_scale, out_bias_name=parts.out_bias,
        aux_output=probe.aux_kind(ro), router_is_param=r.is_param,
        flat_output=flattens_output(block, r.weight))


def _search(probe: Probe, block: nn.Module, parts: Parts, sources: list[object], path: str
            ) -> tuple[Reading, Routing, str] | None:
    """The expert reading and routing that reproduce the block: the hinted routings, then the
    others; each as they are, then with the routed and shared coefficients fitted."""
    r, ex = parts.router, parts.experts
    where = _where(block, path)
    readings = ex.readings
    if ex.listed is not None:
        readings = [rd for rd in readings if probe.check_experts(ex.listed, rd)][:1]
        if not readings:
            first = next(iter(block.get_submodule(ex.name).named_children()))[0]
            raise UnsupportedError(
                f"{where}: expert MLP '{ex.name}.{first}' ({type(ex.listed[0]).__name__}) not "
                "recognised: its output is not down(act(gate(x)) * up(x)) or down(act(up(x))) "
                f"with act in {'/'.join(ACTIVATIONS)}; {HOW_TO_REGISTER}")
    if not readings:
        raise UnsupportedError(f"{where}: expert weights ('{ex.name}') do not fit hidden size "
                               f"{r.shape[1]} as gate/up [E, I, H] and down [E, H, I] (or "
                               f"transposed); {HOW_TO_REGISTER}")
    # the hinted top-k first (cheap with many experts), then every k
    hinted = routings(sources, ex.num, bool(r.select_biases), hinted_k=True)
    found = probe.search(readings, hinted) or probe.search_fitted(readings, hinted)
    if found is None:
        seen = set(hinted)
        rest = [c for c in routings(sources, ex.num, bool(r.select_biases)) if c not in seen]
        if rest:
            found = probe.search(readings, rest) or probe.search_fitted(readings, rest)
    return found


def _routing_not_found(where: str, parts: Parts, listed: bool) -> str:
    r, ex = parts.router, parts.experts
    found = [f"router '{r.name}' [E={r.shape[0]}, H={r.shape[1]}]"
             + (" with a logit bias" if r.bias is not None else "")
             + (f" and selection bias '{r.select_biases[0][0]}'" if r.select_biases else ""),
             f"experts '{ex.name}'" + (
                 f" read as {ex.num - ex.identity} FFN experts then {ex.identity} identity "
                 f"(zero-computation) experts: the router scores {ex.num} experts, {ex.counts}"
                 if ex.identity else "")]
    if parts.shared:
        found.append(f"shared experts {', '.join(parts.shared)}"
                     + (f" gated by '{parts.shared_gate}'" if parts.shared_gate else ""))
    if parts.out_bias:
        found.append(f"output bias '{parts.out_bias}'")
    what = "top-k routing not found" if listed else \
        "no reading of the expert weights and top-k routing found"
    msg = (f"{where}: {what}: with {'; '.join(found)}, no combination of scoring "
           f"{'/'.join(SCORINGS)}, order {'/'.join(ORDERS)}, k in 1..{ex.num}, renormalisation "
           "on/off, the hinted scaling/groups/capacity, and routing weight on the expert output "
           "or input reproduces the block's output")
    if parts.unmodelled:
        msg += f"; the block also owns parts the recogniser does not model: " \
               f"{', '.join(parts.unmodelled)}"
    return f"{msg}; {HOW_TO_REGISTER}"
