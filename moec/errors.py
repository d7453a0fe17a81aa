"""moec's exceptions. Every error a user can cause is one of these, with a message that says
what was wrong and what to do."""

from __future__ import annotations


class MoecError(Exception):
    """Base class of every error moec raises on purpose."""


class InputError(MoecError, ValueError):
    """A model input (or a CLI argument) has the wrong shape, dtype, layout or size."""


class UnsupportedError(MoecError):
    """The frontend met an op or module it cannot translate."""


class ArtifactError(MoecError):
    """An artifact is missing files, damaged, of another format version or for another target."""


class IRError(MoecError):
    """Malformed IR: a parse error, a type error, or a failed verification."""


class ParseError(IRError):
    """The text IR could not be parsed; the message names the line."""


class VerificationError(IRError):
    """The IR violates an invariant; the message names the node and what was expected."""


class PassError(MoecError):
    """A pass failed, broke verification or changed the numbers; the message names the pass."""


class CodegenError(MoecError):
    """An op could not be lowered to a kernel for the target."""


class ExecutionError(MoecError, RuntimeError):
    """Running a loaded model failed inside its kernels (for example, out of memory)."""


class DependencyError(MoecError, ImportError):
    """A package that this use of moec needs is not installed; the message says what to
    install (e.g. `pip install 'moec[hf]'` for Hugging Face checkpoint folders)."""
