"""Symbolic dim expressions as the manifest writes them (`"B*S"`, `"T//2+4"`): parsed once and
evaluated on the dims a call binds. Pure Python: the runtime does not import moec.ir.

Grammar (what `moec.ir.types` prints): integers, dim names, `+ - * //` with the usual
precedence (left-associative) and parentheses.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

_TOKEN = re.compile(r"\s*(?:(\d+)|([A-Za-z_][A-Za-z0-9_]*)|(//|[-+*()]))")
_MAX_TOKENS = 512

Node = int | str | tuple  # an int, a dim name, or (op, lhs, rhs)


class DimExprError(ValueError):
    """A malformed dim expression."""


@dataclass(frozen=True)
class DimExpr:
    """A parsed dim expression: `names` it uses, `evaluate(env)` its value."""

    text: str
    tree: Node
    names: frozenset[str]

    def evaluate(self, env: Mapping[str, int]) -> int:
        return _eval(self.tree, env)

    def __str__(self) -> str:
        return self.text


@lru_cache(maxsize=256)
def parse_dim_expr(text: str) -> DimExpr:
    """Parse `text`; raises DimExprError naming it when it is not a dim expression."""
    toks: list[str] = []
    pos = 0
    src = text.strip()
    while pos < len(src):
        m = _TOKEN.match(src, pos)
        if not m or m.end() == pos or len(toks) >= _MAX_TOKENS:
            raise DimExprError(f"{text!r} is not a dim expression")
        toks.append(m.group(m.lastindex or 0))
        pos = m.end()
    state = {"i": 0, "depth": 0}

    def peek() -> str | None:
        return toks[state["i"]] if state["i"] < len(toks) else None

    def take() -> str:
        tok = peek()
        if tok is None:
            raise DimExprError(f"{text!r} is not a dim expression (it ends early)")
        state["i"] += 1
        return tok

    def atom() -> Node:
        tok = take()
        if tok.isdigit():
            return int(tok)
        if tok[0].isalpha() or tok[0] == "_":
            return tok
        if tok == "(" and state["depth"] < 32:
            state["depth"] += 1
            inner = expr()
            if take() != ")":
                raise DimExprError(f"{text!r}: unbalanced parentheses")
            state["depth"] -= 1
            return inner
        raise DimExprError(f"{text!r} is not a dim expression (at {tok!r})")

    def binary(sub, ops: tuple[str, ...]) -> Node:  # noqa: ANN001
        node = sub()
        while peek() in ops:
            node = (take(), node, sub())
        return node

    def term() -> Node:
        return binary(atom, ("*", "//"))

    def expr() -> Node:
        return binary(term, ("+", "-"))

    tree = expr()
    if peek() is not None:
        raise DimExprError(f"{text!r} is not a dim expression (at {peek()!r})")
    return DimExpr(text, tree, frozenset(_names(tree)))


def _names(node: Node) -> set[str]:
    if isinstance(node, str):
        return {node}
    if isinstance(node, tuple):
        return _names(node[1]) | _names(node[2])
    return set()


def _eval(node: Node, env: Mapping[str, int]) -> int:
    if isinstance(node, int):
        return node
    if isinstance(node, str):
        return int(env[node])
    op, a, b = node[0], _eval(node[1], env), _eval(node[2], env)
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if b == 0:
        raise DimExprError("division by zero in a dim expression")
    return a // b
