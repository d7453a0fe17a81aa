"""Reproducible builds and deterministic outputs on the CPU target.

Builds: compiling the same model twice (in this process, and in another process) gives identical
weights.safetensors and model.ir, and a manifest that differs only in kernels.so's hash and size.
kernels.so itself may differ: TVM's Relax VMShapeLower numbers the slots of the generated shape
function (`__tvm_ffi_shape_func`) in an order that follows object addresses, and TVM's LLVM
codegen names alias (TBAA) metadata after buffer addresses; so the shape function's code and the
library's build-id and debug info vary between builds, while every kernel's code is the same.
`test_only_the_shape_function_differs` checks exactly that on the LLVM IR of two builds.

Outputs: the same input gives bit-identical outputs across calls, across processes, across
builds and across kernel thread counts.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from .conftest import MAX_TOKENS, Demo, build, tokens

ROOT = Path(__file__).resolve().parents[2]
SIZES = [0, 1, 5, 33, MAX_TOKENS]


def _inputs() -> list[np.ndarray]:
    return [tokens(n, seed=100 + n) for n in SIZES]


@pytest.fixture(scope="module")
def second_build(demo: Demo, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build()


def _manifest_without_kernels(path: Path) -> dict:
    m = json.loads((path / "manifest.json").read_text())
    del m["files"]["kernels.so"]
    return m


def _same_except_kernels(a: Path, b: Path) -> None:
    for name in ("weights.safetensors", "model.ir"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert _manifest_without_kernels(a) == _manifest_without_kernels(b)


def test_rebuild_in_process(demo: Demo, second_build: Any, tmp_path: Path) -> None:
    _same_except_kernels(demo.path, second_build.save(tmp_path / "b.moec"))
    # Saving one Artifact twice is byte-for-byte identical, kernels.so included.
    again = demo.artifact.save(tmp_path / "again.moec")
    for p in demo.path.iterdir():
        assert p.read_bytes() == (again / p.name).read_bytes(), p.name


def _llvm_ir(artifact: Any) -> str:
    mods = [m for m in artifact.executable.mod.imports if m.kind == "llvm"]
    assert len(mods) == 1
    return mods[0].inspect_source("ll")


def _functions(ir: str) -> dict[str, str]:
    """LLVM IR function bodies by name, with address-derived names made neutral."""
    ir = re.sub(r'!"0x[0-9a-f]+"', '!"ADDR"', ir)  # TBAA type names made from pointers
    out: dict[str, str] = {}
    for m in re.finditer(r"^define [^@]*@([\w.$]+)\(.*?^}$", ir, re.M | re.S):
        out[m.group(1)] = m.group(0)
    out["<metadata>"] = "\n".join(line for line in ir.splitlines() if line.startswith("!"))
    return out


def test_only_the_shape_function_differs(demo: Demo, second_build: Any) -> None:
    a, b = _functions(_llvm_ir(demo.artifact)), _functions(_llvm_ir(second_build))
    assert a.keys() == b.keys()
    assert any(name.startswith("__tvm_ffi_") and "shape_func" not in name for name in a)
    differ = sorted(name for name in a if a[name] != b[name])
    assert set(differ) <= {"__tvm_ffi_shape_func", "<metadata>"}, differ


_CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    import numpy as np
    import moec
    from tests.reliability.conftest import build
    from tests.reliability.test_reproducible import _inputs

    out = Path(sys.argv[3])
    if sys.argv[4] == "build":
        build().save(out / "b.moec")
    results = {}
    for tag, path in (("a", Path(sys.argv[2])), ("b", out / "b.moec")):
        if path.exists():
            model = moec.load(path)
            for i, x in enumerate(_inputs()):
                results[f"{tag}{i}"] = model(x)
    np.savez(out / "outputs.npz", **results)
""")


def _child(demo: Demo, out: Path, *, build_too: bool, threads: str) -> dict[str, np.ndarray]:
    out.mkdir(exist_ok=True)
    env = {**os.environ, "TVM_NUM_THREADS": threads, "MOEC_NUM_THREADS": threads}
    subprocess.run([sys.executable, "-c", _CHILD, str(ROOT), str(demo.path), str(out),
                    "build" if build_too else "run"], check=True, env=env, timeout=600,
                   capture_output=True)
    with np.load(out / "outputs.npz") as f:
        return {k: f[k] for k in f.files}


def test_another_process_builds_the_same_and_computes_the_same(demo: Demo,
                                                               tmp_path: Path) -> None:
    got = _child(demo, tmp_path / "p", build_too=True, threads="2")
    _same_except_kernels(demo.path, tmp_path / "p" / "b.moec")
    for i, x in enumerate(_inputs()):
        want = demo.model(x)
        assert got[f"a{i}"].tobytes() == want.tobytes()  # same artifact, another process
        assert got[f"b{i}"].tobytes() == want.tobytes()  # another build, another process


def test_outputs_do_not_depend_on_the_thread_count(demo: Demo, tmp_path: Path) -> None:
    got = _child(demo, tmp_path / "t1", build_too=False, threads="1")
    for i, x in enumerate(_inputs()):
        assert got[f"a{i}"].tobytes() == demo.model(x).tobytes()


def test_repeated_calls_are_bit_identical(demo: Demo) -> None:
    for x in _inputs():
        first = demo.model(x).tobytes()
        for _ in range(10):
            assert demo.model(x).tobytes() == first
            assert demo.model(x.copy()).tobytes() == first  # another buffer, same values
