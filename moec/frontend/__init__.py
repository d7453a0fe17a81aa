"""Frontends: torch modules (through torch.export) to moec IR, with MoE block recognition.

    from moec.frontend import from_torch
    graph = from_torch(model, (x,), max_tokens=4096)

MoE blocks are recognised structurally (Hugging Face families and anything with the same parts);
other block kinds: `register_moe_recognizer` (docs/frontend.md).
"""

from moec.frontend.moe_recognize import MoESpec, recognize_moe
from moec.frontend.torch_frontend import (
    MoECall,
    find_moe_blocks,
    from_torch,
    register_moe_recognizer,
    unregister_moe_recognizer,
)

__all__ = ["MoECall", "MoESpec", "find_moe_blocks", "from_torch", "recognize_moe",
           "register_moe_recognizer", "unregister_moe_recognizer"]
