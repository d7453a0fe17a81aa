"""Pass, PassContext and the pass registry (built-in passes, user passes and plugins).

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

Options are type-checked when the pass is built (`MyPass(threshold="x")` is a PassError, as is
`my-pass{threshold=x}`). A name is registered once: a second class under a taken name is refused
unless it is registered with `@register_pass(override=True)`.

Plugins: installed packages add passes through the `moec.passes` entry-point group
(`my-pass = my_package:MyPass`, the key equal to the pass's name). Each entry point is loaded once
per process when the registry is first used; one that fails (import error, not a Pass subclass,
a taken name) is reported once on stderr, naming the distribution and the entry point, and the
rest of moec works without it (`plugin_problems()` lists them, `reload_plugins()` tries again).
"""

from __future__ import annotations

import dataclasses
import re
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from moec.errors import PassError
from moec.ir.graph import Graph


@dataclass
class PassContext:
    """What passes share during one pipeline run: options and statistics.

    `stats` maps `"pass-name.what"` to a number (or a small JSON-able value) that a pass wants
    the user to see: `--time-passes` and `--stats` print them, and `moec.compile` records them in
    the artifact's manifest (`meta.pass_stats`)."""

    verify: bool = True
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Pass:
    """Base class of every pass. Subclasses set `name` and implement `run`."""

    name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        check_options(self)

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def spec(self) -> str:
        """The pass as written in a pipeline string: `name{opt=value,...}` (non-default options)."""
        opts = [f"{f.name}={_spec_value(getattr(self, f.name))}" for f in dataclasses.fields(self)
                if getattr(self, f.name) != f.default]
        return self.name + ("{" + ",".join(opts) + "}" if opts else "")

    @classmethod
    def doc_line(cls) -> str:
        """The docstring's first sentence (which may span lines), on one line."""
        para = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
        m = re.search(r"(?<!\be\.g)(?<!\bi\.e)\.(\s|$)", para)
        return para[:m.start() + 1] if m else para

    @classmethod
    def option_table(cls) -> list[tuple[str, str, Any]]:
        """(name, type, default) of every option, in declaration order."""
        hints = _hints(cls)
        out = []
        for f in dataclasses.fields(cls) if dataclasses.is_dataclass(cls) else ():
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING
                else "(required)")
            out.append((f.name, _type_name(hints.get(f.name, f.type)), default))
        return out


def _spec_value(v: Any) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else str(v)


# --------------------------------------------------------------------------- option types


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation naming something local to a function: no checks for it
        return {}


def _type_name(t: Any) -> str:
    if isinstance(t, str):
        return t
    if isinstance(t, type) and not typing.get_args(t):
        return t.__name__
    return str(t).replace("typing.", "")


def _accepts(want: Any, value: Any) -> bool | None:
    """Whether `value` fits the annotation `want`; None when the annotation is not checked."""
    if want is Any:
        return None
    origin = typing.get_origin(want)
    if origin is typing.Literal:
        return value in typing.get_args(want)
    if origin in (typing.Union, types.UnionType):
        verdicts = [_accepts(a, value) for a in typing.get_args(want)]
        return None if any(v is None for v in verdicts) else any(verdicts)
    if want is type(None):
        return value is None
    if want is bool:
        return isinstance(value, bool)
    if want is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if want is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if want is str:
        return isinstance(value, str)
    return None


def check_options(p: Pass) -> None:
    """Raise PassError when an option's value does not fit its annotation (int, float, bool,
    str, `X | None`, Literal); other annotations are not checked."""
    hints = _hints(type(p))
    for f in dataclasses.fields(p):
        want, got = hints.get(f.name), getattr(p, f.name)
        if want is not None and _accepts(want, got) is False:
            raise PassError(f"bad options for pass {p.name}: {f.name}={got!r} is not "
                            f"{_type_name(want)} (options: {options_help(type(p))})")


def options_help(cls: type[Pass]) -> str:
    table = cls.option_table()
    return ", ".join(f"{n}: {t} = {d!r}" for n, t, d in table) if table else "none"


# --------------------------------------------------------------------------- registry

_REGISTRY: dict[str, type[Pass]] = {}
_ORIGIN: dict[str, str] = {}  # pass name -> "built-in", "module NAME", "plugin DIST VERSION"
_OVERRIDDEN: dict[str, tuple[type[Pass], str]] = {}  # what an override replaced


def _origin_of(cls: type) -> str:
    mod = cls.__module__ or "?"
    return "built-in" if mod.startswith("moec.") else f"module {mod}"


def register_pass(cls: type[Pass] | None = None, *, override: bool = False
                  ) -> Any:
    """Class decorator: make a pass available by name (pipelines, --passes, moec opt).

    `@register_pass` refuses a name that another class already holds (a built-in pass, another
    module's); `@register_pass(override=True)` replaces it on purpose. Registering the same class
    again (a module executed twice) is allowed."""
    def register(c: type[Pass]) -> type[Pass]:
        if not (isinstance(c, type) and issubclass(c, Pass)):
            raise PassError(f"register_pass: {c!r} is not a subclass of moec.Pass")
        if not re.fullmatch(r"[a-z][a-z0-9]*(-[a-z0-9]+)*", c.name or ""):
            raise PassError(f"pass {c.__name__} needs a kebab-case `name`, got {c.name!r}")
        origin = _origin_of(c)
        if origin != "built-in":
            _load_library()  # built-ins first, so that a collision is always seen as one
        old = _REGISTRY.get(c.name)
        if old is not None and old is not c and _qualname(old) != _qualname(c):
            if not override:
                raise PassError(
                    f"pass name {c.name!r} of {_qualname(c)} is already taken by "
                    f"{_qualname(old)} ({_ORIGIN.get(c.name, '?')}); choose another name, or "
                    f"register with @register_pass(override=True) to replace it")
            origin += f", overrides {_ORIGIN.get(c.name, '?')} {_qualname(old)}"
            _OVERRIDDEN.setdefault(c.name, (old, _ORIGIN.get(c.name, "?")))
        _REGISTRY[c.name] = c
        _ORIGIN[c.name] = origin
        return c

    return register if cls is None else register(cls)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def registered_passes() -> dict[str, type[Pass]]:
    _load_builtin()
    return dict(sorted(_REGISTRY.items()))


def pass_origin(name: str) -> str:
    """Where a registered pass comes from: "built-in", "module NAME" or "plugin DIST VERSION"."""
    _load_builtin()
    return _ORIGIN.get(name, "?")


def get_pass(name: str) -> type[Pass]:
    _load_builtin()
    if name not in _REGISTRY:
        import difflib

        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        broken = f" ({len(_PROBLEMS)} plugin(s) failed to load: `moec passes`)" if _PROBLEMS \
            else ""
        raise PassError(f"unknown pass {name!r}; {hint}`moec passes` lists them: "
                        f"{', '.join(sorted(_REGISTRY))}{broken}")
    return _REGISTRY[name]


def _load_library() -> None:
    import moec.passes.library  # noqa: F401  (registers the built-in passes)


def _load_builtin() -> None:
    _load_library()
    _load_plugins()


# --------------------------------------------------------------------------- plugins

_plugins_loaded = False
_plugins_loading = False
_PROBLEMS: list[str] = []


def plugin_problems() -> list[str]:
    """One line per plugin entry point that failed to load (or loaded with a warning)."""
    _load_builtin()
    return list(_PROBLEMS)


def reload_plugins() -> None:
    """Load the `moec.passes` entry points again (after installing or fixing a plugin)."""
    global _plugins_loaded
    for name in [n for n, o in _ORIGIN.items() if o.startswith("plugin ")]:
        _REGISTRY.pop(name, None)
        _ORIGIN.pop(name, None)
        if name in _OVERRIDDEN:
            _REGISTRY[name], _ORIGIN[name] = _OVERRIDDEN.pop(name)
    _PROBLEMS.clear()
    _plugins_loaded = False
    _load_builtin()


def _load_plugins(entry_points: Callable[[], Any] | None = None) -> None:
    """Passes installed by other packages through the `moec.passes` entry-point group."""
    global _plugins_loaded, _plugins_loading
    if _plugins_loaded or _plugins_loading:
        return  # loaded, or a plugin being imported uses the registry itself
    _plugins_loading = True
    try:
        if entry_points is None:
            from importlib.metadata import entry_points as _eps

            def entry_points() -> Any:
                return _eps(group="moec.passes")
        for ep in entry_points():
            problem = _load_entry_point(ep)
            if problem:
                _PROBLEMS.append(problem)
                print(f"moec: warning: {problem}", file=sys.stderr)
        _plugins_loaded = True
    finally:
        _plugins_loading = False


def _dist(ep: Any) -> str:
    dist = getattr(ep, "dist", None)
    return f"{dist.name} {dist.version}" if dist is not None else "(unknown distribution)"


def _describe(ep: Any) -> str:
    return f"plugin {_dist(ep)}, entry point `{ep.name} = {ep.value}`"


def _load_entry_point(ep: Any) -> str | None:
    """Register the pass of one entry point. Returns what went wrong, or None."""
    what = _describe(ep)
    try:
        obj = ep.load()
    except Exception as e:
        return (f"{what} failed to load: {type(e).__name__}: {e}; its passes are not "
                f"available (the rest of moec works)")
    if not (isinstance(obj, type) and issubclass(obj, Pass)):
        kind = type(obj).__name__ if not isinstance(obj, type) else f"class {obj.__name__}"
        return (f"{what} is a {kind}, not a subclass of moec.Pass: point the entry point at "
                f"the pass class; ignored")
    origin = f"plugin {_dist(ep)}"
    if _REGISTRY.get(obj.name) is not obj:  # not registered by its own module at import
        try:
            register_pass(obj)
        except PassError as e:
            return f"{what}: {e}; ignored"
    prev = _ORIGIN.get(obj.name, "")
    _ORIGIN[obj.name] = origin + (prev[prev.index(", overrides"):] if ", overrides" in prev
                                  else "")
    if ep.name != obj.name:
        return (f"{what}: the key {ep.name!r} differs from the pass's name {obj.name!r}; the "
                f"pass is registered as {obj.name!r} (make the key {obj.name!r})")
    return None
