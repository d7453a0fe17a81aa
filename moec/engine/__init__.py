"""moec's generation engine, on top of moec.runtime (torch-free like it): a paged KV-cache
pool (`KVPool`), continuous batching with chunked prefill and preemption (`Engine`), sampling
(`SamplingParams`), the artifact's tokenizer and chat template (`Tokenizer`), and the user
facing `LanguageModel` that `moec.load` returns for a generation artifact."""

from moec.engine.engine import Engine, Request
from moec.engine.kv_pool import KVPool, parse_bytes
from moec.engine.llm import Completion, LanguageModel, StreamEvent
from moec.engine.sampling import SamplingParams
from moec.engine.tokenizer import Tokenizer

__all__ = ["Completion", "Engine", "KVPool", "LanguageModel", "Request", "SamplingParams",
           "StreamEvent", "Tokenizer", "parse_bytes"]
