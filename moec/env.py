"""Every environment variable moec reads, in one place.

| variable | meaning |
|---|---|
| MOEC_DEBUG | 0 quiet; 1 pass timings; 2 + IR after each changed pass; 3 + TVM script |
| MOEC_CACHE_DIR | per-user cache (tuning database); default ~/.cache/moec |
| MOEC_NUM_THREADS | kernel threads of each rank of `moec run/bench --ep` (sets TVM_NUM_THREADS
  in the rank processes when unset); in any other process TVM_NUM_THREADS decides |
| MOEC_API_KEY | `moec serve`'s API key when --api-key is not given (off the command line) |
| MOEC_DEBUG_DIR | IR before a failing pass, kept if MOEC_DEBUG >= 1; default CACHE_DIR/debug |
"""

from __future__ import annotations

import os
from pathlib import Path


def debug_level() -> int:
    try:
        return int(os.environ.get("MOEC_DEBUG", "0"))
    except ValueError:
        return 0


def cache_dir() -> Path:
    return Path(os.environ.get("MOEC_CACHE_DIR", Path.home() / ".cache" / "moec"))


def debug_dir() -> Path:
    """The one folder where moec keeps debugging files it was asked for (MOEC_DEBUG >= 1)."""
    v = os.environ.get("MOEC_DEBUG_DIR")
    return Path(v) if v else cache_dir() / "debug"


def api_key() -> str | None:
    return os.environ.get("MOEC_API_KEY") or None
