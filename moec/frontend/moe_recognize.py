"""Structural recognition of MoE blocks in torch modules, verified by probing.

A block is recognised by what it owns, never by its class name:

- **experts**: a child `nn.ModuleList` of at least two MLPs (each owning only 2 or 3 `nn.Linear`
  children: gate/up/down or up/down, plus parameter-free activation modules), or at least two 3-D
  parameters with the same leading dim `E` (owned by the block or by a parameter-only child such
  as `experts`), e.g. `w_gate [E, I, H]`, `w_up [E, I, H]`, `w_down [E, H, I]`, a fused
  `gate_up [E, 2I, H]`, or the transposed layouts;
- **router**: an `nn.Linear(H, E)` outside the experts (names with "gate"/"router" preferred);
- **top-k routing**: found by probing. Attributes give hints (`top_k`/`num_experts_per_tok`,
  `norm_topk_prob`, `routing`, `scoring_func`, `routed_scaling_factor`, an activation module on the
  experts); then the block runs on random inputs, once with its own router and once with a random
  one, and the first candidate spec (scoring, order, k, renormalisation, activation, weight layout)
  whose output matches both runs is taken. If none does, `UnsupportedError` says which part was
  not found.

Users add recognisers for other block kinds with `register_moe_recognizer` (see
`moec.frontend.torch_frontend`); a recogniser returns a `MoESpec` or None.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from moec.errors import UnsupportedError
from moec.frontend.moe_op import ACTIVATIONS, ORDERS, SCORINGS, activate, route


@dataclass
class MoESpec:
    """One MoE block in the frontend's canonical form (semantics: moe.router + moe.experts).

    Expert weights are stacked: `w_gate [E, I, H]` (None for non-gated experts), `w_up [E, I, H]`,
    `w_down [E, H, I]`; the router is `logits = x @ router_weight.T (+ router_bias)` and
    `router_name` is its path inside the block, which names its IR parameters: a module (giving
    `<router_name>.weight`, `.bias`) or the router weight parameter itself (e.g. `"wg"` for a
    router kept as a bare `nn.Parameter`)."""

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
    returns_logits: bool = False  # the block returns (out, router_logits), as HF Mixtral does
    router_is_param: bool = False  # router_name names a parameter, not a module (set by moec)

    @property
    def num_experts(self) -> int:
        return int(self.router_weight.shape[0])

    def validate(self, where: str) -> None:
        """Raise UnsupportedError when shapes or attributes are inconsistent."""
        e, h = self.router_weight.shape
        i = self.w_up.shape[1]
        want = {"w_up": (e, i, h), "w_down": (e, h, i)}
        if self.w_gate is not None:
            want["w_gate"] = (e, i, h)
        for name, shape in want.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise UnsupportedError(f"{where}: {name} has shape {got}, expected {shape}")
        if not 1 <= self.k <= e:
            raise UnsupportedError(f"{where}: top-k {self.k} out of range 1..{e}")
        for attr, allowed in (("scoring", SCORINGS), ("order", ORDERS),
                              ("activation", ACTIVATIONS)):
            if getattr(self, attr) not in allowed:
                raise UnsupportedError(f"{where}: {attr}={getattr(self, attr)!r} is not one of "
                                       f"{', '.join(allowed)}")


Recognizer = Callable[[nn.Module, str], "MoESpec | None"]
_USER_RECOGNIZERS: list[Recognizer] = []

_K_ATTRS = ("top_k", "num_experts_per_tok", "topk", "k", "num_selected_experts", "moe_top_k")
_NORM_ATTRS = ("norm_topk_prob", "norm_topk", "renormalize", "normalize_topk")
_ORDER_ATTRS = ("routing", "routing_order", "order", "router_type")
_PROBE_TOKENS = 16


def register_moe_recognizer(fn: Recognizer) -> Recognizer:
    """Add a recogniser `fn(module, path) -> MoESpec | None`; usable as a decorator.

    User recognisers run before the built-in structural one, newest first. The spec a user
    recogniser returns is checked against the block's own output on random inputs."""
    _USER_RECOGNIZERS.insert(0, fn)
    return fn


def unregister_moe_recognizer(fn: Recognizer) -> None:
    """Remove a recogniser added with `register_moe_recognizer`."""
    _USER_RECOGNIZERS.remove(fn)


def recognize_moe(module: nn.Module, path: str) -> MoESpec | None:
    """The spec of `module` if some recogniser takes it as an MoE block, else None."""
    where = _where(module, path)
    for fn in list(_USER_RECOGNIZERS):
        spec = fn(module, path)
        if spec is not None:
            spec.validate(where)
            spec.router_is_param = _router_tensors(module, spec.router_name, where)[2]
            probe = _Probe(module, spec.router_weight.shape[1], where, spec.router_name)
            cand = _Candidate(spec.w_gate, spec.w_up, spec.w_down, spec.activation)
            if not probe.matches(cand, spec.k, spec.scoring, spec.order, spec.norm_topk,
                                 spec.scale):
                raise UnsupportedError(f"{where}: the MoESpec from recogniser {fn.__name__} "
                                       "does not reproduce the block's output")
            spec.returns_logits = probe.returns_logits
            return spec
    return recognize_structural(module, path)


# --------------------------------------------------------------------------- structure


@dataclass
class _Candidate:
    """Expert weights in canonical layout plus an activation: one way to read the experts."""

    w_gate: torch.Tensor | None
    w_up: torch.Tensor
    w_down: torch.Tensor
    activation: str


def _where(module: nn.Module, path: str) -> str:
    return f"MoE block '{path or '<root>'}' ({type(module).__name__})"


def _mlp_linears(m: nn.Module) -> dict[str, nn.Linear] | None:
    """The Linear children of an expert-like MLP, or None if `m` is not one."""
    if any(True for _ in m.parameters(recurse=False)):
        return None
    lins: dict[str, nn.Linear] = {}
    for name, child in m.named_children():
        if isinstance(child, nn.Linear):
            lins[name] = child
        elif any(True for _ in child.parameters()):
            return None
    return lins if 2 <= len(lins) <= 3 else None


def _find_expert_list(block: nn.Module) -> tuple[str, nn.ModuleList] | None:
    for name, child in block.named_children():
        if isinstance(child, nn.ModuleList) and len(child) >= 2:
            kinds = {type(m) for m in child}
            if len(kinds) == 1 and all(_mlp_linears(m) is not None for m in child):
                return name, child
    return None


def _find_stacked(block: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """3-D parameters owned by the block or by parameter-only children, grouped by the most
    common leading dim (>= 2 of them, else empty)."""
    found = [(n, p) for n, p in block.named_parameters(recurse=False) if p.dim() == 3]
    for cname, child in block.named_children():
        if next(child.children(), None) is None and not isinstance(child, nn.Linear):
            found += [(f"{cname}.{n}", p) for n, p in child.named_parameters() if p.dim() == 3]
    by_e: dict[int, list[tuple[str, torch.Tensor]]] = {}
    for n, p in found:
        by_e.setdefault(int(p.shape[0]), []).append((n, p))
    best = max(by_e.values(), key=len, default=[])
    return best if len(best) >= 2 and best[0][1].shape[0] >= 2 else []


def _find_router(block: nn.Module, e: int, skip: str) -> tuple[str, nn.Linear] | None:
    cands = [(n, m) for n, m in block.named_modules()
             if n and isinstance(m, nn.Linear) and m.out_features == e
             and not (n == skip or n.startswith(skip + ".")) and n.count(".") <= 1]
    cands.sort(key=lambda c: (not any(w in c[0] for w in ("gate", "router")), c[0].count(".")))
    return cands[0] if cands else None


def _role_score(name: str, role: str) -> int:
    n = name.lower()
    keys = {"gate": ("gate", "w1", "wi_0"), "up": ("up", "w3", "fc1", "wi_1", "c_fc", "wi"),
            "down": ("down", "w2", "fc2", "wo", "c_proj")}[role]
    return 0 if any(n == k or k in n for k in keys) else 1


def _act_hints(m: nn.Module) -> list[str]:
    hints = []
    for child in m.modules():
        if isinstance(child, nn.SiLU):
            hints.append("silu")
        elif isinstance(child, nn.GELU):
            hints.append("gelu" if child.approximate == "none" else "gelu_tanh")
        elif isinstance(child, nn.ReLU):
            hints.append("relu")
    for attr in ("act_fn", "activation", "act", "hidden_act"):
        v = getattr(m, attr, None)
        name = v if isinstance(v, str) else getattr(v, "__name__", "")
        if name in ACTIVATIONS:
            hints.append(name)
    return list(dict.fromkeys(hints + list(ACTIVATIONS)))


def _list_candidates(experts: nn.ModuleList, h: int) -> Iterator[_Candidate]:
    """Ways to read a ModuleList of MLPs as stacked weights, most plausible first."""
    lins = _mlp_linears(experts[0])
    assert lins is not None
    names = list(lins)
    roles = ("gate", "up", "down") if len(names) == 3 else ("up", "down")
    perms = sorted(itertools.permutations(names),
                   key=lambda p: sum(_role_score(n, r) for n, r in zip(p, roles, strict=True)))
    for perm in perms:
        assign = dict(zip(roles, perm, strict=True))
        down = lins[assign["down"]]
        ins = [lins[assign[r]] for r in roles if r != "down"]
        if down.out_features != h or any(
                (lin.in_features, lin.out_features) != (h, down.in_features) for lin in ins):
            continue

        def stack(role: str, assign: dict[str, str] = assign) -> torch.Tensor:
            return torch.stack([ex.get_submodule(assign[role]).weight.detach() for ex in experts])

        w_gate = stack("gate") if "gate" in assign else None
        w_up, w_down = stack("up"), stack("down")
        for act in _act_hints(experts[0]):
            yield _Candidate(w_gate, w_up, w_down, act)


def _stacked_candidates(params: list[tuple[str, torch.Tensor]], h: int,
                        acts: list[str]) -> Iterator[_Candidate]:
    """Ways to read 3-D expert parameters as (w_gate, w_up, w_down), most plausible first."""
    def orient(p: torch.Tensor, rows: int | None, cols: int) -> list[torch.Tensor]:
        out = []
        for q in (p, p.transpose(1, 2)):
            if q.shape[2] == cols and (rows is None or q.shape[1] == rows):
                out.append(q.detach())
        return out[:1] if len(out) == 2 and torch.equal(out[0], out[1]) else out

    named = sorted(params, key=lambda np_: _role_score(np_[0], "down"))
    for d_name, d in named:
        rest = [p for n, p in params if n != d_name]
        rest_names = [n for n, _ in params if n != d_name]
        for w_down in orient(d, h, d.shape[1] if d.shape[2] == h else d.shape[2]):
            i = w_down.shape[2]
            combos: list[tuple[torch.Tensor | None, torch.Tensor]] = []
            if len(rest) == 2:
                order = sorted(range(2), key=lambda j: _role_score(rest_names[j], "gate"))
                for g_idx in order:
                    for g in orient(rest[g_idx], i, h):
                        for u in orient(rest[1 - g_idx], i, h):
                            combos.append((g, u))
            elif len(rest) == 1:
                for fused in orient(rest[0], 2 * i, h):
                    a, b = fused[:, :i], fused[:, i:]
                    combos += [(a, b), (b, a)]
                combos += [(None, u) for u in orient(rest[0], i, h)]
            for (g, u), act in itertools.product(combos, acts):
                yield _Candidate(g, u, w_down, act)


# --------------------------------------------------------------------------- probing


def _router_tensors(block: nn.Module, name: str, where: str
                    ) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """(weight, bias, is_param) of the router at `name`: a module with `.weight` or a parameter."""
    try:
        mod = block.get_submodule(name)
        return mod.weight, getattr(mod, "bias", None), False
    except AttributeError:
        pass
    try:
        return block.get_parameter(name), None, True
    except AttributeError:
        raise UnsupportedError(f"{where}: router '{name}' is neither a submodule with a weight "
                               "nor a parameter of the block") from None


class _Probe:
    """Runs a block on random tokens, with its own router and with a random one, and compares
    candidate specs against both outputs."""

    def __init__(self, block: nn.Module, h: int, where: str, router_name: str) -> None:
        weight, bias, _ = _router_tensors(block, router_name, where)
        dev, dt = weight.device, weight.dtype
        gen = torch.Generator().manual_seed(1234)
        self.x = torch.randn(_PROBE_TOKENS, h, generator=gen).to(dev, dt)
        self.where = where
        self.tol = 2e-3 if dt == torch.float32 else 5e-2
        self.returns_logits = False
        # the second run uses a random router with logits of unit spread and no bias, so that
        # routings that a skewed router makes look alike (e.g. renormalised or not) differ
        rand_w = (torch.randn(weight.shape, generator=gen) * h ** -0.5).to(dev, dt)
        rand_b = None if bias is None else torch.zeros_like(bias)
        self.routers = [(weight.detach().clone(), None if bias is None else bias.detach().clone()),
                        (rand_w, rand_b)]
        self.outs = [self._run(block)]
        try:
            with torch.no_grad():
                weight.copy_(rand_w)
                if bias is not None:
                    bias.zero_()
            self.outs.append(self._run(block))
        finally:
            with torch.no_grad():
                weight.copy_(self.routers[0][0])
                if bias is not None:
                    bias.copy_(self.routers[0][1])
        self._ffn: dict[int, torch.Tensor] = {}

    def _run(self, block: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            try:
                out = block(self.x)
            except Exception as first:  # some blocks want [batch, seq, H]
                try:
                    out = block(self.x[None])
                except Exception:
                    raise UnsupportedError(f"{self.where}: calling the block on a random "
                                           f"[{_PROBE_TOKENS}, H] input failed: {first}"
                                           ) from first
        if isinstance(out, tuple):
            self.returns_logits = len(out) == 2
            out = out[0]
        return out.reshape(self.x.shape).float()

    def ffn_outputs(self, cand: _Candidate) -> torch.Tensor:
        """[E, T, H]: every expert applied to every probe token."""
        key = id(cand)
        if key not in self._ffn:
            x = self.x.float()
            up = torch.einsum("th,eih->eti", x, cand.w_up.float())
            if cand.w_gate is not None:
                gate = torch.einsum("th,eih->eti", x, cand.w_gate.float())
                hid = activate(gate, cand.activation) * up
            else:
                hid = activate(up, cand.activation)
            self._ffn.clear()
            self._ffn[key] = torch.einsum("eti,ehi->eth", hid, cand.w_down.float())
        return self._ffn[key]

    def matches(self, cand: _Candidate, k: int, scoring: str, order: str, norm: bool,
                scale: float) -> bool:
        y = self.ffn_outputs(cand)
        rows = torch.arange(self.x.shape[0])[:, None]
        for (weight, bias), ref in zip(self.routers, self.outs, strict=True):
            logits = torch.nn.functional.linear(self.x, weight, bias)
            w, ids = route(logits, k, scoring, order, norm, scale)
            got = (w[..., None] * y[ids, rows]).sum(dim=1)
            err = (got - ref).abs().max() / ref.abs().max().clamp_min(1e-12)
            if not bool(err <= self.tol):
                return False
        return True

    def check_experts(self, experts: nn.ModuleList, cand: _Candidate) -> bool:
        """Whether `cand` reproduces each expert module called on the probe tokens."""
        with torch.no_grad():
            y = self.ffn_outputs(cand)
            for e, ex in enumerate(experts):
                ref = ex(self.x).float()
                if not bool((y[e] - ref).abs().max() <= self.tol * ref.abs().max() + 1e-9):
                    return False
        return True


def _hints(block: nn.Module, e: int) -> tuple[list[int], list[str], list[str], list[bool], float]:
    ks = [int(v) for a in _K_ATTRS if isinstance(v := getattr(block, a, None), int)
          and not isinstance(v, bool) and 1 <= v <= e]
    ks = list(dict.fromkeys(ks + list(range(1, e + 1))))
    order = [o for a in _ORDER_ATTRS if isinstance(v := getattr(block, a, None), str)
             for o, keys in (("topk_score", ("topk_softmax", "topk_score", "topk_sigmoid")),
                             ("score_topk", ("softmax_topk", "score_topk", "sigmoid_topk")))
             if v in keys]
    orders = list(dict.fromkeys(order + list(ORDERS)))
    scoring = getattr(block, "scoring_func", None)
    scorings = list(dict.fromkeys(([scoring] if scoring in SCORINGS else []) + list(SCORINGS)))
    norm = [bool(v) for a in _NORM_ATTRS if isinstance(v := getattr(block, a, None), bool)]
    norms = list(dict.fromkeys(norm + [False, True]))
    scale = getattr(block, "routed_scaling_factor", 1.0)
    return ks, scorings, orders, norms, float(scale) if isinstance(scale, (int, float)) else 1.0


def recognize_structural(block: nn.Module, path: str) -> MoESpec | None:
    """The built-in recogniser (see the module docstring). None if `block` has no experts."""
    where = _where(block, path)
    listed = _find_expert_list(block)
    stacked = [] if listed else _find_stacked(block)
    if listed:
        experts_name, e = listed[0], len(listed[1])
    elif stacked:
        owners = {n.rsplit(".", 1)[0] if "." in n else "" for n, _ in stacked}
        experts_name = owners.pop() if len(owners) == 1 and "" not in owners else ", ".join(
            n for n, _ in stacked)
        e = int(stacked[0][1].shape[0])
    else:
        return None
    router = _find_router(block, e, experts_name if listed else "\0")
    if router is None:
        if "expert" in experts_name.lower() or "moe" in type(block).__name__.lower():
            raise UnsupportedError(f"{where}: found {e} experts ('{experts_name}') but no "
                                   f"router: no nn.Linear with out_features={e} in the block")
        return None
    router_name, router_mod = router
    h = router_mod.in_features
    probe = _Probe(block, h, where, router_name)
    if listed:
        biased = [n for n, m in listed[1][0].named_children()
                  if isinstance(m, nn.Linear) and m.bias is not None]
        if biased:
            raise UnsupportedError(f"{where}: expert linears {', '.join(biased)} have a bias; "
                                   "moe.experts supports bias-free experts only")
        cands = [c for c in _list_candidates(listed[1], h) if probe.check_experts(listed[1], c)]
        if not cands:
            raise UnsupportedError(
                f"{where}: expert MLP '{experts_name}.0' ({type(listed[1][0]).__name__}) not "
                "recognised: its output is not down(act(gate(x)) * up(x)) or down(act(up(x))) "
                f"with act in {'/'.join(ACTIVATIONS)} and bias-free linears")
        cands = cands[:1]
    else:
        cands = list(_stacked_candidates(stacked, h, _act_hints(block)))
        if not cands:
            shapes = ", ".join(f"{n} {tuple(p.shape)}" for n, p in stacked)
            raise UnsupportedError(f"{where}: expert weights ({shapes}) do not fit hidden size "
                                   f"{h} as gate/up [E, I, H] and down [E, H, I] (or transposed)")
    bias = router_mod.bias.detach() if router_mod.bias is not None else None
    ks, scorings, orders, norms, scale = _hints(block, e)
    routings = [(k, s, o, nrm) for k in ks for s in scorings for o in orders for nrm in norms
                if not (o == "topk_score" and nrm)]
    for cand in cands:
        for k, s, o, nrm in routings:
            if probe.matches(cand, k, s, o, nrm, scale):
                return MoESpec(router_weight=router_mod.weight, w_up=cand.w_up,
                               w_down=cand.w_down, w_gate=cand.w_gate, k=k, scoring=s, order=o,
                               norm_topk=nrm, activation=cand.activation, scale=scale,
                               router_bias=bias, router_name=router_name,
                               returns_logits=probe.returns_logits)
    extra = [n for n, c in block.named_children()
             if n not in (experts_name, router_name.split(".")[0])
             and any(True for _ in c.parameters())]
    what = ("top-k routing not found" if listed else
            "no reading of the expert weights and top-k routing found")
    msg = (f"{where}: {what}: with router '{router_name}' no combination of "
           f"scoring {'/'.join(SCORINGS)}, order softmax->topk or topk->softmax, k in 1..{e} "
           "and renormalisation on/off reproduces the block's output")
    if extra:
        msg += f"; the block also owns parts the recogniser does not model: {', '.join(extra)}"
    raise UnsupportedError(msg)
