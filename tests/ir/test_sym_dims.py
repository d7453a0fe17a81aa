"""Symbolic dims are kept in a canonical form: equal polynomials are equal objects and print the
same, whatever order they were built in; printing parses back to the same form; the canonical
form evaluates like the expression it came from."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moec.errors import IRError, ParseError
from moec.ir import Sym, parse, print_graph
from moec.ir.types import BinExpr, TensorType, canonical, same_dim, same_type

T, B, S = Sym("T"), Sym("B"), Sym("S")


@pytest.mark.parametrize("a,b,text", [
    (T * 8, 8 * T, "T*8"),
    (B * S, S * B, "B*S"),
    (B * S * 8, 8 * (S * B), "B*S*8"),
    (T * 4 + T * 4, T * 8, "T*8"),
    ((T + 4) * 8, T * 8 + 32, "(T+4)*8"),
    ((B + 1) * (S + 1), B * S + S + B + 1, "B*S+B+S+1"),
    ((T * 2) // 4 + 4, T // 2 + 4, "T//2+4"),
    ((T * 2 + 2) // 4, (T + 1) // 2, "(T+1)//2"),
    ((T + 32) // 32, T // 32 + 1, "T//32+1"),
    ((T * 8) // 8, T, "T"),
    (S - 1 + 1, S, "S"),
    (B * S - S * B + 3, 3, "3"),
    (S * (T // 4), (T // 4) * S, "S*(T//4)"),
])
def test_equal_polynomials_are_equal_and_print_the_same(a, b, text):
    assert a == b and same_dim(a, b)
    assert str(a) == str(b) == text


def test_same_dim_canonicalises_hand_built_trees():
    raw = BinExpr("*", 8, T)  # not through the operators: not canonical
    assert str(raw) == "8*T" and raw != T * 8
    assert same_dim(raw, T * 8) and canonical(raw) == T * 8
    assert same_type(TensorType((raw, 4), "f32"), TensorType((T * 8, 4), "f32"))
    assert not same_dim(T * 8, T * 4) and not same_dim(B * S, B + S) and not same_dim(T, 1)


def test_a_long_product_of_sums_is_refused():
    e: object = T + 1
    with pytest.raises(IRError, match="more than 256 terms"):
        for x in [Sym(f"d{i}") + 1 for i in range(9)]:
            e = e * x


def test_parser_reads_any_order_and_prints_canonically():
    g = parse("""
      dim B: 0..8
      dim S: 0..64
      input %x: f32[8*S*B, 4]
      input %y: f32[(S*B+4)*2//4, 4]
      output %x, %y
    """)
    assert [str(v.type) for v in g.inputs] == ["f32[B*S*8, 4]", "f32[B*S//2+2, 4]"]
    text = print_graph(g)
    assert print_graph(parse(text)) == text
    with pytest.raises(ParseError, match="division by zero"):
        parse("dim T: 0..8\ninput %x: f32[T//(T-T), 4]\noutput %x")


_names = st.sampled_from([T, B, S])


def _exprs() -> st.SearchStrategy:
    leaf = st.one_of(st.integers(0, 9), _names)
    return st.recursive(leaf, lambda kids: st.tuples(
        st.sampled_from(["+", "-", "*", "//"]), kids, kids), max_leaves=8)


def _build(e: object) -> object:
    if not isinstance(e, tuple):
        return e
    op, a, b = e[0], _build(e[1]), _build(e[2])
    return {"+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b,
            "//": lambda: a // b}[op]()


def _eval(e: object, env: dict[str, int]) -> int | None:
    """The value of the expression tree, None where it divides by 0."""
    if isinstance(e, int):
        return e
    if isinstance(e, Sym):
        return env[e.name]
    op, a, b = e[0], _eval(e[1], env), _eval(e[2], env)
    if a is None or b is None or op == "//" and b == 0:
        return None
    return {"+": a + b, "-": a - b, "*": a * b, "//": a // b if b else 0}[op]


@settings(max_examples=300, deadline=None)
@given(e=_exprs(), t=st.integers(0, 50), b=st.integers(1, 7), s=st.integers(0, 40))
def test_canonical_form_evaluates_like_the_expression(e, t, b, s):
    env = {"T": t, "B": b, "S": s}
    want = _eval(e, env)
    if want is None:
        return  # divides by 0 at this point
    try:
        got = _build(e)
    except IRError as err:  # a divisor that is 0 whatever the dims
        assert "division by zero" in str(err)
        return
    value = got if isinstance(got, int) else got.evaluate(env)
    assert value == want, (e, str(got))
    assert canonical(got) == got  # the operators already return the canonical form


RESHAPE_IR = """
dim B: 0..8
dim S: 0..16
input %x: f32[B, S, 4]
input %y: f32[S*B, 4]
%f: f32[B*S, 4] = core.reshape(%x) {shape=[-1, 4]}
%s: f32[B*S, 4] = core.add(%f, %y)
%r: f32[B, S, 4] = core.reshape(%s) {shape=["B", "S", 4]}
output %r
"""


def test_reshape_to_several_symbolic_dims_names_them():
    """-1 stands for one dim only; [B*S, 4] -> [B, S, 4] names B and S; the interpreter binds
    them from the inputs."""
    import numpy as np

    from moec.ir import interpret, verify

    g = parse(RESHAPE_IR)
    verify(g)
    assert str(g.inputs[1].type) == "f32[B*S, 4]"
    text = print_graph(g)
    assert print_graph(parse(text)) == text
    x, y = np.random.rand(3, 5, 4).astype("float32"), np.random.rand(15, 4).astype("float32")
    (got,) = interpret(g, [x, y])
    np.testing.assert_array_equal(got, x + y.reshape(3, 5, 4))
    with pytest.raises(ParseError, match="cannot reshape"):
        parse(RESHAPE_IR.replace('["B", "S", 4]', '["B", "S", 2]'))
    with pytest.raises(ParseError, match="dim names with -1"):
        parse(RESHAPE_IR.replace('["B", "S", 4]', '["B", -1, 4]'))
