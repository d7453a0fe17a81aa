"""`KVPool`: the bookkeeping of a paged KV cache (which blocks are free, who owns what).

The memory itself is `moec.runtime.step.KVCaches`; a sequence owns a list of blocks (its block
table row) and its token at position p lives in block `blocks[p // block_size]`, slot
`p % block_size` (vLLM's PagedAttention layout). Blocks are handed out and returned whole, so
sequences of any lengths share the pool without fragmentation.
"""

from __future__ import annotations

import re

from moec.errors import InputError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "KIB": 2**10, "M": 1e6, "MB": 1e6, "MIB": 2**20,
          "G": 1e9, "GB": 1e9, "GIB": 2**30, "T": 1e12, "TB": 1e12, "TIB": 2**40}


def parse_bytes(size: str | int | float) -> int:
    """'2GB', '512MiB', 1_000_000 -> bytes."""
    if isinstance(size, bool):
        raise InputError(f"a memory size must be a number of bytes or a string like '2GB', "
                         f"got {size!r}")
    if isinstance(size, (int, float)):
        if size <= 0:
            raise InputError(f"a memory size must be > 0, got {size}")
        return int(size)
    m = _SIZE.match(str(size))
    if not m or (m.group(2) or "").upper() not in _UNITS:
        raise InputError(f"cannot read {size!r} as a memory size (e.g. '2GB', '512MiB')")
    n = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
    if n <= 0:
        raise InputError(f"a memory size must be > 0, got {size!r}")
    return n


class PoolFull(Exception):
    """Not enough free blocks (the scheduler preempts or waits; users never see this)."""


class KVPool:
    """Free-block accounting for `num_blocks` blocks of `block_size` tokens."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: low ids handed out first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, tokens: int) -> int:
        """Blocks that hold `tokens` tokens."""
        return -(-tokens // self.block_size)

    def grow(self, blocks: list[int], tokens: int) -> None:
        """Extend `blocks` (a sequence's table) in place to hold `tokens` tokens; PoolFull
        (and no change) if the pool lacks blocks."""
        need = self.blocks_for(tokens) - len(blocks)
        if need <= 0:
            return
        if need > len(self._free):
            raise PoolFull(need)
        for _ in range(need):
            blocks.append(self._free.pop())

    def release(self, blocks: list[int]) -> None:
        """Return a sequence's blocks to the pool (and empty its table)."""
        self._free.extend(reversed(blocks))
        blocks.clear()
