"""`StepModel`: a loaded generation artifact (a causal LM compiled from a checkpoint folder).

Its kernels library has two entry points over one graph (moec/frontend/hf_generate.py):
`main`, a generation step over any mix of new tokens (prompts, prompt chunks, decode tokens),
and `decode`, the same step when every sequence has exactly one new token (its attention kernel
splits long contexts across threads). Both read and write the paged KV caches in place
(moec/ir/kv_ops.py has the layouts and the meaning of each step input).

    model = moec.runtime.load("qwen.moec")          # a StepModel
    logits = model(ids)                              # one sequence, no cache kept: [T, vocab]
    caches = model.new_caches(num_blocks=256)        # the runtime owns the KV memory
    logits = model.step(caches, ids=..., positions=..., ...)   # what moec.engine drives

`moec.engine` builds generation (pool, scheduler, sampling, tokenizer) on `step`; nothing here
knows about requests. Step inputs are checked before any kernel runs (a block id outside the
pool or a slot past a sequence's blocks would make the kernels read or write out of bounds).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from moec.errors import ExecutionError, InputError
from moec.runtime.inputs import is_torch_tensor, on_cpu, torch_module
from moec.runtime.model import CompiledModel, _call_error


@dataclass(frozen=True)
class Geometry:
    """What the engine needs to know about a generation artifact (manifest meta.generation)."""

    layers: int
    heads: int
    kv_heads: int
    k_dim: int
    v_dim: int
    block_size: int
    vocab_size: int
    max_step_tokens: int
    max_position: int | None
    cache_dtype: str
    eos_token_ids: tuple[int, ...]

    def block_bytes(self) -> int:
        """Bytes of one cache block (keys and values of every layer)."""
        item = np.dtype(self.cache_dtype).itemsize if self.cache_dtype != "bfloat16" else 2
        return self.layers * self.kv_heads * self.block_size * (self.k_dim + self.v_dim) * item

    @staticmethod
    def from_meta(gen: dict[str, Any], cache_dtype: str) -> Geometry:
        try:
            return Geometry(
                layers=int(gen["layers"]), heads=int(gen["heads"]),
                kv_heads=int(gen["kv_heads"]), k_dim=int(gen["k_dim"]),
                v_dim=int(gen["v_dim"]), block_size=int(gen["block_size"]),
                vocab_size=int(gen["vocab_size"]), max_step_tokens=int(gen["max_step_tokens"]),
                max_position=None if gen.get("max_position") is None
                else int(gen["max_position"]),
                cache_dtype=cache_dtype,
                eos_token_ids=tuple(int(i) for i in gen.get("eos_token_id") or ()))
        except (KeyError, TypeError, ValueError) as e:
            from moec.errors import ArtifactError

            raise ArtifactError(f"manifest meta.generation is malformed: {e}") from None


class KVCaches:
    """The key and value caches of one pool: `k [L, NB, Hkv, Dk, BS]`, `v [L, NB, Hkv, BS, Dv]`
    (TVM tensors on the model's device, zeroed). Made by `StepModel.new_caches`."""

    def __init__(self, k: Any, v: Any, num_blocks: int) -> None:
        self.k, self.v, self.num_blocks = k, v, num_blocks


class StepModel(CompiledModel):
    """A generation artifact, loaded (see the module doc). Construct with `moec.runtime.load`."""

    def __init__(self, *args: Any, expert_cache: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.expert_cache = expert_cache
        if expert_cache is not None:  # experts under a budget: the offload entry points
            self._main = self._vm["main_offload"]
            self._decode = self._vm["decode_offload"]
            weakref.finalize(self, expert_cache.close)
        else:
            self._decode = self._vm["decode"]
        sig = self._manifest.signature
        self.geometry = Geometry.from_meta(self._manifest.meta["generation"],
                                           sig.inputs[2].dtype)

    # ------------------------------------------------------------------ caches
    def new_caches(self, num_blocks: int) -> KVCaches:
        """Zeroed KV caches of `num_blocks` blocks (zero, so that no stale NaN can reach a
        masked product)."""
        g = self.geometry
        if num_blocks < 1:
            raise InputError(f"a KV cache needs at least one block, got {num_blocks}")
        tvm = self._tvm
        shapes = ((g.layers, num_blocks, g.kv_heads, g.k_dim, g.block_size),
                  (g.layers, num_blocks, g.kv_heads, g.block_size, g.v_dim))
        try:
            k, v = (tvm.runtime.empty(s, g.cache_dtype, self._device) for s in shapes)
            for t in (k, v):
                _zero(t)
        except MemoryError:
            raise
        except Exception as e:  # TVM raises its own error when it cannot allocate
            raise ExecutionError(f"could not allocate a KV cache of {num_blocks} blocks "
                                 f"({num_blocks * g.block_bytes() / 2**20:.1f} MiB): "
                                 f"{e}") from None
        return KVCaches(k, v, num_blocks)

    # ------------------------------------------------------------------ one step
    def step(self, caches: KVCaches, *, ids: np.ndarray, positions: np.ndarray,
             q_start: np.ndarray, q_len: np.ndarray, kv_len: np.ndarray,
             block_table: np.ndarray, slots: np.ndarray, logits_rows: np.ndarray,
             decode: bool | None = None) -> np.ndarray:
        """Run one generation step (moec/ir/kv_ops.py) and return the logits of
        `logits_rows`, `[R, vocab]` in the model's dtype. The caches are updated in place.

        `decode=None` picks the decode entry point when every sequence has one new token."""
        g = self.geometry
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        positions = np.ascontiguousarray(positions, dtype=np.int64)
        q_start, q_len, kv_len, slots = (np.ascontiguousarray(a, dtype=np.int32)
                                         for a in (q_start, q_len, kv_len, slots))
        table = np.ascontiguousarray(block_table, dtype=np.int32)
        rows = np.ascontiguousarray(logits_rows, dtype=np.int64)
        self._check_step(caches, ids, positions, q_start, q_len, kv_len, table, slots, rows)
        if decode is None:
            decode = len(q_len) == len(ids) and bool(np.all(q_len == 1))
        if decode and not (len(q_len) == len(ids) and np.all(q_len == 1)
                           and np.array_equal(q_start, np.arange(len(ids)))):
            raise InputError("decode=True needs one new token per sequence, in order")
        tvm = self._tvm
        dev = self._device
        args = [tvm.runtime.tensor(a, dev) for a in (ids, positions)]
        args += [caches.k, caches.v]
        args += [tvm.runtime.tensor(a, dev) for a in (q_start, q_len, kv_len, table, slots, rows)]
        fn = self._decode if decode else self._main
        from moec.runtime.expert_cache import current  # noqa: PLC0415

        with self._lock:
            current.cache = self.expert_cache
            current.error = None
            try:
                out = fn(*args, *self._weights)
            except Exception as e:  # TVM raises ValueError, RuntimeError, tvm.error.*
                if current.error is not None:  # the expert cache's own error, not the VM's
                    raise current.error from None
                raise _call_error(self._path, e) from None
            finally:
                current.cache = None
                if self.expert_cache is not None:
                    self.expert_cache.release()
        logits = out[0].numpy()  # the model's dtype (bfloat16 through ml_dtypes)
        if logits.shape != (len(rows), g.vocab_size):
            raise ExecutionError(f"the step returned logits {logits.shape}, expected "
                                 f"{(len(rows), g.vocab_size)}")
        return logits

    def _check_step(self, caches: KVCaches, ids, positions, q_start, q_len, kv_len, table,
                    slots, rows) -> None:
        g = self.geometry
        t, b = len(ids), len(q_start)
        if ids.ndim != 1 or positions.shape != ids.shape or slots.shape != ids.shape:
            raise InputError(f"ids, positions and slots must be 1-D of one length, got "
                             f"{ids.shape}, {positions.shape}, {slots.shape}")
        if t > g.max_step_tokens:
            raise InputError(f"a step runs at most {g.max_step_tokens} tokens (compiled with "
                             f"max_tokens={g.max_step_tokens}), got {t}")
        if q_len.shape != (b,) or kv_len.shape != (b,) or table.ndim != 2 or \
                table.shape[0] != b:
            raise InputError(f"q_start, q_len, kv_len must be [B] and block_table [B, MB], "
                             f"got {q_start.shape}, {q_len.shape}, {kv_len.shape}, "
                             f"{table.shape}")
        if t and (ids.min() < 0 or ids.max() >= g.vocab_size):
            raise InputError(f"token ids must be in [0, {g.vocab_size}), got "
                             f"{ids.min()}..{ids.max()}")
        nb, bs = caches.num_blocks, g.block_size
        if b:
            if q_len.min() < 0 or q_start.min() < 0 or np.any(q_start + q_len > t):
                raise InputError("each sequence's new tokens must lie inside the step")
            if np.any(kv_len < q_len) or np.any(kv_len > table.shape[1] * bs):
                raise InputError(f"kv_len must be >= q_len and fit the block table "
                                 f"({table.shape[1]} blocks of {bs})")
            need = (kv_len + bs - 1) // bs
            used = np.arange(table.shape[1])[None, :] < need[:, None]
            if np.any(used & ((table < 0) | (table >= nb))):
                raise InputError(f"block_table names a block outside the pool (0..{nb - 1})")
        if t and (slots.min() < 0 or slots.max() >= nb * bs):
            raise InputError(f"slots must be in [0, {nb * bs})")
        if len(rows) and (rows.min() < 0 or rows.max() >= max(t, 1)):
            raise InputError(f"logits_rows must index the step's {t} tokens")
        if g.max_position is not None and t and positions.max() >= g.max_position:
            raise InputError(f"position {int(positions.max())} is past the model's "
                             f"{g.max_position} positions")

    # ------------------------------------------------------------------ plain forward
    def __call__(self, *inputs: Any) -> Any:
        """Logits `[T, vocab]` of one sequence of token ids `[T]` (no cache kept): the forward
        the checkpoint computes, through the generation step on a temporary cache."""
        if len(inputs) != 1:
            raise InputError(f"a language model takes one input, token ids [T]; got "
                             f"{len(inputs)} inputs (moec.engine generates with a KV cache)")
        x = inputs[0]
        as_torch = is_torch_tensor(x)
        ids = x.detach().cpu().numpy() if as_torch else np.asarray(x)
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise InputError(f"token ids must be a 1-D integer array, got {ids.dtype} "
                             f"{ids.shape}")
        g = self.geometry
        t = len(ids)
        from moec.runtime.inputs import numpy_dtype  # noqa: PLC0415

        logits = np.zeros((t, g.vocab_size), numpy_dtype(self.signature.outputs[0].dtype))
        if t:
            # one sequence on a temporary cache, in steps of at most max_step_tokens tokens
            nblk = -(-t // g.block_size)
            caches = self.new_caches(nblk)
            table = np.arange(nblk)[None]
            cap = self.expert_cache.max_step_tokens() if self.expert_cache is not None else None
            size = g.max_step_tokens if cap is None else min(cap, g.max_step_tokens)
            for lo in range(0, t, size):
                hi = min(t, lo + size)
                pos = np.arange(lo, hi)
                logits[lo:hi] = self.step(
                    caches, ids=ids[lo:hi], positions=pos, q_start=[0], q_len=[hi - lo],
                    kv_len=[hi], block_table=table, slots=pos, logits_rows=pos - lo,
                    decode=False)
        if as_torch:
            torch = torch_module()
            assert torch is not None
            return torch.from_numpy(logits)
        return logits


def _zero(t: Any) -> None:
    """Fill a TVM tensor with zeros in place: through a numpy view on a CPU, torch on a GPU."""
    if on_cpu(t.device) and str(t.dtype) in ("float32", "float16"):
        np.from_dlpack(t).fill(0)
        return
    torch = torch_module()
    if torch is None:
        import torch  # noqa: PLC0415  (GPU caches: torch is how moec reaches device memory)
    torch.from_dlpack(t).zero_()


__all__ = ["Geometry", "KVCaches", "StepModel", "on_cpu"]
