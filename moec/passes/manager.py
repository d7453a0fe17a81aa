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
from moec.errors import IRError, PassError
from moec.ir.graph import Graph
from moec.ir.interpreter import interpret
from moec.ir.printer import print_graph
from moec.ir.verifier import verify
from moec.passes.base import Pass, PassContext, get_pass


class Instrument:
    """Hooks around every pass. Override what you need."""

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
        return "\n".join(lines)

    def finish(self) -> None:
        if self.stream is not None:
            print(self.report(), file=self.stream)


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
    """Runs passes in order with instruments; verifies after each pass unless told not to."""

    def __init__(self, passes: Sequence[Pass], instruments: Sequence[Instrument] = (),
                 verify: bool = True) -> None:
        self.passes = list(passes)
        self.instruments = list(instruments)
        level = env.debug_level()
        if level >= 1 and not any(isinstance(i, PassTiming) for i in self.instruments):
            self.instruments.append(PassTiming(stream=sys.stderr))
        if level >= 2:
            self.instruments.append(PrintIR())
        self.ctx = PassContext(verify=verify)

    def run(self, graph: Graph) -> Graph:
        if self.ctx.verify:
            verify(graph)
        for i, p in enumerate(self.passes):
            keep = self.ctx.verify or env.debug_level() >= 1
            before = print_graph(graph) if keep else "(not printed: verification is off)"
            for ins in self.instruments:
                ins.before_pass(p, graph, i)
            try:
                changed = bool(p.run(graph, self.ctx))
            except PassError:
                raise
            except IRError as e:
                raise PassError(f"pass {p.spec()} failed: {e} (IR before the pass: "
                                f"{_dump(before, p.name)})") from e
            if self.ctx.verify:
                try:
                    verify(graph)
                except IRError as e:
                    raise PassError(f"pass {p.spec()} left invalid IR: {e} (IR before the pass: "
                                    f"{_dump(before, p.name)})") from e
            for ins in self.instruments:
                ins.after_pass(p, graph, i, changed)
        for ins in self.instruments:
            ins.finish()
        return graph


# --------------------------------------------------------------------------- pipeline strings

_ITEM = re.compile(r"\s*(\+?)([a-z][a-z0-9\-]*)\s*(?:\{([^}]*)\})?\s*(?:,|$)")


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
    """`"default,+my-pass{opt=1}"` -> pass objects. A named pipeline expands in place; `+name`
    (or a plain name) appends a pass; objects are taken as they are."""
    from moec.passes.pipelines import PIPELINES

    items: list[str | Pass] = []
    if isinstance(spec, str):
        pos = 0
        spec = spec.strip()
        while pos < len(spec):
            m = _ITEM.match(spec, pos)
            if not m or m.end() == pos:
                raise PassError(f"cannot parse pass list {spec!r} at {spec[pos:]!r}; write "
                                f"name,name{{opt=value}}")
            items.append(m.group(0).strip().rstrip(",").lstrip("+"))
            pos = m.end()
    else:
        items = list(spec)
    out: list[Pass] = []
    for item in items:
        if isinstance(item, Pass):
            out.append(item)
            continue
        m = _ITEM.match(item)
        assert m is not None
        name, opts = m.group(2), m.group(3)
        if name in PIPELINES and not opts:
            out.extend(parse_pipeline(PIPELINES[name]))
            continue
        cls = get_pass(name)
        kwargs: dict[str, Any] = {}
        for kv in filter(None, (opts or "").split(",")):
            if "=" not in kv:
                raise PassError(f"pass option {kv!r} of {name} must be key=value")
            k, v = kv.split("=", 1)
            kwargs[k.strip()] = _option(v)
        try:
            out.append(cls(**kwargs))
        except TypeError as e:
            raise PassError(f"bad options for pass {name}: {e}") from None
        _check_option_types(out[-1])
    return out


def _check_option_types(p: Pass) -> None:
    import dataclasses
    import typing

    hints = typing.get_type_hints(type(p))
    for f in dataclasses.fields(p):
        want, got = hints.get(f.name), getattr(p, f.name)
        if want in (int, float, bool, str) and not (
                isinstance(got, want) or (want is float and isinstance(got, int))) or \
                (want is int and isinstance(got, bool)):
            raise PassError(f"bad options for pass {p.name}: {f.name}={got!r} is not "
                            f"{want.__name__}")
