"""The benchmark's MoE layers: shapes, seeded Hugging Face blocks, input pools with uniform or
Zipf-skewed routing, and the roofline model of one call.

Every block is a transformers sparse-MoE block (the family's own class, fp32) with weights drawn
from a seeded generator: router rows of unit norm (so that unit-variance inputs give logits of
standard deviation 1 and no expert is favoured by its row norm), expert weights scaled to keep
activations near unit size. Other systems get these very weights.

Skewed routing. A bias-free router cannot make every input prefer an expert, and the blocks stay
as shipped, so the router bias is applied through the inputs instead: every token of a skewed
pool gets the same offset `mu = pinv(W_router) @ b`, which adds exactly `b` to the router logits.
`b_e = sigma * sqrt(6) / pi * log p_e` with `p_e` proportional to `1 / rank_e ** s` (Zipf, ranks
a seeded permutation of the experts): with logit noise of standard deviation sigma this is the
Gumbel-top-k construction, so the first choice follows p approximately and expert popularity
falls off as Zipf. The measured popularity is reported (`routing_stats`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

ROUTINGS = ("uniform", "zipf")
DEFAULT_TOKENS = (1, 8, 64, 512, 2048)
DTYPES = {"float32": 4, "bfloat16": 2}  # the blocks' dtype -> bytes per weight


@dataclass(frozen=True)
class LayerShape:
    """One MoE layer of the benchmark. `shared_intermediate` 0 means no shared expert."""

    name: str
    family: str  # the transformers family whose block is built: mixtral, qwen3_moe, deepseek_v3
    hidden: int
    intermediate: int
    experts: int
    top_k: int
    description: str
    n_groups: int = 1
    topk_groups: int = 1
    shared_intermediate: int = 0
    routed_scale: float = 1.0

    def expert_bytes(self, itemsize: int = 4) -> int:
        """Bytes of one routed expert (gate, up and down projections)."""
        return 3 * self.hidden * self.intermediate * itemsize

    def always_bytes(self, itemsize: int = 4) -> int:
        """Bytes every call reads whatever the routing: router and shared expert."""
        return itemsize * (self.hidden * self.experts + 3 * self.hidden * self.shared_intermediate)

    def flops(self, tokens: int) -> int:
        """Useful FLOPs of one call: router, the k routed experts per token, shared expert."""
        per_token = (self.hidden * self.experts + 3 * self.hidden * self.intermediate * self.top_k
                     + 3 * self.hidden * self.shared_intermediate)
        return 2 * tokens * per_token

    def summary(self) -> dict[str, Any]:
        return asdict(self)


SHAPES: dict[str, LayerShape] = {
    "mixtral": LayerShape(
        "mixtral", "mixtral", 1024, 3584, 8, 2,
        "Mixtral-8x7B-like, scaled to 1/4 width (H 4096->1024, I 14336->3584), 8 experts, top-2"),
    "qwen3": LayerShape(
        "qwen3", "qwen3_moe", 2048, 768, 128, 8,
        "Qwen3-30B-A3B MoE layer at full size: H 2048, I 768, 128 experts, top-8, renormalised"),
    # DeepSeek-V3: 256 experts in 8 groups, top-4 groups, top-8 experts, sigmoid + correction
    # bias, routed_scaling_factor 2.5, one shared expert as wide as a routed one (2048). Scaled:
    # 64 experts in the same 8 groups with the same half of the groups kept (topk_group 4),
    # top-6, and a shared expert twice as wide as a routed one (512 = 2 x 256).
    "deepseek-v3": LayerShape(
        "deepseek-v3", "deepseek_v3", 1024, 256, 64, 6,
        "DeepSeek-V3-like, scaled: H 1024, I 256, 64 experts in 8 groups (top-4 groups), top-6, "
        "sigmoid + bias routing, x2.5, 1 shared expert of I 512",
        n_groups=8, topk_groups=4, shared_intermediate=512, routed_scale=2.5),
    # tiny layers for the CI test
    "tiny": LayerShape("tiny", "mixtral", 64, 96, 8, 2, "tiny Mixtral-family layer (tests)"),
    "tiny-deepseek": LayerShape(
        "tiny-deepseek", "deepseek_v3", 64, 32, 16, 3, "tiny DeepSeek-V3-family layer (tests)",
        n_groups=4, topk_groups=2, shared_intermediate=64, routed_scale=2.5),
}
DEFAULT_SHAPES = ("mixtral", "qwen3", "deepseek-v3")
EXPERTS_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")


def _config(shape: LayerShape, impl: str) -> Any:
    import transformers as tf

    s = shape
    if s.family == "mixtral":
        return tf.MixtralConfig(hidden_size=s.hidden, intermediate_size=s.intermediate,
                                num_local_experts=s.experts, num_experts_per_tok=s.top_k,
                                experts_implementation=impl)
    if s.family == "qwen3_moe":
        return tf.Qwen3MoeConfig(hidden_size=s.hidden, moe_intermediate_size=s.intermediate,
                                 num_experts=s.experts, num_experts_per_tok=s.top_k,
                                 norm_topk_prob=True, experts_implementation=impl)
    if s.family == "deepseek_v3":
        shared = s.shared_intermediate // s.intermediate
        if shared * s.intermediate != s.shared_intermediate:
            raise ValueError(f"{s.name}: the shared expert's width must be a multiple of I")
        return tf.DeepseekV3Config(hidden_size=s.hidden, moe_intermediate_size=s.intermediate,
                                   n_routed_experts=s.experts, num_experts_per_tok=s.top_k,
                                   n_shared_experts=shared, n_group=s.n_groups,
                                   topk_group=s.topk_groups, routed_scaling_factor=s.routed_scale,
                                   norm_topk_prob=True, experts_implementation=impl)
    raise ValueError(f"unknown family {s.family!r}")


def block_class(shape: LayerShape) -> type:
    if shape.family == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as cls
    elif shape.family == "qwen3_moe":
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as cls
    elif shape.family == "deepseek_v3":
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE as cls
    else:
        raise ValueError(f"unknown family {shape.family!r}")
    return cls


def build_block(shape: LayerShape, seed: int = 0, dtype: str = "float32") -> Any:
    """The family's transformers block, eval mode, experts implementation "eager", with seeded
    random weights (see the module docstring), drawn in float32 and then converted to `dtype`
    (bfloat16: the float32 weights rounded, as a bf16 checkpoint holds them)."""
    import torch

    cls = block_class(shape)
    with torch.device("meta"):
        block = cls(_config(shape, "eager"))
    block = block.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in sorted([*block.named_parameters(), *block.named_buffers()]):
            if "gate.weight" == name:  # the router: unit-norm rows
                t.copy_(torch.randn(t.shape, generator=gen))
                t.div_(t.norm(dim=1, keepdim=True))
            elif "correction_bias" in name:
                t.copy_(0.05 * torch.randn(t.shape, generator=gen))
            else:  # [.., out, in]: std 1/sqrt(in) keeps activations about unit size
                t.copy_(torch.randn(t.shape, generator=gen) * t.shape[-1] ** -0.5)
    return block.to(getattr(torch, dtype)).eval()


def sibling(block: Any, shape: LayerShape, impl: str) -> Any:
    """Another instance of `block`'s class running experts implementation `impl`, sharing its
    parameters and buffers (no copy) but with its own config object."""
    import torch

    with torch.device("meta"):
        other = block_class(shape)(_config(shape, impl))
    other.load_state_dict(block.state_dict(), assign=True)
    return other.eval()


def router_weight(block: Any) -> np.ndarray:
    return block.gate.weight.detach().float().numpy()


def block_dtype(block: Any) -> str:
    return str(block.gate.weight.dtype).removeprefix("torch.")


def to_block(block: Any, x: np.ndarray) -> Any:
    """x [T, H] (float32 numpy) as the torch tensor the block takes ([1, T, H], its dtype)."""
    import torch

    return torch.from_numpy(x)[None].to(block.gate.weight.dtype)


def route(block: Any, x: np.ndarray) -> np.ndarray:
    """Expert ids [T, k] the block's router picks for x [T, H]."""
    import torch

    with torch.inference_mode():
        return block.gate(to_block(block, x)[0])[2].numpy()


def zipf_offset(block: Any, shape: LayerShape, s: float, seed: int) -> np.ndarray:
    """The input offset [H] that adds the Zipf router bias b to every token's logits."""
    rng = np.random.default_rng(seed + 1000)
    ranks = rng.permutation(shape.experts) + 1
    p = 1.0 / ranks.astype(np.float64) ** s
    p /= p.sum()
    b = math.sqrt(6) / math.pi * np.log(p)  # sigma = 1: unit-norm router rows, unit inputs
    b -= b.mean()  # softmax ignores a shift; centring keeps the offset small
    w = router_weight(block).astype(np.float64)
    return (np.linalg.pinv(w) @ b).astype(np.float32)


def aligned(shape: tuple[int, ...]) -> np.ndarray:
    """An uninitialised fp32 array whose buffer is 64-byte aligned (moec's kernels then take it
    zero-copy; numpy's own allocations are only 16-byte aligned)."""
    import torch

    return torch.empty(shape, dtype=torch.float32).numpy()


@dataclass
class Pool:
    """`size` input arrays [tokens, H] for one case, drawn from one seeded generator; call i of
    every system takes `xs[i % size]`."""

    tokens: int
    routing: str
    xs: list[np.ndarray]
    ids: list[np.ndarray] = field(default_factory=list)  # the router's choice per input
    ties: list[np.ndarray] = field(default_factory=list)  # tokens on a routing near-tie


def make_pool(block: Any, shape: LayerShape, tokens: int, routing: str, size: int,
              seed: int = 0, zipf_s: float = 1.0) -> Pool:
    if routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
    rng = np.random.default_rng([seed, tokens, ROUTINGS.index(routing)])
    offset = zipf_offset(block, shape, zipf_s, seed) if routing == "zipf" else None
    half = block_dtype(block) != "float32"
    xs = []
    for _ in range(size):
        x = aligned((tokens, shape.hidden))
        x[...] = rng.standard_normal((tokens, shape.hidden), dtype=np.float32)
        if offset is not None:
            x += offset
        if half:  # values the block's dtype holds exactly: every system sees the same input
            x[...] = to_block(block, x)[0].float().numpy()
        xs.append(x)
    return Pool(tokens, routing, xs, [route(block, x) for x in xs],
                [tie_tokens(block, shape, x) for x in xs])


def routing_stats(shape: LayerShape, pool: Pool) -> dict[str, float]:
    """How the pool's tokens spread over the experts: distinct experts touched per call (mean),
    the share of (token, slot) pairs taken by the most popular expert, and the share taken by
    the top 10% of experts (uniform routing: about 1/E and 10%)."""
    counts = np.zeros(shape.experts, np.int64)
    distinct = []
    for ids in pool.ids:
        counts += np.bincount(ids.reshape(-1), minlength=shape.experts)
        distinct.append(len(np.unique(ids)))
    order = np.sort(counts)[::-1]
    top = max(1, shape.experts // 10)
    total = max(1, int(counts.sum()))
    return {"distinct_experts_mean": float(np.mean(distinct)),
            "top_expert_share": float(order[0] / total),
            "top10pct_share": float(order[:top].sum() / total)}


def traffic(shape: LayerShape, pool: Pool, itemsize: int = 4) -> dict[str, float]:
    """Work of one call, median over the pool's inputs: FLOPs, and bytes that must come from
    memory: the distinct routed experts the input's routing touches, router and shared expert,
    and the input and output activations (`itemsize` bytes per weight and activation)."""
    act = 2 * pool.tokens * shape.hidden * itemsize
    per_input = [len(np.unique(ids)) * shape.expert_bytes(itemsize)
                 + shape.always_bytes(itemsize) + act for ids in pool.ids]
    return {"bytes": float(np.median(per_input)), "flops": float(shape.flops(pool.tokens))}


def roofline(work: dict[str, float], bandwidth: float, gemm_rate: float) -> dict[str, Any]:
    """Lower bound of one call's time: max(bytes / bandwidth, FLOPs / GEMM rate)."""
    t_bw, t_gemm = work["bytes"] / bandwidth, work["flops"] / gemm_rate
    return {**work, "t_bandwidth_s": t_bw, "t_gemm_s": t_gemm, "t_s": max(t_bw, t_gemm),
            "bound": "bandwidth" if t_bw >= t_gemm else "gemm"}


def gathered_bytes(shape: LayerShape, tokens: int) -> int:
    """Bytes of expert weights transformers' batched_mm gathers per call (one copy per token and
    slot), which limits where it can run at all."""
    return tokens * shape.top_k * shape.expert_bytes()


def relative_error(got: np.ndarray, want: np.ndarray, skip: np.ndarray | None = None) -> float:
    """max |got - want| / max |want| over the tokens not in `skip` (NaN counts as infinite)."""
    if got.shape != want.shape:
        return float("inf")
    if skip is not None and skip.any():
        got, want = got[~skip], want[~skip]
    if got.size == 0:
        return 0.0
    g, w = got.astype(np.float64), want.astype(np.float64)
    err = float(np.abs(g - w).max() / max(float(np.abs(w).max()), 1e-30))
    return float("inf") if np.isnan(err) else err


TIE_MARGIN = 1e-5
# a bf16 block rounds its router logits to bf16 (half a unit in the last place is 2^-8 for a
# logit under 4, which unit inputs and unit-norm router rows give), then picks among them: the
# gap between two rounded logits is off by up to 2^-7; the margin keeps 2x that
TIE_MARGIN_BF16 = 2.0 ** -6


def tie_tokens(block: Any, shape: LayerShape, x: np.ndarray) -> np.ndarray:
    """Boolean [T]: tokens whose expert choice sits on a near-tie (the k-th and (k+1)-th
    selection scores, or for group-limited routing the kept and dropped group scores, closer
    than TIE_MARGIN; TIE_MARGIN_BF16 for a bf16 block). fp32 sums in another order may route
    such a token to another expert, so the output check skips them; in float32 they are rare
    (about one token in 10^4 to 10^5), in bf16 a few percent of the tokens."""
    logits = x.astype(np.float64) @ router_weight(block).astype(np.float64).T
    margin = TIE_MARGIN if block_dtype(block) == "float32" else TIE_MARGIN_BF16
    k = shape.top_k
    if shape.family != "deepseek_v3":  # softmax is monotone: rank the logits
        srt = -np.sort(-logits, axis=1)
        return (srt[:, k - 1] - srt[:, k]) < margin
    scores = 1.0 / (1.0 + np.exp(-logits))
    choice = scores + block.gate.e_score_correction_bias.detach().double().numpy()
    t, g = x.shape[0], shape.n_groups
    grouped = -np.sort(-choice.reshape(t, g, -1), axis=2)
    group_score = np.sort(grouped[:, :, 0] + grouped[:, :, 1], axis=1)[:, ::-1]
    tg = shape.topk_groups
    near = np.zeros(t, bool)
    if tg < g:
        near |= (group_score[:, tg - 1] - group_score[:, tg]) < margin
    gs = (grouped[:, :, 0] + grouped[:, :, 1])
    kept = np.argsort(-gs, axis=1, kind="stable")[:, :tg]
    mask = np.zeros((t, g), bool)
    np.put_along_axis(mask, kept, True, axis=1)
    masked = np.where(np.repeat(mask, shape.experts // g, axis=1), choice, -np.inf)
    srt = -np.sort(-masked, axis=1)
    return near | ((srt[:, k - 1] - srt[:, k]) < margin)
