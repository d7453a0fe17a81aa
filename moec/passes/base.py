"""Pass, PassContext and the pass registry.

A pass is a frozen dataclass with a kebab-case `name`, options as fields, and
`run(graph, ctx) -> bool` (True when it changed the graph):

    @register_pass
    @dataclass(frozen=True)
    class MyPass(Pass):
        '''One line saying what it does. Requires: ... Ensures: ...'''
        name: ClassVar[str] = "my-pass"
        threshold: float = 0.5
        def run(self, graph: Graph, ctx: PassContext) -> bool:
            return apply_patterns(graph, [MyPattern(self.threshold)])
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from moec.errors import PassError
from moec.ir.graph import Graph


@dataclass
class PassContext:
    """What passes share during one pipeline run: options and free-form statistics."""

    verify: bool = True
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Pass:
    """Base class of every pass. Subclasses set `name` and implement `run`."""

    name: ClassVar[str] = ""

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def spec(self) -> str:
        """The pass as written in a pipeline string: `name{opt=value,...}` (non-default options)."""
        opts = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                if getattr(self, f.name) != f.default]
        return self.name + ("{" + ",".join(opts) + "}" if opts else "")

    @classmethod
    def doc_line(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""


_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available by name (pipelines, --passes, moec opt)."""
    if not re.fullmatch(r"[a-z][a-z0-9]*(-[a-z0-9]+)*", cls.name or ""):
        raise PassError(f"pass {cls.__name__} needs a kebab-case `name`, got {cls.name!r}")
    _REGISTRY[cls.name] = cls
    return cls


def registered_passes() -> dict[str, type[Pass]]:
    _load_builtin()
    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> type[Pass]:
    _load_builtin()
    if name not in _REGISTRY:
        raise PassError(f"unknown pass {name!r}; `moec passes` lists them: "
                        f"{', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def _load_builtin() -> None:
    import moec.passes.library  # noqa: F401  (registers the built-in passes)

    _load_plugins()


_plugins_loaded = False


def _load_plugins() -> None:
    """Passes installed by other packages through the `moec.passes` entry-point group."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group="moec.passes"):
        obj = ep.load()
        if isinstance(obj, type) and issubclass(obj, Pass) and obj.name not in _REGISTRY:
            register_pass(obj)
