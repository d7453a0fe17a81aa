"""The error expert parallelism raises when ranks disagree, die or stop answering."""

from __future__ import annotations

from moec.errors import MoecError


class DistributedError(MoecError):
    """Ranks of an expert-parallel group disagree (artifact, inputs, load failures), or a
    collective failed: a peer died, or hung past the process group's timeout."""
