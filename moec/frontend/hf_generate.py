"""The generation step of a Hugging Face causal LM -> moec IR, with a paged KV cache.

    from moec.frontend.hf_generate import step_graph
    graph, gen = step_graph(model, max_tokens=2048, block_size=16)

One step runs T new tokens of B sequences (flattened; prefill, decode and chunked prefill are all
steps, see moec/ir/kv_ops.py) and returns the logits of the rows the caller asks for:

    ids i64[T], positions i64[T], k_cache [L, NB, Hkv, Dk, BS], v_cache [L, NB, Hkv, BS, Dv],
    q_start i32[B], q_len i32[B], kv_len i32[B], block_table i32[B, MB], slots i32[T],
    logits_rows i64[R]  ->  logits [R, V], k_cache, v_cache

How: the model runs under a registered attention implementation ("moec_paged") whose function
writes the step's keys and values into the caches (`moec::cache_write`, one per layer and kind)
and attends over them (`moec::paged_attention`), so everything a family does around attention
(grouped-query heads, q/k norms, MLA projections, rotary variants computed from `position_ids`)
is traced into core ops. Sliding windows, chunked attention and attention sinks become attributes
of the attention op. `logits_to_keep=logits_rows` keeps the LM head to the rows asked for.

The caches are float32 on CPUs (the kernels compute in float32, see widen-activations) and in the
model's dtype otherwise. `gen` (a dict) is what the runtime needs to allocate the caches and to
drive generation; it goes into the artifact's manifest.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moec.errors import UnsupportedError
from moec.ir import Graph

ATTN_IMPL = "moec_paged"
STEP_INPUTS = ("ids", "positions", "k_cache", "v_cache", "q_start", "q_len", "kv_len",
               "block_table", "slots", "logits_rows")
# rope types whose frequencies depend on the sequence length: traced at the original length,
# which is then the longest sequence the artifact generates
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


# ----------------------------------------------------------------------------- torch custom ops


@torch.library.custom_op("moec::cache_write", mutates_args=())
def cache_write(cache: torch.Tensor, x: torch.Tensor, slots: torch.Tensor, layer: int,
                transposed: bool) -> torch.Tensor:
    """cache [L, NB, H, BS, D] ([L, NB, H, D, BS] if transposed) with x [1, H, T, D] written at
    slots [T] of `layer` (a copy)."""
    out = cache.clone()
    bs = cache.shape[4] if transposed else cache.shape[3]
    s = slots.long()
    rows = x[0].transpose(0, 1).to(cache.dtype)
    if transposed:
        out[layer, s // bs, :, :, s % bs] = rows
    else:
        out[layer, s // bs, :, s % bs, :] = rows
    return out


@cache_write.register_fake
def _(cache: torch.Tensor, x: torch.Tensor, slots: torch.Tensor, layer: int,
      transposed: bool) -> torch.Tensor:
    return cache.new_empty(cache.shape)


@torch.library.custom_op("moec::paged_attention", mutates_args=())
def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    q_start: torch.Tensor, q_len: torch.Tensor, kv_len: torch.Tensor,
                    block_table: torch.Tensor, sinks: torch.Tensor | None, layer: int,
                    scale: float, window: int, chunk: int) -> torch.Tensor:
    """Eager form of core.paged_attention (moec/ir/kv_ops.py): q [1, Hq, T, D] -> [1, T, Hq, Dv]."""
    _, hq, t, _ = q.shape
    hkv, bs, dv = v_cache.shape[2], v_cache.shape[3], v_cache.shape[4]
    rep = hq // hkv
    out = q.new_zeros((1, t, hq, dv), dtype=torch.float32)
    for b in range(q_start.shape[0]):
        n, kv, s0 = int(q_len[b]), int(kv_len[b]), int(q_start[b])
        if n == 0:
            continue
        pos = torch.arange(kv)
        blocks = block_table[b, pos // bs].long()
        keys = k_cache[layer, blocks, :, :, pos % bs].float().repeat_interleave(rep, 1)
        vals = v_cache[layer, blocks, :, pos % bs, :].float().repeat_interleave(rep, 1)
        qp = torch.arange(kv - n, kv)[:, None]
        kp = pos[None, :]
        mask = kp <= qp
        if window:
            mask &= kp > qp - window
        if chunk:
            mask &= kp // chunk == qp // chunk
        s = torch.einsum("hqd,khd->hqk", q[0, :, s0:s0 + n].float(), keys) * scale
        s = s.masked_fill(~mask[None], float("-inf"))
        if sinks is not None:
            sk = sinks.float()[:, None, None].expand(hq, n, 1)
            p = torch.cat([s, sk], -1).softmax(-1)[..., :-1]
        else:
            p = s.softmax(-1)
        out[0, s0:s0 + n] = torch.einsum("hqk,khd->qhd", p, vals)
    return out.to(q.dtype)


@paged_attention.register_fake
def _(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, q_start: torch.Tensor,
      q_len: torch.Tensor, kv_len: torch.Tensor, block_table: torch.Tensor,
      sinks: torch.Tensor | None, layer: int, scale: float, window: int, chunk: int
      ) -> torch.Tensor:
    return q.new_empty((1, q.shape[2], q.shape[1], v_cache.shape[4]))


@torch.library.custom_op("moec::linear_heads", mutates_args=())
def linear_heads(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A linear map per head (core.linear_heads): x [..., H, K], w [H, N, K] -> [..., H, N]."""
    return torch.einsum("...hk,hnk->...hn", x, w.to(x.dtype))


@linear_heads.register_fake
def _(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], w.shape[1]))


# ----------------------------------------------------------------------------- MLA, absorbed


def _is_mla(module: nn.Module) -> bool:
    """A multi-head latent attention module of transformers' shape (DeepSeek-V2/V3 and the
    families built like them): latents expanded by `expand_kv` through `kv_b_proj`."""
    kvb = getattr(module, "kv_b_proj", None)
    return callable(getattr(module, "expand_kv", None)) and isinstance(kvb, nn.Linear) and \
        kvb.bias is None and all(isinstance(getattr(module, a, None), int) for a in (
            "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "num_heads"))


def _keep_latents(model: nn.Module) -> list[nn.Module]:
    """Make MLA modules hand their compressed latents to the attention function unexpanded
    (an instance attribute shadows `expand_kv`); returns the modules, to undo with
    `_expand_latents`. The attention then runs absorbed (`_mla_attention`)."""
    mods = [m for m in model.modules() if _is_mla(m)]
    for m in mods:
        m.expand_kv = lambda kv_nope, k_rot: (kv_nope, k_rot)
    return mods


def _expand_latents(mods: list[nn.Module]) -> None:
    for m in mods:
        del m.expand_kv


def _mla_geometry(module: nn.Module) -> dict[str, int]:
    r, rope = module.kv_lora_rank, module.qk_rope_head_dim
    return {"k_dim": r + rope, "v_dim": r, "kv_heads": 1, "heads": module.num_heads}


def _mla_attention(module: nn.Module, step: _Step, query: torch.Tensor, latent: torch.Tensor,
                   k_rot: torch.Tensor, layer: int, scale: float) -> torch.Tensor:
    """Absorbed multi-head latent attention over the paged cache of the latents.

    With W = kv_b_proj.weight viewed [H, nope + v, R] (W_k its first nope rows, W_v the rest),
    head h's key is W_k[h] c + rope part and its value W_v[h] c for the latent c of a token, so
    q_h . k_h = (W_k[h]^T q_nope_h) . c + q_rot_h . k_rot: one kv head of dims R + rope, whose
    value is c itself. The cache holds [c, k_rot] as keys and c as values (2 R + rope numbers
    per token instead of H (nope + rope + v)), and the output per head is W_v[h] o_h."""
    h, nope, r = module.num_heads, module.qk_nope_head_dim, module.kv_lora_rank
    w = module.kv_b_proj.weight.view(h, nope + module.v_head_dim, r)
    w_k = w[:, :nope, :].transpose(1, 2)  # [H, R, nope]
    w_v = w[:, nope:, :]  # [H, v, R]
    q_pass, q_rot = query[..., :nope], query[..., nope:]
    q_lat = linear_heads(q_pass.transpose(1, 2), w_k).transpose(1, 2)  # [1, H, T, R]
    q_abs = torch.cat([q_lat, q_rot], -1)
    k_abs = torch.cat([latent, k_rot.to(latent.dtype)], -1)  # [1, 1, T, R + rope]
    step.k = cache_write(step.k, k_abs, step.slots, layer, True)
    step.v = cache_write(step.v, latent, step.slots, layer, False)
    out = paged_attention(q_abs, step.k, step.v, step.q_start, step.q_len, step.kv_len,
                          step.block_table, None, layer, scale, 0, 0)  # [1, T, H, R]
    return linear_heads(out, w_v)  # [1, T, H, v]


# ----------------------------------------------------------------------------- the step module


@dataclass
class _Step:
    """The tensors of the step being traced (or run eagerly), read by the attention function."""

    k: torch.Tensor
    v: torch.Tensor
    q_start: torch.Tensor
    q_len: torch.Tensor
    kv_len: torch.Tensor
    block_table: torch.Tensor
    slots: torch.Tensor
    layers: dict[int, dict[str, Any]]


_local = threading.local()


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, scaling: float | None = None,
               dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The "moec_paged" attention implementation transformers calls (query [1, Hq, T, D])."""
    step: _Step | None = getattr(_local, "step", None)
    where = type(module).__name__
    if step is None:
        raise UnsupportedError(f"{where}: the {ATTN_IMPL!r} attention implementation runs only "
                               f"inside moec's generation step")
    if getattr(module, "is_causal", True) is False:
        raise UnsupportedError(f"{where}: non-causal attention; generation needs causal layers")
    if kwargs.get("softcap"):
        raise UnsupportedError(f"{where}: attention logit softcapping is not supported")
    layer = getattr(module, "layer_idx", None)
    if not isinstance(layer, int):
        raise UnsupportedError(f"{where}: the attention module has no integer layer_idx, so its "
                               f"KV cache layer is unknown")
    if query.shape[0] != 1:
        raise UnsupportedError(f"{where}: batch {query.shape[0]}; the step runs one flattened "
                               f"batch")
    cfg = module.config
    window = kwargs.get("sliding_window") or 0
    chunk = 0
    types = getattr(cfg, "layer_types", None)
    if types is not None and layer < len(types) and types[layer] == "chunked_attention":
        chunk = int(getattr(cfg, "attention_chunk_size", 0) or 0)
    sinks = kwargs.get("s_aux")
    scale = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
    if _is_mla(module) and "expand_kv" in vars(module):  # latents kept: absorbed MLA
        if window or chunk or sinks is not None:
            raise UnsupportedError(f"{where}: latent attention with a window, chunks or sinks")
        step.layers[layer] = {"window": 0, "chunk": 0, "sinks": False, "mla": True,
                              **_mla_geometry(module)}
        return _mla_attention(module, step, query, key, value, layer, scale), None
    step.layers[layer] = {"window": int(window), "chunk": chunk, "sinks": sinks is not None,
                          "k_dim": int(key.shape[-1]), "v_dim": int(value.shape[-1]),
                          "kv_heads": int(key.shape[1]), "heads": int(query.shape[1])}
    step.k = cache_write(step.k, key, step.slots, layer, True)
    step.v = cache_write(step.v, value, step.slots, layer, False)
    out = paged_attention(query, step.k, step.v, step.q_start, step.q_len, step.kv_len,
                          step.block_table, sinks, layer, scale, int(window), chunk)
    return out, None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPL, _attention)


class StepModule(nn.Module):
    """One generation step of a causal LM over paged caches (see the module doc)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, q_start: torch.Tensor, q_len: torch.Tensor,
                kv_len: torch.Tensor, block_table: torch.Tensor, slots: torch.Tensor,
                logits_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # the per-layer record goes to a dict outside the module: export traces a copy of it
        layers = getattr(_local, "record", None)
        step = _Step(k_cache, v_cache, q_start, q_len, kv_len, block_table, slots,
                     layers if layers is not None else {})
        _local.step = step
        try:
            out = self.model(input_ids=ids[None], position_ids=positions[None], use_cache=False,
                             logits_to_keep=logits_rows)
        finally:
            _local.step = None
        return out.logits[0], step.k, step.v


# ----------------------------------------------------------------------------- geometry


def _text_config(model: nn.Module) -> Any:
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _probe_layers(model: nn.Module) -> dict[int, dict[str, int]]:
    """Each layer's attention geometry (k/v head dims, kv heads, heads), from one eager forward
    of 2 tokens under a recording attention implementation (the caches' shapes need it)."""
    layers: dict[int, dict[str, int]] = {}

    def record(module, query, key, value, mask, scaling=None, dropout=0.0, **kw):
        layer = getattr(module, "layer_idx", None)
        if not isinstance(layer, int):
            raise UnsupportedError(f"{type(module).__name__}: the attention module has no "
                                   f"integer layer_idx, so its KV cache layer is unknown")
        if _is_mla(module) and "expand_kv" in vars(module):
            layers[layer] = _mla_geometry(module)
            dv = module.v_head_dim
        else:
            layers[layer] = {"k_dim": int(key.shape[-1]), "v_dim": int(value.shape[-1]),
                             "kv_heads": int(key.shape[1]), "heads": int(query.shape[1])}
            dv = value.shape[-1]
        return query.new_zeros((1, query.shape[2], query.shape[1], dv)), None

    from transformers import AttentionInterface

    AttentionInterface.register("moec_probe", record)
    old = _set_attn(model.config, "moec_probe")
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros((1, 2), dtype=torch.long),
                  position_ids=torch.arange(2)[None], use_cache=False, logits_to_keep=1)
    finally:
        _set_attn(model.config, old)
    return layers


def _set_attn(config: Any, impl: str | None) -> str | None:
    old = getattr(config, "_attn_implementation", None)
    config._attn_implementation = impl
    for sub in ("text_config",):
        if hasattr(config, sub):
            getattr(config, sub)._attn_implementation = impl
    return old


def _refuse_unsupported(model: nn.Module) -> None:
    """Clear errors for what the step cannot express (before a confusing trace failure)."""
    for name, m in model.named_modules():
        if type(m).__name__ == "JetMoeMoA":
            raise UnsupportedError(
                f"{name} (JetMoeMoA): JetMoE's mixture of attention heads (top-k routed query "
                f"and output projections) is not supported for generation; its MoE feed-"
                f"forward blocks are (compile a block, or the model with generate=False, to "
                f"get the plain forward where that traces)")


def _position_limited(model: nn.Module) -> tuple[int | None, list[tuple[nn.Module, str, Any]]]:
    """Position-dependent computations traced as their value at short range, with the
    longest sequence for which that is exact: Llama 4's attention temperature tuning on NoPE
    layers scales queries by 1 + attn_scale * log1p(floor((p + 1) / floor_scale)), which is 1
    while p + 1 < floor_scale (8192 in the released models); transformers computes it from
    arange(T) (wrong for a flattened batch), so it is switched off for the trace and sequences
    are limited to floor_scale - 1 positions. Returns (limit, changes to undo)."""
    limit, changed = None, []
    for m in model.modules():
        if getattr(m, "attn_temperature_tuning", False) and not getattr(m, "use_rope", True):
            fs = int(getattr(m, "floor_scale", 0) or 0)
            if fs < 2:
                raise UnsupportedError(f"{type(m).__name__}: attention temperature tuning with "
                                       f"floor_scale={fs} is not supported")
            limit = fs - 1 if limit is None else min(limit, fs - 1)
            changed.append((m, "attn_temperature_tuning", True))
            m.attn_temperature_tuning = False
    return limit, changed


def _rope_limit(model: nn.Module) -> tuple[int | None, list[tuple[nn.Module, Any]]]:
    """Rotary modules whose frequencies depend on the sequence length are traced at their
    original frequencies (their rope_type set to "default" during the trace): the longest
    sequence that is exact then is the original context length, returned with the changes to
    undo."""
    cfg = _text_config(model)
    limit, changed = None, []
    for m in model.modules():
        rt = getattr(m, "rope_type", None)
        if not isinstance(rt, str) or not any(t in rt for t in _LENGTH_DEPENDENT_ROPE):
            continue
        params = getattr(cfg, "rope_parameters", None) or {}
        orig = params.get("original_max_position_embeddings") or getattr(
            m, "original_max_seq_len", None) or cfg.max_position_embeddings
        limit = int(orig) if limit is None else min(limit, int(orig))
        changed.append((m, rt))
        m.rope_type = "default"
    return limit, changed


# ----------------------------------------------------------------------------- tracing


def step_graph(model: nn.Module, *, max_tokens: int = 2048, block_size: int = 16,
               kv_dtype: torch.dtype | None = None) -> tuple[Graph, dict[str, Any]]:
    """Trace the generation step of a transformers causal LM (see the module doc).

    max_tokens: the most tokens one step runs (the prefill chunk); block_size: KV cache block
    size (tokens per block). Returns the graph and the generation metadata."""
    if block_size < 1 or block_size & (block_size - 1):
        raise UnsupportedError(f"block_size must be a power of two, got {block_size}")
    _refuse_unsupported(model)
    cfg = _text_config(model)
    mla = _keep_latents(model)
    try:
        return _step_graph(model, cfg, max_tokens, block_size, kv_dtype)
    finally:
        _expand_latents(mla)


def _step_graph(model: nn.Module, cfg: Any, max_tokens: int, block_size: int,
                kv_dtype: torch.dtype | None) -> tuple[Graph, dict[str, Any]]:
    from moec.frontend.aten_translate import translate_exported
    from moec.frontend.nn_translate import fold_slice_writes
    from moec.frontend.torch_frontend import MoECall, _swap, _with_notes, find_moe_blocks

    layers = _probe_layers(model)
    n_layers = int(cfg.num_hidden_layers)
    if sorted(layers) != list(range(n_layers)):
        raise UnsupportedError(f"{type(model).__name__}: attention ran for layers "
                               f"{sorted(layers)}, expected 0..{n_layers - 1}")
    geo = {(g["k_dim"], g["v_dim"], g["kv_heads"], g["heads"]) for g in layers.values()}
    if len(geo) != 1:
        raise UnsupportedError(f"{type(model).__name__}: layers differ in attention geometry "
                               f"(k dim, v dim, kv heads, heads): {sorted(geo)}; moec's KV "
                               f"cache has one geometry for all layers")
    k_dim, v_dim, kv_heads, heads = geo.pop()
    dtype = kv_dtype or next(model.parameters()).dtype
    vocab = int(cfg.vocab_size)

    _register()
    step = StepModule(model)
    notes: dict[str, str] = {}
    blocks = find_moe_blocks(step, notes)
    # distinct example sizes >= 2 (export specialises 0/1 and merges equal sizes)
    T, B, MB, NB = 9, 3, 4, 7
    bs = block_size
    ex = (torch.arange(T) % vocab, torch.arange(T),
          torch.zeros((n_layers, NB, kv_heads, k_dim, bs), dtype=dtype),
          torch.zeros((n_layers, NB, kv_heads, bs, v_dim), dtype=dtype),
          torch.tensor([0, 4, 8], dtype=torch.int32), torch.tensor([4, 4, 1], dtype=torch.int32),
          torch.tensor([4, 4, 1], dtype=torch.int32),
          torch.arange(B * MB, dtype=torch.int32).reshape(B, MB) % NB,
          torch.arange(T, dtype=torch.int32), torch.tensor([3, 7, 8, 0, 1]))
    Dim = torch.export.Dim
    dT = Dim("T", min=2, max=max(max_tokens, 2))
    dB = Dim("B", min=1, max=max(max_tokens, 2))
    dMB = Dim("MB", min=1, max=1 << 20)
    dNB = Dim("NB", min=1, max=1 << 24)
    dR = Dim("R", min=1, max=max(max_tokens, 2))
    shapes = ({0: dT}, {0: dT}, {1: dNB}, {1: dNB}, {0: dB}, {0: dB}, {0: dB}, {0: dB, 1: dMB},
              {0: dT}, {0: dR})
    limit, rope_changed = _rope_limit(model)
    tt_limit, tt_changed = _position_limited(model)
    if tt_limit is not None:
        limit = tt_limit if limit is None else min(limit, tt_limit)
    old = _set_attn(model.config, ATTN_IMPL)
    swapped = []
    record: dict[int, dict[str, Any]] = {}
    _local.record = record
    try:
        for path, spec in blocks:
            swapped.append((path, _swap(step, path, MoECall(spec, step.get_submodule(path)))))
        with torch.no_grad():
            ep = torch.export.export(step, ex, dynamic_shapes=shapes, strict=False)
    except UnsupportedError:
        raise
    except Exception as e:
        head = "\n".join(str(e).strip().splitlines()[:6])
        raise _with_notes(UnsupportedError(
            f"torch.export could not trace the generation step of {type(model).__name__}: "
            f"{type(e).__name__}: {head}"), notes, anywhere=True) from e
    finally:
        for path, old_block in reversed(swapped):
            _swap(step, path, old_block)
        _set_attn(model.config, old)
        _local.record = None
        for m, rt in rope_changed:
            m.rope_type = rt
        for m, attr, v in tt_changed:
            setattr(m, attr, v)
    fold_slice_writes(ep.graph)
    names = [s.arg.name for s in ep.graph_signature.input_specs
             if s.kind.name == "USER_INPUT"]
    axes = [{0: "T"}, {0: "T"}, {1: "NB"}, {1: "NB"}, {0: "B"}, {0: "B"}, {0: "B"},
            {0: "B", 1: "MB"}, {0: "T"}, {0: "R"}]
    input_dims = dict(zip(names, axes, strict=True))
    dims = {"T": (0, max_tokens), "B": (0, max_tokens), "MB": (0, 1 << 20),
            "NB": (1, 1 << 24), "R": (0, max_tokens)}
    try:
        graph = translate_exported(ep, max_tokens=max_tokens, input_dims=input_dims, dims=dims)
    except UnsupportedError as e:
        raise _with_notes(e, notes) from e
    got = tuple(v.name for v in graph.inputs)
    if got != STEP_INPUTS:
        raise UnsupportedError(f"internal: the step's inputs traced as {got}")
    max_pos = int(getattr(cfg, "max_position_embeddings", 0) or 0) or None
    if limit is not None:
        max_pos = limit if max_pos is None else min(max_pos, limit)
    gen = {
        "layers": n_layers, "heads": heads, "kv_heads": kv_heads, "k_dim": k_dim,
        "v_dim": v_dim, "block_size": block_size, "vocab_size": vocab,
        "max_step_tokens": max_tokens, "max_position": max_pos,
        "attention": [record[i] for i in range(n_layers)],
        "eos_token_id": _eos(model),
    }
    return graph, gen


def _eos(model: nn.Module) -> list[int]:
    ids: list[int] = []
    for src in (getattr(model, "generation_config", None), _text_config(model)):
        e = getattr(src, "eos_token_id", None) if src is not None else None
        if e is None:
            continue
        for i in (e if isinstance(e, (list, tuple)) else [e]):
            if int(i) not in ids:
                ids.append(int(i))
        if ids:
            break
    return ids


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja", "chat_template.json")


def tokenizer_files(folder: Any) -> dict[str, bytes]:
    """The tokenizer and chat-template files of a checkpoint folder, to ship in the artifact
    (those present; a folder without tokenizer.json gives an artifact that generates from token
    ids only)."""
    from pathlib import Path

    out = {}
    for name in TOKENIZER_FILES:
        p = Path(folder) / name
        if p.is_file():
            out[name] = p.read_bytes()
    return out
