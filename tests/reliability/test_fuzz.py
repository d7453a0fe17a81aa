"""Time-bounded fuzzing with hypothesis: the IR parser and the artifact loader raise nothing but
moec's own errors (`MoecError` subclasses), whatever they are fed.

Each target runs for MOEC_FUZZ_SECONDS (default 10) in batches of fresh random examples; a
failure prints the shrunk input. `python tests/reliability/fuzz_atheris.py` runs the same targets
under atheris (coverage-guided) when it is installed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moec.errors import MoecError
from moec.ir import parse
from moec.ir.registry import all_ops
from moec.runtime import load, verify
from moec.runtime.artifact import write_manifest
from moec.runtime.inputs import numpy_dtype
from moec.runtime.verify import sha256_file

from .conftest import Demo

# Mutated manifests may say another TVM built the kernels, which only warns.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

SECONDS = float(os.environ.get("MOEC_FUZZ_SECONDS", "10"))
BATCH = settings(max_examples=50, deadline=None, database=None,
                 suppress_health_check=list(HealthCheck))


def run_for(seconds: float, test: Callable[[], None]) -> int:
    """Call a @given test (one batch each call, fresh random examples) until time is up."""
    end, batches = time.monotonic() + seconds, 0
    while batches == 0 or time.monotonic() < end:
        test()
        batches += 1
    return batches


# ------------------------------------------------------------------------------- IR parser

SEED_IR = """dim T: 0..64
input %x: f32[T, 16]
param @r: f32[4, 16]
%l: f32[T, 4] = core.linear(%x, @r)  # layers.0.gate
%p: f32[T, 4] = core.softmax(%l) {axis=-1}
%v: f32[T, 2], %i: i32[T, 2] = core.topk(%p) {k=2}
%w: f32[T, 2], %j: i32[T, 2] = moe.router(%x, @r) {scoring=softmax, k=2}
%y: f32[T, 16] = core.silu(%x)
%s: i32[(T*2//32+4)*32], %t: i32[T*2//32+4], %u: i32[T, 2] = moe.align(%j) {block_m=32, \
num_experts=4}
output %v, %i, %y
"""
TOKENS = ["%x", "%l", "@r", "f32", "i32", "bf16", "[", "]", "(", ")", "{", "}", ",", ":", "=",
          "*", "//", "+", "-", "..", "T", "0", "1", "-1", "2.5", "nan", "inf", "-inf", "1e400",
          "9" * 80, '"s"', '"\\u00"', '"\\ud800"', "core.add", "moe.align", "k", "axis", "true",
          "none", "#", "dim", "input", "param", "output", "\n", "[[[[", "(((((", " ", "\x00",
          "é", "\t", "//0"]

edits = st.lists(st.tuples(st.sampled_from(["insert", "delete", "replace", "repeat"]),
                           st.integers(0, len(SEED_IR)), st.sampled_from(TOKENS),
                           st.integers(1, 40)), max_size=6)


def _mutate(text: str, ops: list[tuple[str, int, str, int]]) -> str:
    for op, pos, tok, n in ops:
        if op == "insert":
            text = text[:pos] + tok + text[pos:]
        elif op == "delete":
            text = text[:pos] + text[pos + n:]
        elif op == "replace":
            text = text[:pos] + tok + text[pos + len(tok):]
        else:
            text = text[:pos] + tok * n * 40 + text[pos:]
    return text


OUTCOMES: Counter[str] = Counter()  # printed at the end (pytest -s), for the record


def parse_only_moec_errors(text: str) -> None:
    try:
        parse(text)
        OUTCOMES["parser: parsed"] += 1
    except MoecError as e:
        OUTCOMES[f"parser: {type(e).__name__}"] += 1


@BATCH
@given(ops=edits, junk=st.text(max_size=40))
def _parser_mutations(ops: list, junk: str) -> None:
    text = _mutate(SEED_IR, ops)
    parse_only_moec_errors(text[: len(text) // 2] + junk + text[len(text) // 2:])


OPS = sorted(all_ops())
OPERANDS = ["%a", "%b", "%c", "%d", "%e", "%f", "%g", "%h", "%s"]
HEAD = """dim T: 0..64
input %a: f32[T, 16]
input %b: f32[T, 4]
input %c: i32[T, 2]
input %d: f32[16]
input %e: f32[4, 16]
input %f: bf16[T, 16]
input %g: f32[8, 32, 16]
input %h: i32[T]
input %s: f32[]
"""
_SCALARS = ["0", "1", "-1", "2", "7", "64", "1e400", "nan", "inf", "-inf", "2.5", "true", "false",
            "none", "softmax", "sigmoid", "silu_mul", "topk", "x", '""', '"a b"']
attr_values = st.recursive(
    st.one_of(st.integers(-3, 70).map(str), st.sampled_from(_SCALARS)),
    lambda inner: st.lists(inner, max_size=3).map(lambda xs: "[" + ", ".join(xs) + "]"),
    max_leaves=5)


@BATCH
@given(op=st.sampled_from(OPS), operands=st.lists(st.sampled_from(OPERANDS), max_size=5),
       result=st.sampled_from(["f32[T, 16]", "i32[T, 2]", "f32[T, 4], %r2: i32[T, 4]"]),
       data=st.data())
def _op_attributes(op: str, operands: list[str], result: str, data: Any) -> None:
    names = list(all_ops()[op].attrs) or ["k"]
    keys = data.draw(st.lists(st.sampled_from(names), max_size=len(names) + 1, unique=True))
    attrs = ", ".join(f"{k}={data.draw(attr_values)}" for k in keys)
    line = f"%r: {result} = {op}({', '.join(operands)})" + (f" {{{attrs}}}" if attrs else "")
    parse_only_moec_errors(HEAD + line + "\n")


def test_fuzz_ir_parser() -> None:
    parse(SEED_IR)  # mutations start from valid IR, so that they reach deep into the parser
    n = run_for(SECONDS / 2, _parser_mutations) + run_for(SECONDS / 2, _op_attributes)
    assert n >= 2
    print(sorted(OUTCOMES.items()))


@pytest.mark.parametrize("text", [
    "dim T: 0..2.5", "dim T: 0..nan", "input %x: f32[" + "(" * 5000 + "T", "dim T: 0..9\n"
    "input %x: f32[" + "+".join(["T"] * 5000) + "]", '%y: f32[] = core.silu(%x) {a="\\u00"}',
    "input %x: f32[4//0]", "input %x: f32[4]\n%y: f32[4] = core.silu(%x) {a=-\"s\"}",
    "dim T: 0.." + "9" * 5000, "input %x: f32[4]\n%y: f32[4] = core.silu(%x) {a=" + "[" * 5000,
    "input %x: f32[T, 4]\n%v: f32[T, 2], %i: i32[T, 2] = core.topk(%x) {k=\"2\"}",
    "dim T: 0..4\ninput %x: f32[T, 4]\n%y: f32[T, 4] = core.softmax(%x) {axis=[1]}",
    "input %x: f32[4]\n%y: f32[4] = core.silu(%x) {a=" + "-" * 5000 + "1}",
], ids=["float-bound", "nan-bound", "deep-parens", "long-dim", "bad-escape", "div-zero",
        "minus-string", "huge-int", "deep-list", "str-k", "list-axis", "many-minus"])
def test_parser_crashes_found_by_fuzzing(text: str) -> None:
    """Inputs on which the parser used to raise ValueError, RecursionError, JSONDecodeError,
    TypeError or ZeroDivisionError: each is now a ParseError naming the line."""
    from moec.errors import ParseError

    with pytest.raises(ParseError, match=r"line \d+"):
        parse(text)


# --------------------------------------------------------------------------- artifact loader

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(),
              st.sampled_from(["", "T", "float32", "llvm", "cuda", "../x", "/etc/passwd",
                               "kernels.so", "a" * 64, "0" * 64])),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.sampled_from(["min", "max", "name", "shape",
                                                             "dtype", "kind", "x"]), inner,
                                            max_size=3)),
    max_leaves=6)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


def _apply(manifest: dict, path: tuple, action: str, value: Any) -> None:
    if not path:
        return
    parent = manifest
    try:  # an earlier edit of the same example may have removed or replaced the path
        for k in path[:-1]:
            parent = parent[k]
        if not isinstance(parent, dict | list):
            return
        parent[path[-1]]  # still there?
    except (KeyError, IndexError, TypeError):
        return
    if action == "delete":
        del parent[path[-1]]
    elif action == "replace":
        parent[path[-1]] = value
    elif isinstance(parent, dict):
        parent["x" + str(path[-1])] = value
    else:
        parent.insert(path[-1], value)


class _Loader:
    """A scratch artifact folder for one mutated example: hard links to the good files (an
    artifact refuses symbolic links), new files for what is mutated."""

    def __init__(self, good: Path, scratch: Path) -> None:
        self.good, self.root = good, scratch / "m.moec"
        self.manifest = json.loads((good / "manifest.json").read_text())

    def reset(self) -> Path:
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True)
        for p in self.good.iterdir():
            if p.name not in ("manifest.json", "manifest.sha256"):
                os.link(p, self.root / p.name)
        return self.root

    def write_manifest(self, data: bytes, digest: bool = True) -> None:
        """The mutated manifest, with its digest updated (so that the checks behind the digest
        run) or left as the good one's."""
        if digest:
            write_manifest(self.root, data)
        else:
            shutil.copy(self.good / "manifest.sha256", self.root / "manifest.sha256")
            (self.root / "manifest.json").write_bytes(data)

    def check(self, load_too: bool) -> None:
        """verify, then load and call: each either works or raises a MoecError."""
        try:
            verify(self.root)
        except MoecError as e:
            OUTCOMES[f"loader: verify raised {type(e).__name__}"] += 1
            return
        if not load_too:
            OUTCOMES["loader: verify passed (kernels.so not loaded)"] += 1
            return
        try:
            model = load(self.root)
        except MoecError as e:
            OUTCOMES[f"loader: load raised {type(e).__name__}"] += 1
            return
        try:
            model(*[_input_for(spec, model.signature) for spec in model.signature.inputs])
            OUTCOMES["loader: loaded and ran"] += 1
        except MoecError as e:
            OUTCOMES[f"loader: call raised {type(e).__name__}"] += 1


def _input_for(spec: Any, sig: Any) -> Any:
    shape = []
    for d in spec.shape:
        if isinstance(d, str):
            dim = sig.dims[d]
            d = min(max(dim.min, 3), dim.max if dim.max is not None else 3)
        shape.append(d)
    if np.prod(shape, dtype=float) > 1e6:
        return np.zeros(0)  # refused by the shape check; never allocate a huge array
    try:
        return np.ones(shape, numpy_dtype(spec.dtype))
    except (MoecError, TypeError, ValueError):
        return np.ones(shape, np.float32)


@pytest.fixture(scope="module")
def loader(demo: Demo, tmp_path_factory: pytest.TempPathFactory) -> _Loader:
    return _Loader(demo.path, tmp_path_factory.mktemp("fuzz"))


def test_fuzz_artifact_loader(loader: _Loader) -> None:
    manifest_text = json.dumps(loader.manifest, indent=2)
    paths = _paths(loader.manifest)

    @BATCH
    @given(edits=st.lists(st.tuples(st.sampled_from(paths),
                                    st.sampled_from(["delete", "replace", "insert"]),
                                    json_values), min_size=1, max_size=3))
    def manifest_edits(edits: list) -> None:
        loader.reset()
        m = json.loads(manifest_text)
        for path, action, value in edits:
            try:
                _apply(m, path, action, value)
            except (KeyError, IndexError, TypeError):
                pass  # an earlier edit removed or retyped this path
        loader.write_manifest(json.dumps(m).encode())
        loader.check(load_too=True)

    @BATCH
    @given(flips=st.lists(st.tuples(st.integers(0, len(manifest_text) - 1), st.integers(0, 7)),
                          min_size=1, max_size=4),
           cut=st.one_of(st.none(), st.integers(0, len(manifest_text))), digest=st.booleans())
    def manifest_bytes(flips: list, cut: int | None, digest: bool) -> None:
        loader.reset()
        data = bytearray(manifest_text.encode())
        for at, bit in flips:
            data[at] ^= 1 << bit
        loader.write_manifest(bytes(data[:cut]), digest)
        loader.check(load_too=True)

    @BATCH
    @given(name=st.sampled_from(["weights.safetensors", "model.ir", "kernels.so"]),
           flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)),
                          max_size=4),
           cut=st.one_of(st.none(), st.floats(0, 1)), rehash=st.booleans())
    def file_bytes(name: str, flips: list, cut: float | None, rehash: bool) -> None:
        root = loader.reset()
        data = bytearray((loader.good / name).read_bytes())
        (root / name).unlink()
        for at, bit in flips:
            data[int(at * len(data))] ^= 1 << bit
        if cut is not None:
            data = data[: int(cut * len(data))]
        (root / name).write_bytes(bytes(data))
        m = json.loads(manifest_text)
        if rehash:  # so that the checks behind the hash (safetensors header, ELF) run too
            m["files"][name] = {"sha256": sha256_file(root / name), "size": len(data)}
        loader.write_manifest(json.dumps(m).encode())
        # A re-hashed, damaged kernels.so is native code that dlopen would run: only verify it
        # (loading an artifact means trusting its code, see docs/security.md).
        loader.check(load_too=name != "kernels.so" or not rehash)

    third = SECONDS / 3
    n = run_for(third, manifest_edits) + run_for(third, manifest_bytes)
    n += run_for(third, file_bytes)
    assert n >= 3
    print(sorted(OUTCOMES.items()))
