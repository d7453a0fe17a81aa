"""Parser of the text IR written by `moec.ir.printer` (see its docstring for the format).

Errors are `ParseError`s that name the line, whatever the text: the parser is fuzzed
(tests/reliability/test_fuzz.py) and no other exception may escape it. Parameters parsed from text
carry no data; the interpreter and codegen need a graph whose parameters have data (attach with
`Graph.param_data`).
"""

from __future__ import annotations

import json
import re
from typing import Any

from moec.errors import IRError, ParseError
from moec.ir.graph import Graph, Node
from moec.ir.registry import infer_types
from moec.ir.types import DimLike, Sym, TensorType, same_type

MAX_NESTING = 32
"""Deepest bracket nesting accepted in a dim expression or attribute list (real IR uses 1 or 2;
the limit keeps hostile input from exhausting Python's recursion limit)."""
MAX_DIM_TERMS = 64
"""Most atoms in one dim expression; printing and comparing dims recurse over the expression."""

# Errors that op type inference or dim arithmetic raise when an attribute or dim has the wrong
# type or value (`{k="x"}`, `{axis=[1]}`); they become ParseErrors naming the line and the op.
_INFER_ERRORS = (TypeError, ValueError, KeyError, IndexError, AttributeError, ArithmeticError)

_TOKEN = re.compile(r"""\s*(?:
    (?P<str>"(?:[^"\\]|\\.)*")
  | (?P<num>(?:\d+\.\d+(?:[eE][-+]?\d+)?|\d+[eE][-+]?\d+|\d+|inf|nan)
        (?![A-Za-z0-9_]))
  | (?P<val>[%@][A-Za-z0-9_.\-]+)
  | (?P<name>[A-Za-z_][A-Za-z0-9_.]*)
  | (?P<op>//|\.\.|->|[\[\](){},:=*+\-])
)""", re.VERBOSE)


class _Tokens:
    def __init__(self, text: str, lineno: int) -> None:
        self.toks: list[tuple[str, str]] = []
        self.lineno = lineno
        pos = 0
        text = text.rstrip()
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if not m or m.end() == pos:
                self.error(f"unexpected character {text[pos:pos + 10]!r}")
            pos = m.end()
            kind = m.lastgroup or "op"
            if kind == "num" and len(m.group(kind)) > 64:
                self.error(f"number too long: {m.group(kind)[:20]}...")
            self.toks.append((kind, m.group(kind)))
        self.i = 0
        self.depth = 0  # bracket nesting, against MAX_NESTING
        self.atoms = 0  # atoms in the current dim expression, against MAX_DIM_TERMS

    def enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_NESTING:
            self.error(f"brackets nested deeper than {MAX_NESTING} levels")

    def uint(self) -> int:
        """A non-negative integer literal."""
        s = self.kind("num")
        if not s.isdigit():
            self.error(f"expected a non-negative integer, found {s!r}")
        return int(s)

    def error(self, msg: str) -> None:
        raise ParseError(f"line {self.lineno}: {msg}")

    def peek(self) -> tuple[str, str] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def next(self) -> tuple[str, str]:
        t = self.peek()
        if t is None:
            self.error("unexpected end of line")
        self.i += 1
        return t  # type: ignore[return-value]

    def expect(self, text: str) -> None:
        t = self.next()
        if t[1] != text:
            self.error(f"expected {text!r}, found {t[1]!r}")

    def accept(self, text: str) -> bool:
        t = self.peek()
        if t is not None and t[1] == text and t[0] in ("op", "name"):
            self.i += 1
            return True
        return False

    def kind(self, kind: str) -> str:
        t = self.next()
        if t[0] != kind:
            self.error(f"expected a {kind}, found {t[1]!r}")
        return t[1]

    def done(self) -> None:
        if self.peek() is not None:
            self.error(f"unexpected {self.peek()[1]!r}")  # type: ignore[index]


def _split_comment(raw: str) -> tuple[str, str]:
    """Split at the first '#' outside a quoted string."""
    quoted = escaped = False
    for i, c in enumerate(raw):
        if escaped:
            escaped = False
        elif c == "\\" and quoted:
            escaped = True
        elif c == '"':
            quoted = not quoted
        elif c == "#" and not quoted:
            return raw[:i], raw[i + 1:]
    return raw, ""


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.g = Graph()
        self.env: dict[str, Any] = {}

    # ---------------------------------------------------------------- dims and types
    def dim_atom(self, t: _Tokens) -> DimLike:
        kind, s = t.next()
        t.atoms += 1
        if t.atoms > MAX_DIM_TERMS:
            t.error(f"dim expression longer than {MAX_DIM_TERMS} terms")
        if kind == "num" and s.isdigit():
            return int(s)
        if kind == "name":
            if s not in self.g.dims:
                t.error(f"symbolic dim {s} is not declared (add 'dim {s}: MIN..MAX')")
            return Sym(s)
        if s == "(":
            t.enter()
            d = self.dim_expr(t)
            t.expect(")")
            t.depth -= 1
            return d
        t.error(f"bad dim {s!r}")
        raise AssertionError

    def dim_term(self, t: _Tokens) -> DimLike:
        d = self.dim_atom(t)
        while True:
            if t.accept("*"):
                d = d * self.dim_atom(t)
            elif t.accept("//"):
                divisor = self.dim_atom(t)
                if isinstance(divisor, int) and divisor == 0:
                    t.error("division by zero in a dim expression")
                d = d // divisor
            else:
                return d

    def dim_expr(self, t: _Tokens) -> DimLike:
        d = self.dim_term(t)
        while True:
            if t.accept("+"):
                d = d + self.dim_term(t)
            elif t.accept("-"):
                d = d - self.dim_term(t)
            else:
                return d

    def type(self, t: _Tokens) -> TensorType:
        dtype = t.kind("name")
        t.expect("[")
        shape: list[DimLike] = []
        if not t.accept("]"):
            while True:
                t.atoms = 0
                try:
                    shape.append(self.dim_expr(t))
                except IRError as e:  # dim arithmetic: division by zero, too many terms
                    t.error(str(e))
                if t.accept("]"):
                    break
                t.expect(",")
        try:
            return TensorType(tuple(shape), dtype)
        except IRError as e:
            t.error(str(e))
            raise

    # ---------------------------------------------------------------- attributes
    def attr_value(self, t: _Tokens) -> Any:
        kind, s = t.next()
        if kind == "str":
            try:
                value = json.loads(s)
                value.encode("utf-8")  # lone surrogates ("\\ud800") could not be saved
            except (ValueError, UnicodeError) as e:  # JSONDecodeError is a ValueError
                t.error(f"bad string literal {s[:40]!r}: {e}")
            return value
        if kind == "num":
            return int(s) if re.fullmatch(r"[-+]?\d+", s) else float(s)
        if kind == "name":
            return {"true": True, "false": False, "none": None}.get(s, s)
        if s == "-":  # '-inf'
            t.enter()  # '- - - 1' recurses too
            v = self.attr_value(t)
            t.depth -= 1
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                t.error(f"'-' must precede a number, not {v!r}")
            return -v
        if s == "[":
            t.enter()
            out = []
            if not t.accept("]"):
                while True:
                    out.append(self.attr_value(t))
                    if t.accept("]"):
                        break
                    t.expect(",")
            t.depth -= 1
            return out
        t.error(f"bad attribute value {s!r}")

    def attrs(self, t: _Tokens) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if not t.accept("{"):
            return out
        if t.accept("}"):
            return out
        while True:
            key = t.kind("name")
            t.expect("=")
            out[key] = self.attr_value(t)
            if t.accept("}"):
                return out
            t.expect(",")

    # ---------------------------------------------------------------- lines
    def value(self, t: _Tokens):
        ref = t.kind("val")
        if ref not in self.env:
            t.error(f"{ref} is used before it is defined")
        return self.env[ref]

    def line(self, raw: str, lineno: int) -> None:
        code, loc = _split_comment(raw)
        code, loc = code.strip(), loc.strip() or None
        if not code:
            return
        t = _Tokens(code, lineno)
        head = t.peek()
        assert head is not None
        if head == ("name", "dim"):
            t.next()
            name = t.kind("name")
            t.expect(":")
            lo = t.uint()
            t.expect("..")
            hi = t.uint()
            t.done()
            self.g.add_dim(name, lo, hi)
        elif head == ("name", "input") or head == ("name", "param"):
            t.next()
            ref = t.kind("val")
            t.expect(":")
            typ = self.type(t)
            t.done()
            if ref in self.env:
                t.error(f"{ref} is defined twice")
            self.env[ref] = (self.g.add_input(ref[1:], typ) if head[1] == "input"
                             else self.g.add_param(ref[1:], typ))
        elif head == ("name", "output"):
            t.next()
            while True:
                self.g.outputs.append(self.value(t))
                if t.peek() is None:
                    break
                t.expect(",")
        else:
            self.node(t, loc)

    def node(self, t: _Tokens, loc: str | None) -> None:
        results: list[tuple[str, TensorType]] = []
        while True:
            ref = t.kind("val")
            t.expect(":")
            results.append((ref, self.type(t)))
            if t.accept("="):
                break
            t.expect(",")
        op = t.kind("name")
        t.expect("(")
        operands = []
        if not t.accept(")"):
            while True:
                operands.append(self.value(t))
                if t.accept(")"):
                    break
                t.expect(",")
        attrs = self.attrs(t)
        t.done()
        try:
            full, types = infer_types(op, [v.type for v in operands], attrs)
        except IRError as e:
            t.error(str(e))
            raise
        except _INFER_ERRORS as e:
            t.error(f"{op}: its operands or attributes {attrs} are invalid "
                    f"({type(e).__name__}: {e})")
            raise
        if len(types) != len(results):
            t.error(f"{op} has {len(types)} results, the line names {len(results)}")
        for (ref, declared), inferred in zip(results, types, strict=True):
            if not same_type(declared, inferred):
                t.error(f"{ref} is declared {declared} but {op} gives {inferred}")
            if ref in self.env:
                t.error(f"{ref} is defined twice")
        node = Node(op, operands, full, loc)
        self.g.insert_node(node, types, [r[1:] for r, _ in results])
        for (ref, _), v in zip(results, node.results, strict=True):
            if v.name != ref[1:]:
                t.error(f"{ref} is defined twice")
            self.env[ref] = v

    def parse(self) -> Graph:
        for i, raw in enumerate(self.text.split("\n"), 1):  # not splitlines: \x1e is no break here
            try:
                self.line(raw, i)
            except ParseError:
                raise
            except IRError as e:  # from the graph: bad dim bounds, a name defined twice
                raise ParseError(f"line {i}: {e}") from None
        return self.g


def parse(text: str) -> Graph:
    """Parse text IR into a Graph; raises ParseError naming the line on bad input."""
    return _Parser(text).parse()
