"""moec's runtime: the artifact format, saving, verifying, loading and running artifacts.

    model = moec.runtime.load("mixtral.moec")        # checks hashes, version, CPU features
    y = model(x)                                      # numpy in -> numpy out, torch -> torch

Imports only numpy, safetensors and (lazily, on first load) TVM's runtime; never torch, unless
the caller passes torch tensors, which means torch is imported already. See `artifact` for the
folder layout and the manifest schema.
"""

from moec.runtime.artifact import Artifact
from moec.runtime.manifest import (
    FORMAT_VERSION,
    DimSpec,
    FileEntry,
    Manifest,
    Signature,
    TensorSpec,
)
from moec.runtime.model import CompiledModel, load
from moec.runtime.verify import verify

__all__ = [
    "FORMAT_VERSION",
    "Artifact",
    "CompiledModel",
    "DimSpec",
    "FileEntry",
    "Manifest",
    "Signature",
    "TensorSpec",
    "load",
    "verify",
]
