"""The parts of an MoE block, found by structure (what the block owns), never by class names.

- **router**: a direct child `nn.Linear(H, E)`, a direct child module owning a 2-D `weight [E, H]`
  (optional `bias [E]`), a direct child wrapping exactly one such linear (`router.classifier`,
  `router.layer`; the wrapper's `[E]` buffers are selection-bias candidates), or a 2-D parameter
  of the block itself. `[E]` (or `[1, E]`) tensors anywhere
  in the block other than the router's bias (on the router or its children first, then on the
  block: a correction bias the block passes into the router) are selection-bias candidates
  (DeepSeek-V3's `e_score_correction_bias`).
- **experts**: a direct child `nn.ModuleList`/`nn.ModuleDict` of E identical MLPs (2 or 3
  `nn.Linear` children, with or without biases, plus parameter-free modules), or parameters of the
  block and its direct children (outside linears) that are 3-D with leading dim E
  (`gate_up [E, 2I, H]`, `down [E, H, I]`, either layout, gate/up fused as halves or interleaved),
  2-D `[E*I, H]` (one expert after the other) or 2-D `[E, N]` biases. When no router has that
  many experts: fewer (E' < E) read as E' FFN experts followed by E - E' identity experts
  (`find_identity_experts`, LongCat-Flash's zero-computation experts).
- **shared experts**: direct child MLPs outside the experts with H inputs and outputs, optionally
  gated by a direct child `nn.Linear(H, 1)` through a sigmoid (Qwen2-MoE).
- **output bias**: a 1-D `[H]` parameter of the block added to its output (JetMoE).
- **activation**: the parameter-free modules of the experts are run on a test vector and compared
  with the known activations. A `limit` (`swiglu_limit`, `clamp_limit`) attribute hints a clamped
  SwiGLU, tried in two forms: GPT-OSS's `(clamp(u) + 1) * g' * sigmoid(alpha g')` (alpha from an
  `alpha`/`swiglu_alpha` attribute) and the plain `silu(min(g, L)) * clamp(u, -L, L)`; the probe
  then also runs the block on inputs large enough to reach the limit (moe_probe.py), so which
  form (or none) the block computes is measured, not guessed from small values.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from moec.frontend.moe_op import ACTIVATIONS, UNGATED_ONLY, activate

_ROUTER_WORDS = ("router", "gate", "gating", "classifier", "wg")
_ROLE_KEYS = {"gate": ("gate", "w1", "wi_0"), "up": ("up", "w3", "fc1", "wi_1", "c_fc", "wi",
                                                     "v1", "input"),
              "down": ("down", "w2", "fc2", "wo", "c_proj", "output")}


@dataclass
class RouterPart:
    name: str  # path of the router module (its `weight`), or of the router weight parameter
    weight: torch.Tensor  # [E, H], the live parameter
    bias: torch.Tensor | None
    is_param: bool
    module: nn.Module | None
    select_biases: list[tuple[str, torch.Tensor]] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.weight.shape[0]), int(self.weight.shape[1])


@dataclass
class Reading:
    """One way to read the experts as stacked weights plus an activation."""

    w_gate: torch.Tensor | None
    w_up: torch.Tensor
    w_down: torch.Tensor
    activation: str
    b_gate: torch.Tensor | None = None
    b_up: torch.Tensor | None = None
    b_down: torch.Tensor | None = None
    alpha: float = 1.702
    limit: float = 7.0
    offset: float = 1.0

    def __post_init__(self) -> None:
        # moe.experts takes biases for all projections or none: missing ones become zeros
        if any(b is not None for b in (self.b_gate, self.b_up, self.b_down)):
            e, i, h = self.w_up.shape
            zeros = self.w_up.new_zeros
            self.b_up = zeros(e, i) if self.b_up is None else self.b_up
            self.b_down = zeros(e, h) if self.b_down is None else self.b_down
            if self.w_gate is not None and self.b_gate is None:
                self.b_gate = zeros(e, i)


@dataclass
class ExpertsPart:
    name: str  # for messages: the container, or the parameter names
    num: int
    listed: list[nn.Module] | None  # the expert MLPs of a ModuleList/ModuleDict
    owners: list[str]  # direct children holding the expert weights ("" = the block)
    readings: list[Reading]
    identity: int = 0  # router ids after the FFN experts that are identity experts (w * x)
    counts: str = ""  # with identity experts: which weight holds how many experts


@dataclass
class Parts:
    router: RouterPart
    experts: ExpertsPart
    shared: list[str]
    shared_gate: str | None
    out_bias: str | None
    unmodelled: list[str]


# --------------------------------------------------------------------------- helpers


def mlp_linears(m: nn.Module) -> dict[str, nn.Linear] | None:
    """The Linear children of an MLP-like module (2 or 3 linears, nothing else with
    parameters, no parameters of its own), or None."""
    if isinstance(m, nn.Linear) or any(True for _ in m.parameters(recurse=False)):
        return None
    lins: dict[str, nn.Linear] = {}
    for name, child in m.named_children():
        if isinstance(child, nn.Linear):
            lins[name] = child
        elif any(True for _ in child.parameters()):
            return None
    return lins if 2 <= len(lins) <= 3 else None


def role_score(name: str, role: str) -> int:
    n = name.lower().rsplit(".", 1)[-1] if "." in name else name.lower()
    keys = _ROLE_KEYS[role]
    return 0 if any(n == k or k in n for k in keys) else 1


_ACT_PROBE = torch.linspace(-6, 6, 97)


_LIMIT_ATTRS = ("limit", "swiglu_limit", "clamp_limit")
_ALPHA_ATTRS = ("alpha", "swiglu_alpha")


def _number(m: nn.Module, names: tuple[str, ...]) -> float | None:
    for a in names:
        v = getattr(m, a, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None


def clamp_limit(modules: list[nn.Module]) -> float | None:
    """The clamped-SwiGLU limit an attribute of `modules` hints (finite and positive), or None."""
    for m in modules:
        v = _number(m, _LIMIT_ATTRS)
        if v is not None and 0.0 < v < float("inf"):
            return v
    return None


Act = tuple[str, dict[str, float]]  # an activation and its clamped-SwiGLU constants


def act_hints(modules: list[nn.Module]) -> list[Act]:
    """Activations to try, most plausible first, each with its clamped-SwiGLU constants (alpha,
    limit, offset; empty for the others). A hinted limit brings both clamped forms: GPT-OSS's
    first when an alpha is hinted too, the plain one (alpha 1, offset 0) first otherwise."""
    hints: list[str] = []
    clamped: list[dict[str, float]] = []
    for m in modules:
        for child in m.modules():
            if child is m or any(True for _ in child.parameters()) or next(
                    child.children(), None) is not None:
                continue
            try:
                with torch.no_grad():
                    y = child(_ACT_PROBE)
            except Exception:
                continue
            for act in (a for a in ACTIVATIONS if a != "clamped_swiglu"):
                if isinstance(y, torch.Tensor) and y.shape == _ACT_PROBE.shape and torch.allclose(
                        y.float(), activate(_ACT_PROBE, act), atol=1e-5):
                    hints.append(act)
        limit, alpha = clamp_limit([m]), _number(m, _ALPHA_ATTRS)
        if limit is not None and not clamped:
            gpt_oss = {"alpha": 1.702 if alpha is None else alpha, "limit": limit, "offset": 1.0}
            plain = {"alpha": 1.0, "limit": limit, "offset": 0.0}
            clamped = [gpt_oss, plain] if alpha is not None else [plain, gpt_oss]
    names = [a for a in dict.fromkeys(hints + list(ACTIVATIONS)) if a != "clamped_swiglu"]
    return [("clamped_swiglu", c) for c in clamped] + [(a, {}) for a in names]


# --------------------------------------------------------------------------- router


def is_expert_vector(t: object, e: int) -> bool:
    """A float `[E]` (or `[1, E]`) tensor: one value per expert, a selection-bias candidate."""
    return isinstance(t, torch.Tensor) and t.is_floating_point() and tuple(t.shape) in (
        (e,), (1, e))


_SELECT_WORDS = ("bias", "correction")


def block_select_biases(block: nn.Module, router: RouterPart, skip: set[str]
                        ) -> list[tuple[str, torch.Tensor]]:
    """`[E]` tensors of the block outside the router, its experts and shared experts (in
    `skip`), that the block may add to the scores for selection (a correction bias kept on the
    block and passed into the router): names with bias/correction first."""
    e = router.shape[0]
    seen = {id(t) for _, t in router.select_biases} | {id(router.bias), id(router.weight)}
    out = []
    for name, t in itertools.chain(block.named_parameters(), block.named_buffers()):
        if name.split(".")[0] in skip or id(t) in seen or not is_expert_vector(t, e):
            continue
        seen.add(id(t))
        out.append((name, t))
    return sorted(out, key=lambda nt: not any(w in nt[0].lower() for w in _SELECT_WORDS))


def _is_expert_container(m: nn.Module) -> bool:
    return isinstance(m, (nn.ModuleList, nn.ModuleDict))


def router_candidates(block: nn.Module) -> list[RouterPart]:
    """Every plausible router of `block`, names with router/gate words first."""
    out: list[RouterPart] = []
    for name, p in block.named_parameters(recurse=False):
        if p.dim() == 2 and p.shape[0] >= 2:
            out.append(RouterPart(name, p, None, True, None))
    for cname, child in block.named_children():
        if _is_expert_container(child) or mlp_linears(child) is not None:
            continue
        own = dict(child.named_parameters(recurse=False))
        target, tname = None, cname
        if isinstance(own.get("weight"), nn.Parameter) and own["weight"].dim() == 2:
            target = child
        else:
            lins = [(n, m) for n, m in child.named_children() if isinstance(m, nn.Linear)]
            others = [n for n, m in child.named_children() if not isinstance(m, nn.Linear)
                      and any(True for _ in m.parameters())]
            if len(lins) == 1 and not own and not others:
                target, tname = lins[0][1], f"{cname}.{lins[0][0]}"
        if target is None or target.weight.shape[0] < 2:
            continue
        e = target.weight.shape[0]
        bias = getattr(target, "bias", None)
        bias = bias if isinstance(bias, torch.Tensor) and tuple(bias.shape) == (e,) else None
        sel = [(f"{tname}.{n}", t) for n, t in itertools.chain(
            target.named_parameters(), target.named_buffers())
            if is_expert_vector(t, e) and t is not bias]
        if target is not child:  # a wrapper's own buffers (LongCat-Flash's router.classifier
            # beside router.e_score_correction_bias)
            sel += [(f"{cname}.{n}", t) for n, t in child.named_buffers(recurse=False)
                    if is_expert_vector(t, e)]
        out.append(RouterPart(tname, target.weight, bias, False, target, sel))
    out.sort(key=lambda r: (not any(w in r.name.lower() for w in _ROUTER_WORDS), r.is_param))
    return out


# --------------------------------------------------------------------------- experts


def container_members(c: nn.Module) -> list[nn.Module]:
    """The modules of an experts container that hold parameters (the expert MLPs); a
    parameter-free extra child (a Dropout beside them, identity at inference) is left out."""
    mods = list(c.values()) if isinstance(c, nn.ModuleDict) else list(c)
    return [m for m in mods if any(True for _ in m.parameters())]


def _listed(block: nn.Module, e: int, h: int) -> tuple[str, list[nn.Module]] | None:
    for name, child in block.named_children():
        if not _is_expert_container(child):
            continue
        mods = container_members(child)
        if len(mods) != e:
            continue
        if len({type(m) for m in mods}) != 1 or any(mlp_linears(m) is None for m in mods):
            continue
        lins = list(mlp_linears(mods[0]).values())
        if any(lin.in_features == h for lin in lins) and any(lin.out_features == h
                                                             for lin in lins):
            return name, mods
    return None


def _list_readings(experts: list[nn.Module], h: int) -> Iterator[Reading]:
    """Ways to read a list of MLPs as stacked weights, most plausible first."""
    lins = mlp_linears(experts[0])
    assert lins is not None
    names = list(lins)
    roles = ("gate", "up", "down") if len(names) == 3 else ("up", "down")
    perms = sorted(itertools.permutations(names),
                   key=lambda p: sum(role_score(n, r) for n, r in zip(p, roles, strict=True)))
    acts = act_hints([experts[0]])
    for perm in perms:
        assign = dict(zip(roles, perm, strict=True))
        down = lins[assign["down"]]
        ins = [lins[assign[r]] for r in roles if r != "down"]
        if down.out_features != h or any(
                (lin.in_features, lin.out_features) != (h, down.in_features) for lin in ins):
            continue

        def stack(role: str, what: str = "weight", assign: dict[str, str] = assign
                  ) -> torch.Tensor | None:
            if role not in assign:
                return None
            ts = [getattr(ex.get_submodule(assign[role]), what) for ex in experts]
            if any(t is None for t in ts):
                return None
            return torch.stack([t.detach() for t in ts])

        for act, consts in acts:
            if act == "clamped_swiglu" and "gate" not in assign or (
                    act in UNGATED_ONLY and "gate" in assign):
                continue
            yield Reading(stack("gate"), stack("up"), stack("down"), act, stack("gate", "bias"),
                          stack("up", "bias"), stack("down", "bias"), **consts)


def _holder_params(child: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The parameters of a weight-holder child: no linears or module lists below it, and its
    weights either its own or those of its one parameter-holding child (DBRX's `experts.mlp`).
    A child with several parameter-holding children (an MoE block with its own router) is not
    a weight holder."""
    if any(isinstance(c, (nn.Linear, nn.ModuleList, nn.ModuleDict)) for c in child.modules()):
        return []
    own = list(child.named_parameters(recurse=False))
    if own:
        return own
    holders = [(n, c) for n, c in child.named_children() if any(True for _ in c.parameters())]
    if len(holders) != 1:
        return []
    name, holder = holders[0]
    return [(f"{name}.{n}", p) for n, p in holder.named_parameters(recurse=False)]


def _stacked_params(block: nn.Module, skip: set[str]) -> list[tuple[str, str, torch.Tensor]]:
    """(owner, name, tensor) of the block's own parameters and those of its direct children
    that hold weights (see _holder_params), except the children in `skip`."""
    found = [("", n, p) for n, p in block.named_parameters(recurse=False)]
    for cname, child in block.named_children():
        if cname not in skip:
            found += [(cname, f"{cname}.{n}", p) for n, p in _holder_params(child)]
    return found


def _orient(p: torch.Tensor, rows: int | None, cols: int) -> list[torch.Tensor]:
    out = []
    for q in (p, p.transpose(1, 2)):
        if q.shape[2] == cols and (rows is None or q.shape[1] == rows):
            out.append(q.detach())
    return out[:1] if len(out) == 2 and torch.equal(out[0], out[1]) else out


def _splits(fused: torch.Tensor, i: int) -> list[tuple[torch.Tensor, torch.Tensor, str]]:
    """(gate, up, how) ways to split a fused [E, 2I, ...] tensor along dim 1."""
    halves = (fused[:, :i], fused[:, i:])
    inter = (fused[:, 0::2], fused[:, 1::2])
    return [(halves[0], halves[1], "halves"), (halves[1], halves[0], "halves-swapped"),
            (inter[0], inter[1], "interleaved"), (inter[1], inter[0], "interleaved-swapped")]


def _bias_split(b: torch.Tensor, how: str, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    b = b.detach()
    if how.startswith("halves"):
        g, u = b[:, :i], b[:, i:]
    else:
        g, u = b[:, 0::2], b[:, 1::2]
    return (u, g) if how.endswith("swapped") else (g, u)


def _stacked_readings(weights: list[tuple[str, torch.Tensor]],
                      biases: list[tuple[str, torch.Tensor]], h: int, acts: list[Act]
                      ) -> Iterator[Reading]:
    """Ways to read 3-D expert weights (and [E, N] biases) as (gate, up, down) + activation."""
    named = sorted(weights, key=lambda nt: role_score(nt[0], "down"))
    for d_name, d in named:
        rest = [(n, p) for n, p in weights if n != d_name]
        for w_down in _orient(d, h, d.shape[1] if d.shape[2] == h else d.shape[2]):
            i = w_down.shape[2]
            b_down = next((b.detach() for _, b in biases if b.shape[1] == h), None)
            combos: list[tuple] = []  # (gate, up, b_gate, b_up)
            if len(rest) == 2:
                order = sorted(range(2), key=lambda j: role_score(rest[j][0], "gate"))
                bias_i = sorted([(n, b) for n, b in biases if b.shape[1] == i],
                                key=lambda nb: role_score(nb[0], "gate"))
                bg = bias_i[0][1].detach() if len(bias_i) == 2 else None
                bu = bias_i[1][1].detach() if len(bias_i) == 2 else None
                for g_idx in order:
                    for g in _orient(rest[g_idx][1], i, h):
                        for u in _orient(rest[1 - g_idx][1], i, h):
                            combos.append((g, u, bg, bu) if g_idx == order[0] else (g, u, bu, bg))
            elif len(rest) == 1:
                fb = next((b for _, b in biases if b.shape[1] == 2 * i), None)
                for fused in _orient(rest[0][1], 2 * i, h):
                    for g, u, how in _splits(fused, i):
                        bg, bu = _bias_split(fb, how, i) if fb is not None else (None, None)
                        combos.append((g, u, bg, bu))
                ub = next((b.detach() for _, b in biases if b.shape[1] == i), None)
                combos += [(None, u, None, ub) for u in _orient(rest[0][1], i, h)]
            for (g, u, bg, bu), (act, consts) in itertools.product(combos, acts):
                if g is None and act == "clamped_swiglu" or (
                        g is not None and act in UNGATED_ONLY):
                    continue
                yield Reading(g, u, w_down, act, bg, bu, b_down, **consts)


def _stacked(block: nn.Module, e: int, h: int, skip: set[str], router: torch.Tensor,
             wide: int | None = None) -> tuple[list[str], list[tuple[str, torch.Tensor]],
                                               list[tuple[str, torch.Tensor]]] | None:
    """(owners, 3-D weights, [E, N] biases) of the e stacked experts; with `wide` (the router's
    count, above e: identity experts follow the FFN ones) tensors of `wide` experts count too,
    their first e taken (LongCat-Flash allocates gate_up for all of them, down for the FFN
    ones)."""
    weights, biases, owners = [], [], []
    for owner, name, p in _stacked_params(block, skip):
        if p is router:
            continue
        if wide is not None and p.dim() in (2, 3) and p.shape[0] == wide:
            p = p[:e]
        if p.dim() == 3 and p.shape[0] == e:
            weights.append((name, p))
        elif p.dim() == 2 and p.shape[0] != e and p.shape[0] % e == 0 and p.shape[1] == h:
            weights.append((name, p.reshape(e, p.shape[0] // e, h)))  # one expert after another
        elif p.dim() == 2 and p.shape[0] == e:
            biases.append((name, p))
            continue
        else:
            continue
        owners.append(owner)
    if not 2 <= len(weights) <= 3:
        return None
    return list(dict.fromkeys(owners)), weights, biases


def find_experts(block: nn.Module, router: RouterPart) -> ExpertsPart | None:
    """The experts of `block` that `router` (E, H) routes to, or None."""
    e, h = router.shape
    listed = _listed(block, e, h)
    if listed is not None:
        name, mods = listed
        return ExpertsPart(name, e, mods, [name], list(_list_readings(mods, h)))
    skip = set() if router.is_param else {router.name.split(".")[0]}
    found = _stacked(block, e, h, skip, router.weight)
    if found is None:
        return None
    owners, weights, biases = found
    acts = act_hints([block.get_submodule(o) for o in owners if o])
    readings = list(_stacked_readings(weights, biases, h, acts))
    name = owners[0] if len(owners) == 1 and owners[0] else ", ".join(n for n, _ in weights)
    return ExpertsPart(name, e, None, owners, readings)


def find_identity_experts(block: nn.Module, router: RouterPart) -> ExpertsPart | None:
    """Experts of `block` fewer than the router scores (E FFN experts, then identity experts
    up to the router's count: LongCat-Flash's zero-computation experts), or None: an experts
    container of fewer MLPs, or stacked weights whose leading dim is below the router's (some
    may hold the router's count; their first E are taken)."""
    e, h = router.shape
    skip = set() if router.is_param else {router.name.split(".")[0]}
    counts = {len(container_members(c)) for _, c in block.named_children()
              if _is_expert_container(c)}
    counts |= {int(p.shape[0]) for _, _, p in _stacked_params(block, skip) if p.dim() == 3}
    for n in sorted((c for c in counts if 1 <= c < e), reverse=True):
        listed = _listed(block, n, h)
        if listed is not None:
            name, mods = listed
            return ExpertsPart(name, e, mods, [name], list(_list_readings(mods, h)), e - n,
                               f"'{name}' holds {n}")
        found = _stacked(block, n, h, skip, router.weight, wide=e)
        if found is None:
            continue
        owners, weights, biases = found
        acts = act_hints([block.get_submodule(o) for o in owners if o])
        readings = list(_stacked_readings(weights, biases, h, acts))
        name = owners[0] if len(owners) == 1 and owners[0] else ", ".join(w for w, _ in weights)
        counts = ", ".join(f"'{pn}' holds {int(p.shape[0])}" for _, pn, p in _stacked_params(
            block, skip) if p.dim() == 3 and int(p.shape[0]) in (n, e))
        return ExpertsPart(name, e, None, owners, readings, e - n, counts)
    return None


# --------------------------------------------------------------------------- everything


def find_parts(block: nn.Module) -> tuple[Parts | None, str]:
    """The parts of `block`, or (None, what is missing) when it has no experts with a router."""
    routers = router_candidates(block)
    # experts as many as the router scores first; fewer (identity experts after them) only when
    # no router has those
    found = [(r, find_experts(block, r)) for r in routers]
    if all(ex is None for _, ex in found):
        found = [(r, find_identity_experts(block, r)) for r in routers]
    for r, experts in found:
        h = r.shape[1]
        if experts is None:
            continue
        used = set(experts.owners) | {r.name.split(".")[0]}
        shared, gate, out_bias, unmodelled = [], None, None, []
        for cname, child in block.named_children():
            if cname in used:
                continue
            lins = mlp_linears(child)
            if lins is not None:
                first, last = next(iter(lins.values())), list(lins.values())[-1]
                if any(lin.in_features == h for lin in lins.values()) and (
                        first.out_features == h or last.out_features == h):
                    shared.append(cname)
                    continue
            if isinstance(child, nn.Linear) and (child.in_features, child.out_features) == (h, 1):
                gate = cname if gate is None else gate
                continue
            if any(True for _ in child.parameters()):
                unmodelled.append(cname)
        for n, p in block.named_parameters(recurse=False):
            if p.dim() == 1 and p.shape[0] == h:
                out_bias = n if out_bias is None else out_bias
        skip = used | set(shared) | ({gate} if gate else set())
        r.select_biases += block_select_biases(block, r, skip)
        return Parts(r, experts, shared, gate, out_bias, unmodelled), ""
    listed = [(n, len(container_members(c))) for n, c in block.named_children()
              if _is_expert_container(c) and len(container_members(c)) >= 2
              and all(mlp_linears(m) is not None for m in container_members(c))]
    stacked = [(n, int(p.shape[0])) for _, n, p in _stacked_params(block, set())
               if p.dim() == 3 and p.shape[0] >= 2]
    named = any("expert" in n.lower() for n, _ in listed + stacked) or "moe" in type(
        block).__name__.lower()
    if named and (listed or len(stacked) >= 2):
        what = listed[0][0] if listed else ", ".join(n for n, _ in stacked)
        num = listed[0][1] if listed else stacked[0][1]
        sizes = sorted({r.shape[0] for r in routers})
        for r in routers:  # the router fits some expert weights: say which one does not
            fit = [n for n, c in listed + stacked if c == r.shape[0]]
            off = [(n, c) for n, c in listed + stacked if c != r.shape[0]]
            if fit and off:
                return None, (
                    f"router '{r.name}' scores {r.shape[0]} experts and "
                    f"{', '.join(repr(n) for n in fit)} hold {r.shape[0]}, but "
                    + ", ".join(f"'{n}' holds {c}" for n, c in off)
                    + ": the expert weights differ in their expert count, and no reading "
                    "as FFN experts followed by identity (zero-computation) experts fits")
        return None, (f"found {num} experts ('{what}') but no router: no nn.Linear or [E, H] "
                      f"weight whose E matches the expert count"
                      + (f" (router-like weights have E in {sizes})" if sizes else ""))
    return None, ""
