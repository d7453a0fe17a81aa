"""moec: a compiler for Mixture-of-Experts inference on Apache TVM.

    import moec
    art = moec.compile(model, (x,))          # trace, run the pass pipeline, build TVM kernels
    art.save("model.moec")
    m = moec.load("model.moec"); y = m(x)    # numpy in -> numpy out, torch in -> torch out

Imports are lazy so that `moec.load` on numpy inputs never imports torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moec.errors import (
    ArtifactError,
    CodegenError,
    DependencyError,
    ExecutionError,
    InputError,
    IRError,
    MoecError,
    PassError,
    UnsupportedError,
)
from moec.passes import P, Pass, PassContext, PassManager, RewritePattern, Rewriter, register_pass

__version__ = "0.1.0"

if TYPE_CHECKING:
    from moec.runtime import Artifact, CompiledModel

__all__ = ["compile", "load", "Artifact", "CompiledModel", "Pass", "PassContext", "PassManager",
           "RewritePattern", "Rewriter", "P", "register_pass", "MoecError", "InputError",
           "UnsupportedError", "ArtifactError", "IRError", "PassError", "CodegenError",
           "ExecutionError", "DependencyError"]


def compile(model: Any, example_inputs: Any = (), **kwargs: Any) -> Artifact:
    """Compile an MoE model to an Artifact; see moec.compiler.compile for the options."""
    from moec.compiler import compile as _compile

    return _compile(model, example_inputs, **kwargs)


def load(path: Any, device: str = "cpu", *, ep_group: Any = None,
         weights: str = "copy", kv_cache: str | int | None = None,
         max_batch: int | None = None, max_seq_len: int | None = None,
         expert_budget: str | int | None = None, expert_policy: str = "adaptive",
         prefetch: bool = False, expert_source: str = "auto") -> Any:
    """Load a saved artifact; returns a callable CompiledModel, or for a generation artifact
    (a causal LM compiled from a checkpoint folder) a `moec.engine.LanguageModel`, which also
    generates: `model.generate(prompts, max_new_tokens=..., temperature=...)`, `model.stream`,
    `model.chat`.

    ep_group: a torch.distributed process group to run the model expert-parallel over (the
    artifact must be compiled with ep=True); every rank of the group calls load, and gets an
    EPModel holding its shard of the experts (see moec.distributed).
    weights (CPU): "copy" (default: the weights in this process's memory, where the kernels
    read them fastest) or "mmap" (views of the mapped file, shared between processes; see
    moec.runtime.load).
    kv_cache, max_batch, max_seq_len (generation artifacts): the KV cache size ("2GB", or
    bytes), the most sequences generated at once, and the longest sequence; chosen here, not
    when compiling (see moec.engine.Engine for the defaults).
    expert_budget, expert_policy, prefetch (generation artifacts): run with at most
    `expert_budget` bytes of routed experts in memory ("3GB"; on a GPU, device memory, with
    every expert in pinned host memory), the rest read from the artifact (on a GPU copied
    from host memory) as layers route to them (moec.runtime.expert_cache: "adaptive", "lru"
    or "lfu"; prefetch by pre-gating, off by default: docs/offload.md has the measurements);
    the tokens are bitwise those of the fully resident model. expert_source, on a GPU: "host"
    (the default there: every expert in pinned host memory) or "disk" (read from the artifact
    on each miss: for experts larger than host memory too)."""
    from moec.runtime import load as _load

    extra = {} if expert_budget is None else {
        "expert_budget": expert_budget, "expert_policy": expert_policy, "prefetch": prefetch,
        "expert_source": expert_source}
    model = _load(path, device=device, ep_group=ep_group, weights=weights, **extra)
    from moec.runtime.step import StepModel

    if isinstance(model, StepModel):
        from moec.engine import LanguageModel

        return LanguageModel(model, kv_cache=kv_cache, max_batch=max_batch,
                             max_seq_len=max_seq_len)
    if kv_cache is not None or max_batch is not None or max_seq_len is not None:
        from moec.errors import InputError as _InputError

        raise _InputError("kv_cache, max_batch and max_seq_len apply to generation artifacts "
                          "(causal LMs compiled from a checkpoint folder); this one is not")
    return model


def __getattr__(name: str) -> Any:
    if name in ("Artifact", "CompiledModel"):
        import moec.runtime

        return getattr(moec.runtime, name)
    raise AttributeError(f"module 'moec' has no attribute {name!r}")
