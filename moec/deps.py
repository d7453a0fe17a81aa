"""Packages that only some uses of moec need, imported with an error that names what to
install: transformers (the `hf` extra) to compile, profile or tune a Hugging Face checkpoint
folder; tokenizers and jinja2 (dependencies of moec) for the text and chat templates of a
generation artifact."""

from __future__ import annotations

import importlib
from types import ModuleType

from moec.errors import DependencyError

HF = "pip install 'moec[hf]'"  # transformers, at the version moec is tested with


def require(module: str, purpose: str, install: str) -> ModuleType:
    """`import module`, or DependencyError: "<purpose> needs <module> ...: <install>"."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise DependencyError(f"{purpose} needs the `{module.split('.')[0]}` package, which "
                              f"cannot be imported ({e}): {install}") from None
