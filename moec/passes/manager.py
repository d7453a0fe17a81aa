"""PassManager, pass instruments and pipeline strings.

    pm = PassManager(parse_pipeline("default"), instruments=[PassTiming(), DumpIR("dumps/")])
    pm.run(graph)

Instruments see every pass before and after it runs (TVM's PassInstrument model): timing, IR
dumps (`003_fuse-gating.ir`), verification (on by default: a broken pass is named, with the IR
before it dumped), and a numeric check against the reference interpreter that names the pass
that changed the numbers.
"""

from __future__ import annotations

import re
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moec import env
from moec.errors import IRError, MoecError, PassError
from moec.ir.graph import Graph
from moec.ir.interpreter import interpret
from moec.ir.printer import print_graph
from moec.ir.verifier import verify
from moec.passes.base import Pass, PassContext, check_options, get_pass, options_help


class Instrument:
    """Hooks around every pass. Override what you need. The PassManager sets `ctx` (the
    PassContext, with the statistics) and `manager` before the first pass."""

    ctx: PassContext | None = None
    manager: PassManager | None = None

    def before_pass(self, p: Pass, graph: Graph, index: int) -> None: ...

    def after_pass(self, p: Pass, graph: Graph, index: int, changed: bool) -> None: ...

    def finish(self) -> None: ...


class PassTiming(Instrument):
    """Wall time per pass; `report()` is a table (the CLI's --time-passes)."""

    def __init__(self, stream: Any = None) -> None:
        self.times: list[tuple[str, float, bool]] = []
        self.stream = stream
        self._t0 = 0.0

    def before_pass(self, p: Pass, graph: Graph, index: int) -> None:
        self._t0 = time.perf_counter()

    def after_pass(self, p: Pass, graph: Graph, index: int, changed: bool) -> None:
        self.times.append((p.spec(), time.perf_counter() - self._t0, changed))

    def report(self) -> str:
        total = sum(t for _, t, _ in self.times) or 1e-12
        lines = [f"{'pass':<32} {'ms':>9} {'%':>6}  changed"]
        for name, t, ch in self.times:
            flag = "yes" if ch else "no"
            lines.append(f"{name:<32} {t * 1e3:9.2f} {100 * t / total:6.1f}  {flag}")
        lines.append(f"{'total':<32} {total * 1e3:9.2f}")
        stats = format_stats(self.manager.stats_by_pass) if self.manager is not None else ""
        return "\n".join(lines) + ("\n" + stats if stats else "")

    def finish(self) -> None:
        if self.stream is not None:
            print(self.report(), file=self.stream)


class PrintStats(Instrument):
    """Prints the statistics the passes recorded in `ctx.stats`, per pass (the CLI's --stats)."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream if stream is not None else sys.stderr

    def finish(self) -> None:
        if self.manager is not None:
            print(format_stats(self.manager.stats_by_pass) or "statistics: none recorded",
                  file=self.stream)


def format_stats(stats_by_pass: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """`statistics:` then one `  pass  key = value` line per statistic ("" when none)."""
    lines = [f"  {spec:<30} {k} = {v}" for spec, d in stats_by_pass for k, v in d.items()]
    return "\n".join(["statistics:", *lines]) if lines else ""


def stats_json(stats: dict[str, Any]) -> dict[str, Any]:
    """`ctx.stats` as JSON values (numbers, strings, lists, dicts; anything else as text)."""
    def conv(v: Any) -> Any:
        if isinstance(v, (bool, int, float, str)) or v is None:
            return v
        if isinstance(v, np.generic):
            return v.item()
        if isinstance(v, dict):
            return {str(k): conv(x) for k, x in v.items()}
        if isinstance(v, (list, tuple, np.ndarray)):
            return [conv(x) for x in list(v)]
        return str(v)

    return {str(k): conv(v) for k, v in stats.items()}


class DumpIR(Instrument):
    """Writes the IR before the pipeline (000_input.ir) and after each pass (NNN_name.ir)."""

    def __init__(self, directory: str | Path, only_changed: bool = False) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.only_changed = only_changed

    def before_pass(self, p: Pass, graph: Graph, index: int) -> None:
        if index == 0:
            (self.dir / "000_input.ir").write_text(print_graph(graph))

    def after_pass(self, p: Pass, graph: Graph, index: int, changed: bool) -> None:
        if changed or not self.only_changed:
            (self.dir / f"{index + 1:03d}_{p.name}.ir").write_text(print_graph(graph))


class PrintIR(Instrument):
    """Prints the IR after each pass that changed it (MOEC_DEBUG=2)."""

    def after_pass(self, p: Pass, graph: Graph, index: int, changed: bool) -> None:
        if changed:
            print(f"// ----- after {p.spec()}\n{print_graph(graph)}", file=sys.stderr)


class NumericCheck(Instrument):
    """Runs the reference interpreter on `inputs` before the pipeline and after every pass; raises
    PassError naming the first pass whose graph outputs differ (max relative error > rtol)."""

    def __init__(self, inputs: Sequence[np.ndarray], rtol: float = 1e-4) -> None:
        self.inputs = list(inputs)
        self.rtol = rtol
        self.expected: list[np.ndarray] | None = None
        self._before = ""

    def before_pass(self, p: Pass, graph: Graph, index: int) -> None:
        if self.expected is None:
            self.expected = interpret(graph, self.inputs)
        self._before = print_graph(graph)

    def after_pass(self, p: Pass, graph: Graph, index: int, changed: bool) -> None:
        if not changed:
            return
        got = interpret(graph, self.inputs)
        assert self.expected is not None
        for i, (e, g) in enumerate(zip(self.expected, got, strict=True)):
            err = relative_error(g, e)
            if err > self.rtol:
                dump = _dump(self._before, p.name)
                raise PassError(f"pass {p.spec()} changed output {i}: max relative error "
                                f"{err:.3g} > {self.rtol} (IR before the pass: {dump})")


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max(max |want|, tiny): the error measure used throughout moec."""
    if got.shape != want.shape:
        return float("inf")
    if got.size == 0:
        return 0.0
    g, w = got.astype(np.float64), want.astype(np.float64)
    return float(np.max(np.abs(g - w)) / max(float(np.max(np.abs(w))), 1e-30))


def _dump(text: str, name: str) -> str:
    """Where the IR before a failing pass was kept, for its error message. Only with MOEC_DEBUG
    >= 1, in env.debug_dir(): a failing pass used to leave a file in the temporary folder every
    time (hundreds after a fuzzing run)."""
    if env.debug_level() < 1:
        return "set MOEC_DEBUG=1 to keep it in a file"
    folder = env.debug_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=folder, prefix=time.strftime("%Y%m%d-%H%M%S-"),
                                         suffix=f"_before_{name}.ir", delete=False) as f:
            f.write(text)
    except OSError as e:
        return f"not kept: {folder} is not writable ({e.strerror}); set MOEC_DEBUG_DIR"
    return f.name


class PassManager:
    """Runs passes in order with instruments; verifies after each pass unless told not to.

    With verification on (the default) the manager also compares the IR text before and after
    each pass, so a pass that changes the graph but returns False is named; any exception that
    escapes a pass becomes a PassError naming the pass, with the IR before it dumped to a file.
    Statistics that passes write to `ctx.stats` are kept per pass in `stats_by_pass`."""

    def __init__(self, passes: Sequence[Pass], instruments: Sequence[Instrument] = (),
                 verify: bool = True) -> None:
        self.passes = list(passes)
        for p in self.passes:
            if not isinstance(p, Pass):
                raise PassError(f"PassManager takes Pass objects, got {p!r}; build pass lists "
                                f"from strings with parse_pipeline")
            check_options(p)  # also when a subclass's own __post_init__ skipped the check
        self.instruments = list(instruments)
        level = env.debug_level()
        if level >= 1 and not any(isinstance(i, PassTiming) for i in self.instruments):
            self.instruments.append(PassTiming(stream=sys.stderr))
        if level >= 2:
            self.instruments.append(PrintIR())
        self.ctx = PassContext(verify=verify)
        self.stats_by_pass: list[tuple[str, dict[str, Any]]] = []
        for ins in self.instruments:
            ins.ctx = self.ctx
            ins.manager = self

    def run(self, graph: Graph) -> Graph:
        verifying = self.ctx.verify
        if verifying:
            verify(graph)
        keep = verifying or env.debug_level() >= 1  # the IR before each pass, for its errors
        before = print_graph(graph) if keep else ""
        for i, p in enumerate(self.passes):
            for ins in self.instruments:
                ins.before_pass(p, graph, i)
            stats_before = dict(self.ctx.stats)
            try:
                changed = bool(p.run(graph, self.ctx))
            except PassError:
                raise
            except Exception as e:
                raise PassError(f"pass {p.spec()} failed: {_exc_line(e, p)}"
                                f"{_before_note(before, p)}") from e
            after = print_graph(graph) if keep else ""
            if verifying:
                try:
                    verify(graph)
                except IRError as e:
                    raise PassError(f"pass {p.spec()} left invalid IR: {e}"
                                    f"{_before_note(before, p)}") from e
                if not changed and after != before:
                    raise PassError(f"pass {p.spec()} returned False but changed the IR; `run` "
                                    f"must return True when it changes the graph"
                                    f"{_before_note(before, p)}")
            new = {k: v for k, v in self.ctx.stats.items()
                   if k not in stats_before or stats_before[k] is not v}
            if new:
                self.stats_by_pass.append((p.spec(), new))
            for ins in self.instruments:
                ins.after_pass(p, graph, i, changed)
            before = after
        for ins in self.instruments:
            ins.finish()
        return graph


def _exc_line(e: Exception, p: Pass) -> str:
    """`KeyError: 'top_k' (at my_pass.py:12 in match_and_rewrite)`: the exception and the
    innermost frame in the pass's own file (else the innermost frame)."""
    import inspect
    import traceback

    frames = traceback.extract_tb(e.__traceback__)
    try:
        own = inspect.getsourcefile(type(p))
    except TypeError:
        own = None
    mine = [f for f in frames if own and f.filename == own]
    f = (mine or frames or [None])[-1]
    where = f" (at {Path(f.filename).name}:{f.lineno} in {f.name})" if f is not None else ""
    msg = str(e) if isinstance(e, MoecError) else f"{type(e).__name__}: {e}"
    return msg + where


def _before_note(before: str, p: Pass) -> str:
    if not before:
        return " (run with verification on to get the IR before the pass)"
    return f" (IR before the pass: {_dump(before, p.name)})"


# --------------------------------------------------------------------------- pipeline strings

_NAME = r"[a-z][a-z0-9\-]*"
_ITEM = re.compile(rf"\s*(\+?)({_NAME})\s*(?:\{{([^}}]*)\}})?\s*"
                   rf"(?:@\s*(after|before)\s*:\s*({_NAME})(?:#(\d+))?)?\s*(?:,|$)")


def _option(value: str) -> Any:
    v = value.strip()
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return v.strip("\"'")


def parse_pipeline(spec: str | Sequence[str | Pass]) -> list[Pass]:
    """Pass objects from a pass list: `"default,+my-pass{opt=1}"`, or a list of such strings
    and Pass objects.

    A named pipeline expands in place; `name` or `+name` appends a pass; `name@after:other`
    (or `@before:other`) inserts it next to the pass `other` among those listed before it, e.g.
    `default,cap-topk{k=1}@after:fuse-gating`; `other#2` picks the second of several."""
    from moec.passes.pipelines import PIPELINES

    items: list[str | Pass] = []
    if isinstance(spec, str):
        pos = 0
        spec = spec.strip()
        while pos < len(spec):
            m = _ITEM.match(spec, pos)
            if not m or m.end() == pos:
                raise PassError(f"cannot parse pass list {spec!r} at {spec[pos:]!r}; write "
                                f"name,name{{opt=value}},name@after:other")
            items.append(m.group(0).strip().rstrip(","))
            pos = m.end()
    else:
        items = list(spec)
    out: list[Pass] = []
    for item in items:
        if isinstance(item, Pass):
            out.append(item)
            continue
        if not isinstance(item, str):
            raise PassError(f"a pass list holds names and Pass objects, got {item!r}")
        m = _ITEM.fullmatch(item.strip())
        if m is None:
            raise PassError(f"cannot parse pass {item!r}; write name, name{{opt=value}} or "
                            f"name@after:other")
        name, opts, where, anchor, nth = m.group(2), m.group(3), m.group(4), m.group(5), m.group(6)
        if name in PIPELINES and opts is None:
            if where:
                raise PassError(f"{item!r}: a named pipeline cannot be placed with @{where}")
            out.extend(parse_pipeline(PIPELINES[name]))
            continue
        p = _build(name, opts)
        if where:
            insert_pass(out, p, **{where: anchor}, occurrence=int(nth) if nth else None)
        else:
            out.append(p)
    return out


def _build(name: str, opts: str | None) -> Pass:
    cls = get_pass(name)
    kwargs: dict[str, Any] = {}
    for kv in filter(None, (x.strip() for x in (opts or "").split(","))):
        if "=" not in kv:
            raise PassError(f"pass option {kv!r} of {name} must be key=value (options: "
                            f"{options_help(cls)})")
        k, v = (x.strip() for x in kv.split("=", 1))
        kwargs[k] = _option(v)
    known = {n for n, _, _ in cls.option_table()}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        import difflib

        close = [c for u in unknown for c in difflib.get_close_matches(u, known, n=1)]
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise PassError(f"bad options for pass {name}: no option {', '.join(unknown)}; {hint}its "
                        f"options: "
                        f"{options_help(cls)}")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise PassError(f"bad options for pass {name}: {e} (options: {options_help(cls)})") \
            from None


def insert_pass(passes: list[Pass], p: Pass, *, after: str | None = None,
                before: str | None = None, occurrence: int | None = None) -> list[Pass]:
    """Insert `p` into `passes` (in place) right after or before the pass named `after` /
    `before`. When that name occurs more than once, `occurrence` (1-based) says which."""
    if (after is None) == (before is None):
        raise PassError("insert_pass: give exactly one of after= and before=")
    anchor = after or before
    where = "after" if after else "before"
    at = [i for i, q in enumerate(passes) if q.name == anchor]
    listed = ", ".join(q.spec() for q in passes) or "none"
    if not at:
        raise PassError(f"{p.spec()}@{where}:{anchor}: no pass {anchor} among the passes "
                        f"listed before it ({listed})")
    if occurrence is None and len(at) > 1:
        raise PassError(f"{p.spec()}@{where}:{anchor}: {anchor} occurs {len(at)} times; write "
                        f"@{where}:{anchor}#1 .. #{len(at)}")
    n = occurrence or 1
    if not 1 <= n <= len(at):
        raise PassError(f"{p.spec()}@{where}:{anchor}#{n}: {anchor} occurs {len(at)} time(s)")
    i = at[n - 1]
    passes.insert(i + 1 if after else i, p)
    return passes
