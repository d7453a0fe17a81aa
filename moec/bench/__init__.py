"""`moec bench`: a reproducible benchmark of one MoE layer against the systems people use.

    moec bench                                   # Mixtral-like, Qwen3-30B-A3B, DeepSeek-V3-like
    moec bench --quick                           # a small run: fewer tokens and repetitions
    moec bench --shapes mixtral --tokens 1 512 --systems hf ort moec --repeat 5

Per shape (moec.bench.layer), token count and routing (uniform, Zipf-skewed), it times the
transformers block (its fastest experts implementation), torch.compile of it, ONNX Runtime's
com.microsoft MoE op and moec on the same weights and inputs, after checking every output
against the transformers block; measures the machine's memory bandwidth and fp32 GEMM rate in the
same run and derives each case's roofline; prints a table and writes JSON and a PNG plot to
benchmarks/results/ (moec.bench.report).

Modules: `layer` (shapes, blocks, input pools, roofline), `baselines` and `ort` (the systems),
`limits` (bandwidth, GEMM rate), `runner` (the protocol), `report` (table, JSON, plot).
"""

from moec.bench.layer import SHAPES, LayerShape
from moec.bench.runner import Options, run

__all__ = ["SHAPES", "LayerShape", "Options", "run"]
