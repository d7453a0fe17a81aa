"""Whole Hugging Face causal LMs from a checkpoint folder -> moec IR.

    from moec.frontend.hf_model import from_checkpoint
    graph = from_checkpoint("path/to/checkpoint", max_tokens=4096)   # ids i64[T] -> logits [T, V]

The folder is what `save_pretrained` writes (config.json + *.safetensors); it loads offline
through `transformers.AutoModelForCausalLM` (no network). The compiled function is one forward of
one sequence without a KV cache: token ids `[T]` -> logits `[T, vocab]`.

How the model is traced:
- MoE blocks are recognised and lifted as in `from_torch` (moec.frontend.torch_frontend).
- Attention is lifted at the attention-kernel boundary every transformers model shares: the model
  runs with a registered attention implementation ("moec") whose function is one opaque
  `moec::attention(q, k, v, scale)` call, so whatever the family does around it (grouped-query
  heads, q/k norms, DeepSeek's MLA low-rank projections and split rope, interleaved rope) is traced
  into core ops and the kernel itself becomes one fused `core.attention`. With a custom
  implementation transformers builds no mask (the op is causal by definition), so no mask code
  reaches the graph.
- Rotary tables (`positions * inv_freq`, cos, sin) are traced as core ops over `core.arange`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from moec.errors import InputError, UnsupportedError
from moec.ir import Graph

ATTN_IMPL = "moec"


@torch.library.custom_op("moec::attention", mutates_args=())
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
                 ) -> torch.Tensor:
    """Causal attention with grouped-query heads: q [B, Hq, T, D], k [B, Hkv, T, D],
    v [B, Hkv, T, Dv] -> [B, T, Hq, Dv] (the layout the output projection reads)."""
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    t = q.shape[2]
    mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    p = s.masked_fill(~mask, float("-inf")).softmax(-1)
    return (p @ v.float()).to(q.dtype).transpose(1, 2).contiguous()


@attention_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return q.new_empty((q.shape[0], q.shape[2], q.shape[1], v.shape[3]))


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, scaling: float | None = None,
               dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The "moec" attention implementation transformers calls (query [B, Hq, T, D])."""
    where = type(module).__name__
    if kwargs.get("sliding_window") is not None:
        raise UnsupportedError(f"{where}: sliding-window attention is not supported by moec's "
                               f"core.attention (set config.sliding_window=None if the window "
                               f"is longer than the sequences you compile for)")
    if getattr(module, "is_causal", True) is False:
        raise UnsupportedError(f"{where}: non-causal attention; core.attention is causal")
    if kwargs.get("softcap") or kwargs.get("s_aux") is not None:
        raise UnsupportedError(f"{where}: attention with logit softcapping or sinks")
    scale = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
    return attention_op(query, key, value, scale), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPL, _attention)


class CausalLMLogits(nn.Module):
    """ids `[T]` -> logits `[T, vocab]` of one sequence, no cache."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids[None], use_cache=False).logits[0]


def is_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file()


def load_checkpoint(path: str | Path) -> nn.Module:
    """`AutoModelForCausalLM.from_pretrained(path)` offline, in eval mode, as saved (dtype)."""
    if not is_checkpoint(path):
        raise InputError(f"{path} is not a checkpoint folder (no config.json)")
    from moec.deps import HF, require

    AutoModelForCausalLM = require("transformers", f"reading the checkpoint folder {path}",
                                   HF).AutoModelForCausalLM
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True,
                                                     dtype="auto")
    except Exception as e:
        raise InputError(f"transformers could not load {path} as a causal LM: "
                         f"{type(e).__name__}: {str(e).splitlines()[0]}") from None
    return model.eval()


def _set_attn(config: Any, impl: str | None) -> str | None:
    old = getattr(config, "_attn_implementation", None)
    config._attn_implementation = impl
    for sub in ("text_config",):
        if hasattr(config, sub):
            getattr(config, sub)._attn_implementation = impl
    return old


def from_model(model: nn.Module, *, max_tokens: int = 4096) -> Graph:
    """Trace a transformers causal LM (ids [T] -> logits [T, V]) into a moec graph."""
    from moec.frontend.aten_translate import translate_exported
    from moec.frontend.nn_translate import fold_slice_writes
    from moec.frontend.torch_frontend import MoECall, _swap, _with_notes, find_moe_blocks

    _register()
    wrapper = CausalLMLogits(model)
    notes: dict[str, str] = {}
    blocks = find_moe_blocks(wrapper, notes)
    vocab = model.config.get_text_config().vocab_size
    ids = torch.arange(min(max(max_tokens, 2), 8)) % vocab
    T = torch.export.Dim("T", min=2, max=max(max_tokens, 2))
    old = _set_attn(model.config, ATTN_IMPL)
    swapped = []
    try:
        for path, spec in blocks:
            swapped.append((path, _swap(wrapper, path, MoECall(spec, wrapper.get_submodule(path)))))
        with torch.no_grad():
            ep = torch.export.export(wrapper, (ids,), dynamic_shapes=({0: T},), strict=False)
    except UnsupportedError:
        raise
    except Exception as e:
        head = "\n".join(str(e).strip().splitlines()[:6])
        raise _with_notes(UnsupportedError(
            f"torch.export could not trace {type(model).__name__}: {type(e).__name__}: {head}"),
            notes, anywhere=True) from e
    finally:
        for path, old_block in reversed(swapped):
            _swap(wrapper, path, old_block)
        _set_attn(model.config, old)
    fold_slice_writes(ep.graph)
    try:
        graph = translate_exported(ep, max_tokens=max_tokens)
    except UnsupportedError as e:
        raise _with_notes(e, notes) from e
    return graph


def from_checkpoint(path: str | Path, *, max_tokens: int = 4096) -> Graph:
    """Load a checkpoint folder offline and trace its whole forward (see the module doc)."""
    return from_model(load_checkpoint(path), max_tokens=max_tokens)
