"""Probing: run an MoE block on random tokens and find the routing that reproduces its output.

The block runs in a few scenarios: its own router; a random router (unit logit spread, random
logit and selection biases, so that routings a skewed router makes look alike differ and unused
biases show); with an `expert_capacity` hint, a router that sends every token to one expert, with
more tokens than the capacity; with a clamped-SwiGLU limit hinted, the block's own router on
tokens scaled so that about two thirds of the expert pre-activations lie past the limit (a probe
on small values cannot tell a clamp from none, nor one clamped form from another). A candidate
(expert reading + routing + where the weight applies) is taken when it reproduces the block's
output in every scenario. Routing candidates are routed once per scenario and scored for all of
them at once per expert reading.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from moec.errors import UnsupportedError
from moec.frontend.moe_op import GROUP_SCORES, ORDERS, SCORINGS, activate, glu, route
from moec.frontend.moe_parts import Parts, Reading

PROBE_TOKENS = 16
# a float16/bfloat16 router rounds its logits, and with many experts and a large top-k half the
# tokens sit on a near-tie at the top-k boundary (Qwen3-30B's 128 experts, top-8, in bf16):
# more probe tokens keep enough untied ones to tell the candidate routings apart
PROBE_TOKENS_HALF = 64
_K_ATTRS = ("top_k", "num_experts_per_tok", "topk", "k", "num_selected_experts", "moe_top_k")
_NORM_ATTRS = ("norm_topk_prob", "norm_topk", "renormalize", "normalize_topk",
               "moe_normalize_expert_weights")
_ORDER_ATTRS = ("routing", "routing_order", "order", "router_type")
_GROUP_ATTRS = ("n_group", "num_group", "n_groups", "num_groups", "num_expert_group")
_TOPK_GROUP_ATTRS = ("topk_group", "topk_groups", "num_topk_groups")
_SCALE_ATTRS = ("routed_scaling_factor", "routing_scale", "scaling_factor")
_EPS_ATTRS = ("router_jitter_noise", "jitter_eps", "moe_jitter_eps")
CAPACITY_ATTRS = ("expert_capacity", "capacity")
_SCORING_ALIASES = {"sqrtsoftplus": "sqrt_softplus", "sqrt_softplus": "sqrt_softplus"}


class NotCallableError(UnsupportedError):
    """The block has experts and a router but cannot be called as block(x): it is not taken for
    an MoE block (it may be, e.g., JetMoE's mixture of attention heads)."""


@dataclass(frozen=True)
class Routing:
    """One routing candidate: the moe.router attributes plus whether the selection bias is used."""

    k: int
    scoring: str = "softmax"
    order: str = "score_topk"
    norm_topk: bool = False
    scale: float = 1.0
    n_groups: int = 1
    topk_groups: int = 1
    group_score: str = "max"
    capacity: int = 0
    jitter_eps: float = 0.01
    select_bias: bool = False


def hint_values(sources: list[object], names: tuple[str, ...], kind: type | tuple) -> list:
    """Values of the attributes `names` of `sources` that are of type `kind`."""
    out = []
    for src in sources:
        for a in names:
            v = getattr(src, a, None)
            if isinstance(v, kind) and not (kind is not bool and isinstance(v, bool)):
                out.append(v)
    return out


def routings(sources: list[object], e: int, has_select_bias: bool,
             hinted_k: bool = False) -> list[Routing]:
    """Routing candidates, those the attributes of `sources` hint at first; with `hinted_k`
    only the hinted top-k values (all when there is no hint), which keeps large E cheap."""
    k_hints = [v for v in hint_values(sources, _K_ATTRS, int) if 1 <= v <= e]
    ks = list(dict.fromkeys(k_hints + ([] if hinted_k and k_hints else list(range(1, e + 1)))))
    hinted = [o for v in hint_values(sources, _ORDER_ATTRS, str)
              for o, keys in (("topk_score", ("topk_softmax", "topk_score", "topk_sigmoid")),
                              ("score_topk", ("softmax_topk", "score_topk", "sigmoid_topk")))
              if v in keys]
    orders = list(dict.fromkeys(hinted + list(ORDERS)))
    hinted_scoring = [_SCORING_ALIASES.get(v, v) for v in hint_values(
        sources, ("scoring_func", "score_func", "scoring"), str)]
    # sqrt-softplus (rare) only when hinted or when every candidate is wanted
    scorings = list(dict.fromkeys([v for v in hinted_scoring if v in SCORINGS] + [
        s for s in SCORINGS if s != "sqrt_softplus" or not hinted_k]))
    norm_hint = [bool(v) if isinstance(v, bool) else v == 1
                 for v in hint_values(sources, _NORM_ATTRS, (bool, int, float))]
    norms = list(dict.fromkeys(norm_hint + [False, True]))
    scales = list(dict.fromkeys([float(v) for v in hint_values(sources, _SCALE_ATTRS, (int, float))]
                                + [1.0]))
    eps = ([float(v) for v in hint_values(sources, _EPS_ATTRS, (int, float))] + [0.01])[0]
    caps = [v for v in hint_values(sources, CAPACITY_ATTRS, int) if v > 0]
    caps = list(dict.fromkeys(caps[:1] + [0]))
    groups = [(1, 1, "max")]
    ng = [v for v in hint_values(sources, _GROUP_ATTRS, int) if v > 1 and e % v == 0]
    kg = [v for v in hint_values(sources, _TOPK_GROUP_ATTRS, int) if v >= 1]
    if ng and kg and kg[0] <= ng[0]:
        groups = [(ng[0], kg[0], gs) for gs in GROUP_SCORES
                  if gs == "max" or e // ng[0] >= 2] + groups
    sels = [True, False] if has_select_bias else [False]
    out = []
    for k in ks:
        for scoring in scorings:
            for order in orders:
                if order == "sparsemixer" and scoring != "softmax":
                    continue
                variants = [(n, g, s) for n in norms for g in groups for s in sels
                            if k <= g[1] * (e // g[0])] if order == "score_topk" else \
                    [(False, (1, 1, "max"), False)]
                for (norm, (n_g, k_g, gs), sel), scale, cap in (
                        (v, s, c) for v in variants for s in scales for c in caps):
                    out.append(Routing(k, scoring, order, norm, scale, n_g, k_g, gs, cap, eps,
                                       sel))
    return out


@dataclass
class _Scenario:
    x: torch.Tensor  # [T, H] f32 probe tokens
    weight: torch.Tensor  # router weight [E, H] used in this scenario
    bias: torch.Tensor | None
    select_bias: torch.Tensor | None
    out: torch.Tensor | None = None  # the block's output, [T, H] f32
    aux: torch.Tensor | None = None  # its second output, if any
    shared: torch.Tensor | None = None  # shared experts, [T, H] f32
    out_bias: torch.Tensor | None = None  # the block's output bias, [H] f32


class Probe:
    """Runs a block in the probe scenarios and matches candidates against its outputs."""

    def __init__(self, block: nn.Module, parts: Parts, where: str, capacity: int = 0) -> None:
        self.block, self.parts, self.where = block, parts, where
        r = parts.router
        e, h = r.shape
        dev, dt = r.weight.device, r.weight.dtype
        gen = torch.Generator().manual_seed(1234)

        def rnd(*shape: int, std: float = 1.0) -> torch.Tensor:
            return (torch.randn(*shape, generator=gen) * std).to(dev, dt)

        self.tol = 2e-3 if dt == torch.float32 else 5e-2
        self.tuple_out = False
        self.shared_scale = 1.0  # the shared experts' coefficient (fitted by search_fitted)
        sel = parts.router.select_biases[0][1].reshape(-1) if parts.router.select_biases \
            else None
        x = rnd(PROBE_TOKENS if dt == torch.float32 else PROBE_TOKENS_HALF, h)
        own = _Scenario(x, r.weight.detach().clone(),
                        None if r.bias is None else r.bias.detach().clone(),
                        None if sel is None else sel.detach().clone())
        rand = _Scenario(x, rnd(e, h, std=h ** -0.5), None if r.bias is None else rnd(e, std=.5),
                         None if sel is None else rnd(e, std=0.2))
        self.scenarios = [own, rand]
        if 0 < capacity <= 4096:  # every token prefers expert 0; more tokens than the capacity
            v = rnd(h)
            w = torch.zeros_like(r.weight)
            w[0] = v * (8.0 / float(v.float().pow(2).sum()))
            xs = v + rnd(capacity + 4, h, std=0.05)
            self.scenarios.append(_Scenario(xs, w, None if r.bias is None else
                                            torch.zeros_like(r.bias), own.select_bias))
        large = _clamp_reaching(x, parts)
        if large is not None:
            self.scenarios.append(replace(own, x=large))
        for s in self.scenarios:
            self._run(s)
        self._ffn: dict[tuple[int, int], torch.Tensor] = {}
        self._ties: dict[tuple[int, int], torch.Tensor] = {}

    def _set_router(self, s: _Scenario) -> None:
        r = self.parts.router
        with torch.no_grad():
            r.weight.copy_(s.weight)
            if r.bias is not None:
                r.bias.copy_(s.bias)
            if r.select_biases:
                t = r.select_biases[0][1]
                t.copy_(s.select_bias.reshape(t.shape))

    def _run(self, s: _Scenario) -> None:
        self._set_router(s)
        try:
            with torch.no_grad():
                try:
                    out = self.block(s.x)
                except Exception as first:  # most blocks want [batch, seq, H]
                    try:
                        out = self.block(s.x[None])
                    except Exception as second:
                        raise NotCallableError(
                            f"{self.where}: calling the block on a random [{len(s.x)}, H] input "
                            f"failed: {type(first).__name__}: {first}; on [1, {len(s.x)}, H]: "
                            f"{type(second).__name__}: {second}") from first
                shared, out_bias = self._shared(s.x)
        finally:
            self._set_router(self.scenarios[0])
        if isinstance(out, tuple):
            self.tuple_out = True
            s.aux = out[1] if len(out) == 2 and isinstance(out[1], torch.Tensor) else None
            out = out[0]
        s.out = out.reshape(s.x.shape).float()
        s.shared, s.out_bias = shared, out_bias

    def _shared(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(the shared experts' output, gated as the block gates it; the output bias)."""
        p, b = self.parts, self.block
        bias = b.get_parameter(p.out_bias).float() if p.out_bias is not None else None
        if not p.shared:
            return None, bias
        total = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for name in p.shared:
            total += b.get_submodule(name)(x).float()
        if p.shared_gate is not None:
            total *= torch.sigmoid(b.get_submodule(p.shared_gate)(x).float())
        return total, bias

    def _rest(self, s: _Scenario, shared_scale: float | torch.Tensor) -> torch.Tensor | float:
        """What the block adds to the routed experts: shared experts (times their coefficient)
        and output bias."""
        rest: torch.Tensor | float = 0.0
        if s.shared is not None:
            rest = s.shared * shared_scale
        if s.out_bias is not None:
            rest = rest + s.out_bias
        return rest

    # ------------------------------------------------------------------ candidates
    def ffn(self, ri: int, reading: Reading, si: int) -> torch.Tensor:
        """[E, T, H]: every expert of `reading` applied to every token of scenario si; identity
        experts (after the FFN ones) give the token itself."""
        key = (ri, si)
        if key not in self._ffn:
            if len(self._ffn) > 8:
                self._ffn.clear()
            x = self.scenarios[si].x.float()
            y = _all_experts(x, reading)
            z = self.parts.experts.identity
            self._ffn[key] = torch.cat([y, x.expand(z, *x.shape)]) if z else y
        return self._ffn[key]

    def route(self, ro: Routing, si: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.scenarios[si]
        logits = F.linear(s.x.float(), s.weight.float(), None if s.bias is None else s.bias.float())
        return route(logits, ro.k, ro.scoring, ro.order, ro.norm_topk, ro.scale,
                     s.select_bias if ro.select_bias else None, ro.n_groups, ro.topk_groups,
                     ro.group_score, ro.capacity, ro.jitter_eps)

    def _err(self, got: torch.Tensor, s: _Scenario, k: int) -> torch.Tensor:
        """max |got - out| / max |out| over the scenario's tokens, leaving out the tokens whose
        top-(k+1) router logits are a tie at the router's precision (see `_tied`)."""
        got = got + self._rest(s, self.shared_scale)
        per_token = (got - s.out).abs().amax(dim=-1)
        per_token = per_token.masked_fill(self._tied(s, k), 0.0)
        return per_token.amax(dim=-1) / s.out.abs().max().clamp_min(1e-12)

    def _tied(self, s: _Scenario, k: int) -> torch.Tensor:
        """bool [T]: tokens whose k-th and (k+1)-th largest router logits (float32) are closer
        than the rounding step of the router's dtype (for k <= 2, whose routings may weigh the
        chosen experts by their order, any two of the k+1 largest). A float16/bfloat16 block
        computes its logits in that dtype, where such a pair may round to a tie or swap, so its
        choice among them is not evidence for or against a candidate routing. None in float32,
        and none where fewer than a quarter of the tokens would be left to compare."""
        key = (id(s), k)
        if key not in self._ties:
            dt = s.weight.dtype
            if dt == torch.float32:
                self._ties[key] = torch.zeros(len(s.x), dtype=torch.bool, device=s.x.device)
            else:
                logits = F.linear(s.x.float(), s.weight.float(),
                                  None if s.bias is None else s.bias.float())
                top = logits.topk(min(k + 1, logits.shape[-1]), dim=-1).values
                step = 2.0 * torch.finfo(dt).eps * top.abs().amax(dim=-1, keepdim=True)
                gaps = top[:, :-1] - top[:, 1:]
                if k > 2:  # only the boundary decides which experts are chosen
                    gaps = gaps[:, k - 1:k]
                tied = (gaps <= step).any(dim=-1)
                # a scenario made of ties (one built so) proves nothing if all are left out
                self._ties[key] = tied if tied.float().mean() <= 0.75 else tied & False
        return self._ties[key]

    def search(self, readings: list[Reading], cands: list[Routing]
               ) -> tuple[Reading, Routing, str] | None:
        """The first (reading, routing, weight_on) that reproduces every scenario."""
        routed = [[self.route(ro, si) for si in range(len(self.scenarios))] for ro in cands]
        by_k: dict[int, list[int]] = {}
        for i, ro in enumerate(cands):
            by_k.setdefault(ro.k, []).append(i)
        for ri, reading in enumerate(readings):
            ok = torch.ones(len(cands), dtype=torch.bool)
            wide = _float32(reading)
            for si, s in enumerate(self.scenarios):
                y = self.ffn(ri, wide, si)
                rows = torch.arange(len(s.x))[:, None]
                for k, idx in by_k.items():
                    live = [i for i in idx if ok[i]]
                    chunk = max(1, (1 << 23) // max(1, y[0].numel() * k))  # [R, T, k, H] size
                    for c in range(0, len(live), chunk):
                        part = live[c:c + chunk]
                        w = torch.stack([routed[i][si][0] for i in part])
                        ids = torch.stack([routed[i][si][1] for i in part])
                        got = (w[..., None] * y[ids, rows]).sum(dim=2)
                        ok[part] = self._err(got, s, k) <= self.tol
            first = int(ok.nonzero()[0]) if ok.any() else None
            if first is not None:
                return reading, cands[first], "output"
        # the weight scales the expert's input (Llama 4): plain routings only, one at a time
        plain = [i for i, ro in enumerate(cands) if not ro.norm_topk and ro.n_groups == 1
                 and not ro.select_bias and ro.scale == 1.0 and ro.capacity == 0
                 and not self.parts.experts.identity]
        for reading in readings if plain else ():
            wide = _float32(reading)
            for i in plain:
                if all(bool(self._err(_weighted_input(s.x.float(), *routed[i][si], wide), s,
                                      cands[i].k)
                            <= self.tol) for si, s in enumerate(self.scenarios)):
                    return reading, cands[i], "input"
        return None

    def search_fitted(self, readings: list[Reading], cands: list[Routing]
                      ) -> tuple[Reading, Routing, str] | None:
        """Like `search` (expert output weighted), with two constants fitted instead of read
        from attributes: the block's output is taken as `a * routed + b * shared (+ output
        bias)`, with a and b least-squares over every scenario at once for each candidate (a
        routing or output scale under any name, an evaluation-time dropout factor 1 - p;
        `(routed + shared) / 2`). A candidate is taken when the fitted constants reproduce
        every scenario; a becomes its `scale`, b `self.shared_scale`."""
        cands = list(dict.fromkeys(replace(ro, scale=1.0) for ro in cands))
        routed = [[self.route(ro, si) for si in range(len(self.scenarios))] for ro in cands]
        shared = any(s.shared is not None for s in self.scenarios)
        for ri, reading in enumerate(readings):
            wide = _float32(reading)
            # per candidate: <g,g>, <g,sh>, <sh,sh>, <g,y>, <sh,y> with y = out - output bias
            stats = torch.zeros(5, len(cands), dtype=torch.float64)
            for si, s in enumerate(self.scenarios):
                y = s.out - (s.out_bias if s.out_bias is not None else 0.0)
                sh = s.shared if s.shared is not None else torch.zeros_like(s.out)
                for part, got in self._routed_outputs(ri, wide, si, cands, routed):
                    m = (~self._tied(s, cands[part[0]].k)).float()[:, None]
                    sel = torch.tensor(part)
                    stats[0, sel] += (got * got * m).sum(dim=(1, 2)).double()
                    stats[1, sel] += (got * sh * m).sum(dim=(1, 2)).double()
                    stats[2, sel] += float((sh * sh * m).sum())
                    stats[3, sel] += (got * y * m).sum(dim=(1, 2)).double()
                    stats[4, sel] += float((sh * y * m).sum())
            gg, gs, ss, gy, sy = stats
            if shared:
                det = gg * ss - gs * gs
                a, b = (gy * ss - gs * sy) / det, (gg * sy - gs * gy) / det
            else:
                a, b = gy / gg, torch.ones_like(gy)
            ok = torch.isfinite(a) & torch.isfinite(b) & (a.abs() > 1e-6)
            for si, s in enumerate(self.scenarios):
                for part, got in self._routed_outputs(ri, wide, si, cands, routed):
                    sel = torch.tensor(part)
                    errs = self._err_fitted(got, a[sel].float()[:, None, None],
                                            b[sel].float()[:, None, None], s, cands[part[0]].k)
                    ok[sel] &= errs <= self.tol
            if ok.any():
                i = int(ok.nonzero()[0])
                self.shared_scale = _snap(float(b[i])) if shared else 1.0
                return reading, replace(cands[i], scale=_snap(float(a[i]))), "output"
        return None

    def _routed_outputs(self, ri: int, wide: Reading, si: int, cands: list[Routing],
                        routed: list) -> list[tuple[list[int], torch.Tensor]]:
        """(candidate indices, their routed outputs [R, T, H]) in chunks of equal k."""
        y = self.ffn(ri, wide, si)
        rows = torch.arange(len(self.scenarios[si].x))[:, None]
        by_k: dict[int, list[int]] = {}
        for i, ro in enumerate(cands):
            by_k.setdefault(ro.k, []).append(i)
        out = []
        for k, idx in by_k.items():
            chunk = max(1, (1 << 22) // max(1, y[0].numel() * k))
            for c in range(0, len(idx), chunk):
                part = idx[c:c + chunk]
                w = torch.stack([routed[i][si][0] for i in part])
                ids = torch.stack([routed[i][si][1] for i in part])
                out.append((part, (w[..., None] * y[ids, rows]).sum(dim=2)))
        return out

    def _err_fitted(self, got: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: _Scenario,
                    k: int) -> torch.Tensor:
        pred = a * got + self._rest(s, b)
        per_token = (pred - s.out).abs().amax(dim=-1).masked_fill(self._tied(s, k), 0.0)
        return per_token.amax(dim=-1) / s.out.abs().max().clamp_min(1e-12)

    def check_experts(self, experts: list[nn.Module], reading: Reading) -> bool:
        """Whether `reading` reproduces each expert module called on the probe tokens."""
        x = self.scenarios[0].x
        with torch.no_grad():
            y = _all_experts(x.float(), _float32(reading))
            for e, ex in enumerate(experts):
                ref = ex(x).float()
                if not bool((y[e] - ref).abs().max() <= self.tol * ref.abs().max() + 1e-9):
                    return False
        return True

    def aux_kind(self, ro: Routing) -> str | None:
        """What the block's second output is: "logits", "weights" (routing), or None."""
        s = self.scenarios[0]
        if s.aux is None:
            if self.tuple_out:
                raise UnsupportedError(f"{self.where}: the block returns a tuple whose second "
                                       "element is not a tensor")
            return None
        logits = F.linear(s.x.float(), s.weight.float(), None if s.bias is None else s.bias.float())
        for kind, ref in (("logits", logits), ("weights", self.route(ro, 0)[0])):
            if s.aux.numel() == ref.numel() and torch.allclose(
                    s.aux.reshape(ref.shape).float(), ref, rtol=self.tol, atol=1e-5):
                return kind
        raise UnsupportedError(f"{self.where}: the block's second output "
                               f"{tuple(s.aux.shape)} is neither the router logits nor the "
                               "routing weights")


def _clamp_reaching(x: torch.Tensor, parts: Parts) -> torch.Tensor | None:
    """x scaled so that the median |pre-activation| of the experts (the first reading's up and
    gate projections) is 1.5 times the smallest clamped-SwiGLU limit among the readings, or
    None when no reading clamps."""
    limits = [rd.limit for rd in parts.experts.readings if rd.activation == "clamped_swiglu"]
    if not limits:
        return None
    rd = parts.experts.readings[0]
    with torch.no_grad():
        pre = [_proj(w, None, x.float(), "th,eoh->eto").abs().flatten()
               for w in (rd.w_up, rd.w_gate) if w is not None]
        med = float(torch.cat(pre).median())
    return x if med <= 0.0 else (x.float() * (1.5 * min(limits) / med)).to(x.dtype)


def _snap(v: float) -> float:
    """A fitted constant with the fewest decimals within 2e-6 of it (0.9 for 0.90000004): the
    constants blocks use are short; a long one is kept as it is."""
    for digits in range(1, 8):
        r = round(v, digits)
        if abs(r - v) <= 2e-6 * abs(v):
            return r
    return v


def _float32(rd: Reading) -> Reading:
    """`rd` with float32 weights and biases (a copy of half ones, made once per search rather
    than at every projection: Qwen3-30B's bf16 experts are 1.2 GB)."""
    names = ("w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down")
    half = {n: getattr(rd, n).float() for n in names
            if getattr(rd, n) is not None and getattr(rd, n).dtype != torch.float32}
    return replace(rd, **half) if half else rd


def _proj(w: torch.Tensor, b: torch.Tensor | None, v: torch.Tensor, spec: str) -> torch.Tensor:
    if spec in ("th,eoh->eto", "eth,eoh->eto"):  # a batched GEMM reading w transposed in place
        y = torch.matmul(v, w.float().transpose(-1, -2))  # (einsum copies w: 10x slower)
    else:
        y = torch.einsum(spec, v, w.float())
    if b is None:
        return y
    return y + (b.float()[:, None, :] if y.dim() == 3 else b.float())  # [E, O] or per-token


def _ffn(x: torch.Tensor, rd: Reading, first: str, second: str) -> torch.Tensor:
    up = _proj(rd.w_up, rd.b_up, x, first)
    if rd.w_gate is not None:
        h = glu(_proj(rd.w_gate, rd.b_gate, x, first), up, rd.activation, rd.alpha, rd.limit,
                 rd.offset)
    else:
        h = activate(up, rd.activation)
    return _proj(rd.w_down, rd.b_down, h, second)


def _all_experts(x: torch.Tensor, rd: Reading) -> torch.Tensor:
    """[E, T, H]: every expert applied to every token of x [T, H]."""
    return _ffn(x, rd, "th,eoh->eto", "eth,eoh->eto")


def _weighted_input(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, rd: Reading
                    ) -> torch.Tensor:
    """sum_j FFN_ids[t,j](w[t,j] * x[t]) for one routing."""
    out = torch.zeros_like(x)
    for j in range(ids.shape[1]):
        per_token = replace(rd, **{n: getattr(rd, n)[ids[:, j]] for n in
                                   ("w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down")
                                   if getattr(rd, n) is not None})
        out += _ffn(x * w[:, j:j + 1], per_token, "th,toh->to", "th,toh->to")
    return out
