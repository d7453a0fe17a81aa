"""The systems the benchmark times, each a callable `x [T, H] (np.float32) -> y [T, H]` over the
same block weights:

- `hf-<impl>`: the transformers block under each experts implementation it offers (eager,
  grouped_mm, batched_mm); the table reports the fastest as `hf`. `hf-eager` is the reference
  every other system is checked against.
- `torch.compile`: inductor (default mode) on the same block with the grouped_mm implementation,
  the one inductor captures as a single graph (eager's loop over the experts hit breaks it into
  data-dependent pieces); recompiles are counted in its compile time.
- `ort-moe`: ONNX Runtime's com.microsoft MoE op (moec.bench.ort).
- `moec`: `moec.compile` of the transformers block; if the family does not compile, of an
  equivalent `moec.models.reference.StackedMoEBlock` with the same weights (said in `note`).

A bfloat16 run (`moec bench --dtype bfloat16`) builds every system on the bf16 block: each call
converts x to bf16 and the output back to float32 numpy, inside the stopwatch, for every system
alike. ONNX Runtime is not run: its CPU MoE kernel has no bfloat16 implementation.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from moec.bench.layer import LayerShape, block_dtype, gathered_bytes, sibling, to_block

BATCHED_MM_LIMIT = 1 << 30  # bytes of gathered expert weights above which batched_mm is skipped


class System:
    """A timed system. `kind` groups implementations of one system (the hf-* ones); `note` says
    anything a reader of the results must know; `compile_s` is the one-off preparation time
    (model compile, ONNX session creation; torch.compile's first call at each token count)."""

    kind = ""

    def __init__(self, name: str, note: str = "") -> None:
        self.name = name
        self.note = note
        self.compile_s = 0.0

    def skip_reason(self, tokens: int) -> str | None:
        return None

    def prepare(self, x: np.ndarray) -> None:
        """Called once per token count before the warm-up."""

    def __call__(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class HFBlock(System):
    kind = "hf"

    def __init__(self, block: Any, shape: LayerShape, impl: str) -> None:
        super().__init__(f"hf-{impl}", f"transformers {type(block).__name__}, "
                         f"experts_implementation={impl}")
        self.shape = shape
        self.impl = impl
        self.block = block if impl == "eager" else sibling(block, shape, impl)

    def skip_reason(self, tokens: int) -> str | None:
        if self.impl == "batched_mm":
            need = gathered_bytes(self.shape, tokens)
            if need > BATCHED_MM_LIMIT:
                return f"batched_mm would gather {need / 2**30:.1f} GiB of expert weights"
        return None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.block(to_block(self.block, x))[0].float().numpy()


class TorchCompile(System):
    kind = "torch.compile"

    def __init__(self, block: Any, shape: LayerShape, impl: str = "grouped_mm") -> None:
        import torch

        super().__init__("torch.compile", f"inductor, default mode, experts_implementation={impl}"
                         f", compile caches off")
        self.block = block
        torch._dynamo.reset()
        self.compiled = torch.compile(sibling(block, shape, impl))
        self._seen: set[int] = set()

    def prepare(self, x: np.ndarray) -> None:
        if x.shape[0] in self._seen:
            return
        self._seen.add(x.shape[0])
        import torch._inductor.config as inductor_config

        t0 = time.perf_counter()
        # compile time as a first compile costs it, not a cache hit from an earlier run; the
        # switch holds for this compile only (it used to stay set for the whole process)
        with inductor_config.patch(force_disable_caches=True):
            self(x)
        self.compile_s += time.perf_counter() - t0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.compiled(to_block(self.block, x))[0].float().numpy()


class OrtSystem(System):
    kind = "ort"

    def __init__(self, block: Any, shape: LayerShape, threads: int) -> None:
        from moec.bench.ort import OrtMoE

        t0 = time.perf_counter()
        self.run = OrtMoE(shape, block, threads)
        note = f"onnxruntime {self.run.version} com.microsoft MoE, CPU EP, interleaved SwiGLU"
        if shape.family == "deepseek_v3":
            note += ("; sigmoid+bias group-limited routing and the shared expert as standard "
                     "ONNX ops around the MoE op (it routes by softmax top-k only)")
        super().__init__("ort-moe", note)
        self.compile_s = time.perf_counter() - t0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.run(x)


def reference_block(block: Any, shape: LayerShape) -> Any:
    """`moec.models.reference.StackedMoEBlock` computing what the transformers block computes,
    holding the same weights (copied: the reference block stores gate and up apart)."""
    import torch

    from moec.models.reference import StackedMoEBlock

    if shape.family not in ("mixtral", "qwen3_moe"):
        raise ValueError(f"no moec.models.reference equivalent of the {shape.family} block "
                         f"(sigmoid routing, groups and shared experts are not in it)")
    ref = StackedMoEBlock(shape.hidden, shape.intermediate, shape.experts, shape.top_k,
                          routing="softmax_topk", norm_topk_prob=True)
    inter = shape.intermediate
    gate_up = block.experts.gate_up_proj.detach()
    with torch.no_grad():
        ref.gate.weight.copy_(block.gate.weight)
        ref.experts.w_gate.copy_(gate_up[:, :inter])
        ref.experts.w_up.copy_(gate_up[:, inter:])
        ref.experts.w_down.copy_(block.experts.down_proj)
    return ref.to(block.gate.weight.dtype).eval()


class Moec(System):
    kind = "moec"

    def __init__(self, block: Any, shape: LayerShape, max_tokens: int) -> None:
        import torch

        import moec
        from moec.errors import MoecError

        super().__init__("moec", "moec.compile of the transformers block")
        self.block = block
        self.half = block_dtype(block) != "float32"
        example = (torch.randn(5, shape.hidden).to(block.gate.weight.dtype),)
        t0 = time.perf_counter()
        try:
            art = moec.compile(block, example, max_tokens=max_tokens)
        except MoecError as e:  # not a crash: a family the frontend or codegen does not cover
            first = " ".join(str(e).split())[:200]
            art = moec.compile(reference_block(block, shape), example, max_tokens=max_tokens)
            self.note = (f"FALLBACK: the transformers block did not compile ({first}); "
                         f"compiled moec.models.reference.StackedMoEBlock with the same weights")
        self.compile_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        self.model = art.load_model()  # saves to a temporary folder (hashes) and loads
        self.note += f" (then saved and loaded in {time.perf_counter() - t1:.1f} s)"
        del art  # its weights are now in the loaded model

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.half:  # the artifact takes the block's dtype: a torch bf16 tensor in and out
            return self.model(to_block(self.block, x)[0]).float().numpy()
        return self.model(x)


def build_systems(block: Any, shape: LayerShape, kinds: tuple[str, ...], max_tokens: int,
                  threads: int, hf_impls: tuple[str, ...]) -> tuple[list[System], dict[str, str]]:
    """(systems in run order, {kind: why it is missing}). `hf-eager` always comes first: it is
    the reference the others are checked against, timed or not."""
    from moec.bench import ort

    systems: list[System] = [HFBlock(block, shape, "eager")]
    missing: dict[str, str] = {}
    if "hf" in kinds:
        systems += [HFBlock(block, shape, i) for i in hf_impls if i != "eager"]
    if "torch.compile" in kinds:
        systems.append(TorchCompile(block, shape))
    if "ort" in kinds:
        why = ort.available() or (None if block_dtype(block) == "float32" else
                                  "ONNX Runtime's CPU MoE kernel has no bfloat16 implementation "
                                  "(onnxruntime 1.32 answers NOT_IMPLEMENTED; it takes float32 "
                                  "and float16), so this harness builds its graph in float32 "
                                  "only")
        if why is None:
            try:
                systems.append(OrtSystem(block, shape, threads))
            except Exception as e:  # an ORT without the op, or a graph it rejects
                missing["ort"] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        else:
            missing["ort"] = why
    if "moec" in kinds:
        try:
            systems.append(Moec(block, shape, max_tokens))
        except Exception as e:
            missing["moec"] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
    return systems, missing
