"""The frontend's torch form of the routing and expert semantics (what the recogniser probes
with and what the exported custom ops compute) equals the IR's numpy reference, variant by
variant."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moec.frontend.moe_op import experts_forward, route
from moec.ir.moe_ops import router_ref
from moec.ir.registry import get_op

T, H, E, I = 37, 12, 8, 10

ROUTINGS = {
    "softmax-norm": dict(k=2, norm_topk=True),
    "sigmoid-topk-score": dict(k=1, scoring="sigmoid", order="topk_score"),
    "grouped-max-scaled": dict(k=3, n_groups=4, topk_groups=2, scale=1.5),
    "deepseek-v3": dict(k=2, scoring="sigmoid", norm_topk=True, n_groups=4, topk_groups=2,
                        group_score="top2_sum", scale=2.5, select_bias=True),
    "sparsemixer": dict(k=2, order="sparsemixer", jitter_eps=0.1),
    "sparsemixer-k3": dict(k=3, order="sparsemixer", jitter_eps=0.3),
    "capacity": dict(k=2, capacity=5, norm_topk=True),
    "logit-bias": dict(k=2, logit_bias=True),
}


@pytest.mark.parametrize("name", list(ROUTINGS))
def test_route_matches_the_router_reference(name):
    rng = np.random.default_rng(len(name))
    a = get_op("moe.router").check_attrs({k: v for k, v in ROUTINGS[name].items()})
    x = rng.standard_normal((T, H)).astype(np.float32)
    w = rng.standard_normal((E, H)).astype(np.float32) * 0.5
    lb = rng.standard_normal(E).astype(np.float32) if a["logit_bias"] else None
    sb = rng.standard_normal(E).astype(np.float32) * 0.3 if a["select_bias"] else None
    want_w, want_ids = router_ref(x, w, sb, a, logit_bias=lb)
    logits = torch.nn.functional.linear(torch.from_numpy(x), torch.from_numpy(w),
                                        None if lb is None else torch.from_numpy(lb))
    got_w, got_ids = route(logits, a["k"], a["scoring"], a["order"], a["norm_topk"], a["scale"],
                           None if sb is None else torch.from_numpy(sb), a["n_groups"],
                           a["topk_groups"], a["group_score"], a["capacity"], a["jitter_eps"])
    np.testing.assert_array_equal(got_ids.numpy(), want_ids)
    np.testing.assert_allclose(got_w.numpy(), want_w, rtol=1e-5, atol=1e-7)
    if a["capacity"]:
        assert (want_w == 0).any()  # some slots were over capacity


@pytest.mark.parametrize("activation,gated,bias,weight_on", [
    ("silu", True, False, "output"), ("clamped_swiglu", True, True, "output"),
    ("gelu_tanh", False, True, "output"), ("silu", True, False, "input"),
    ("relu", False, False, "input")])
def test_experts_match_the_experts_reference(activation, gated, bias, weight_on):
    gen = torch.Generator().manual_seed(3)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    x, w = rnd(T, H), rnd(T, 2).abs()
    ids = torch.stack([torch.randperm(E, generator=gen)[:2] for _ in range(T)]).int()
    ws = [rnd(E, I, H) if gated else None, rnd(E, I, H), rnd(E, H, I)]
    bs = [rnd(E, I) if gated else None, rnd(E, I), rnd(E, H)] if bias else [None] * 3
    got = experts_forward(x, w, ids, *ws, *bs, activation, 1.3, 2.0, weight_on)
    a = get_op("moe.experts").check_attrs(dict(activation=activation, gated=gated, bias=bias,
                                               alpha=1.3, limit=2.0, weight_on=weight_on))
    operands = [t.numpy() for t in (x, w, ids, *ws, *bs) if t is not None]
    (want,) = get_op("moe.experts").reference(operands, a)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-4)
