"""IR: types, builder, verifier messages, interpreter and printer/parser round trip."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moec.errors import InputError, IRError, ParseError, VerificationError
from moec.ir import IRBuilder, Sym, interpret, parse, print_graph, verify
from moec.ir.moe_ops import align_ref, router_ref
from moec.ir.types import TensorType


def test_symbolic_dims_print_and_evaluate():
    T = Sym("T")
    e = (T * 3) // 32 + 8
    assert str(e) == "T*3//32+8"
    assert str((T + 1) * 2) == "(T+1)*2"
    assert e.evaluate({"T": 100}) == 17
    assert T * 1 is T


def test_builder_infers_types_and_rejects_bad_operands():
    b = IRBuilder()
    T = b.dim("T", 0, 128)
    x = b.input("x", (T, 16))
    w = b.param("w", np.zeros((4, 16), np.float32))
    y = b.op("core.linear", [x, w])
    assert str(y.type) == "f32[T, 4]"
    bad = b.param("bad", np.zeros((4, 15), np.float32))
    with pytest.raises(IRError, match="core.linear.*do not match"):
        b.op("core.linear", [x, bad], loc="model.layer")
    with pytest.raises(IRError, match="unknown attribute"):
        b.op("core.softmax", [x], {"dim": 1})


def test_verifier_names_node_and_types():
    g = parse("""
      dim T: 0..8
      input %x: f32[T, 16]
      %y: f32[T, 16] = core.silu(%x)
      output %y
    """)
    g.nodes[0].results[0].type = TensorType((Sym("T"), 15), "f32")
    with pytest.raises(VerificationError, match=r"core.silu.*has type f32\[T, 15\].*f32\[T, 16\]"):
        verify(g)


def test_parse_errors_name_the_line():
    with pytest.raises(ParseError, match="line 3: %z is used before it is defined"):
        parse("dim T: 0..8\ninput %x: f32[T, 4]\n%y: f32[T, 4] = core.add(%x, %z)\n")
    with pytest.raises(ParseError, match="line 2: symbolic dim N is not declared"):
        parse("dim T: 0..8\ninput %x: f32[N, 4]\n")
    with pytest.raises(ParseError, match="declared f32\\[T, 5\\] but core.silu gives"):
        parse("dim T: 0..8\ninput %x: f32[T, 4]\n%y: f32[T, 5] = core.silu(%x)\n")


def test_interpreter_checks_inputs():
    g = parse("dim T: 0..8\ninput %x: f32[T, 4]\n%y: f32[T, 4] = core.relu(%x)\noutput %y\n")
    (y,) = interpret(g, [np.array([[-1, 2, -3, 4]], np.float32)])
    np.testing.assert_array_equal(y, [[0, 2, 0, 4]])
    with pytest.raises(InputError, match="outside its bounds"):
        interpret(g, [np.zeros((9, 4), np.float32)])
    with pytest.raises(InputError, match="dim 1 is 5, expected 4"):
        interpret(g, [np.zeros((2, 5), np.float32)])


@pytest.mark.parametrize("skewed", [False, True])
@pytest.mark.parametrize("tokens", [0, 1, 7, 64, 300])
def test_align_reference_layout(tokens, skewed):
    rng = np.random.default_rng(tokens)
    k, e, bm = 2, 8, 16
    ids = np.stack([rng.permutation(e)[:k] for _ in range(tokens)]).astype(np.int32) \
        if tokens else np.zeros((0, k), np.int32)
    if skewed and tokens:
        ids[:, 0] = 3
        ids[:, 1] = 5
    sids, tiles, slot_row = align_ref(ids, e, bm)
    assert len(tiles) == tokens * k // bm + e and len(sids) == len(tiles) * bm
    flat = ids.reshape(-1)
    for s in range(tokens * k):
        r = slot_row.reshape(-1)[s]
        assert sids[r] == s and tiles[r // bm] == flat[s]
    used = tiles[tiles >= 0]
    assert list(used) == sorted(used) and (tiles[len(used):] == -1).all()
    assert (np.sort(sids[sids < tokens * k]) == np.arange(tokens * k)).all()


def test_router_grouped_topk_keeps_best_groups():
    x = np.eye(8, dtype=np.float32)[:1] * 5  # token prefers expert 0
    w = np.eye(8, dtype=np.float32)
    attrs = {"k": 2, "scoring": "sigmoid", "order": "score_topk", "norm_topk": True,
             "scale": 2.5, "n_groups": 4, "topk_groups": 1, "group_score": "top2_sum"}
    bias = np.zeros(8, np.float32)
    bias[1] = 3.0  # selection-only bias: picks expert 1, weight from the unbiased score
    weights, ids = router_ref(x, w, bias, attrs)
    assert set(ids[0]) == {0, 1}
    assert abs(weights.sum() - 2.5) < 1e-5


# ------------------------------------------------------------------ round trip (property test)

_names = st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True)
_attr_vals = st.recursive(
    st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=False, width=32),
              st.booleans(), st.none(), st.text(max_size=8)),
    lambda inner: st.lists(inner, max_size=3), max_leaves=6)


@settings(max_examples=60, deadline=None)
@given(hidden=st.integers(1, 64), tokens=st.integers(1, 10_000), k=st.integers(1, 4),
       eps=st.floats(1e-12, 1e-1), names=st.lists(_names, min_size=2, max_size=2, unique=True),
       loc=st.text(alphabet=st.characters(blacklist_characters="\n\r#"), max_size=20))
def test_print_parse_round_trip(hidden, tokens, k, eps, names, loc):
    b = IRBuilder()
    T = b.dim("T", 0, tokens)
    x = b.input(names[0], (T, hidden))
    w = b.param(f"layers.0.{names[1]}.weight", np.zeros((hidden,), np.float32))
    y = b.op("core.rmsnorm", [x, w], {"eps": eps}, loc=loc.strip() or None)
    v, i = b.op("core.topk", [y], {"k": min(k, hidden)})
    z = b.op("core.reshape", [y], {"shape": [-1, hidden]})
    b.output(v, i, z)
    text = print_graph(b.graph)
    assert print_graph(parse(text)) == text


@settings(max_examples=100, deadline=None)
@given(v=_attr_vals)
def test_attribute_values_round_trip(v):
    from moec.ir.parser import _Parser, _Tokens
    from moec.ir.printer import format_attr_value

    text = format_attr_value(v)
    got = _Parser("").attr_value(_Tokens(text, 1))
    assert format_attr_value(got) == text
