"""On a machine without the CUDA toolkit (or without a C++20 g++ for the emulator), the tests
that need it are skipped with the missing tool named, and every other failure still fails
(tests/conftest.py). Checked with a bogus tool name, so it runs on machines with the toolkit."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from moec.codegen.cuda.build import ToolNotFoundError, find_cuda_tool

CASES = textwrap.dedent('''
    import pytest
    from moec.codegen.cuda.build import find_cuda_tool

    @pytest.fixture(scope="module")
    def built():
        return find_cuda_tool("nvcc-moec-test-absent")

    def test_needs_a_tool_in_the_test():
        find_cuda_tool("ptxas-moec-test-absent")

    def test_needs_a_tool_in_a_fixture(built):
        pass

    def test_a_real_failure():
        raise RuntimeError("not about tools")
''')


def test_missing_tools_skip_and_other_failures_fail(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text(
        (Path(__file__).parents[1] / "conftest.py").read_text())
    (tmp_path / "test_cases.py").write_text(CASES)
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                          str(tmp_path / "test_cases.py")], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert "1 failed, 2 skipped" in out.stdout, out.stdout[-3000:]
    assert "SKIPPED" in out.stdout and "ptxas-moec-test-absent not found" in out.stdout
    assert "nvcc-moec-test-absent not found" in out.stdout


def test_find_cuda_tool_raises_tool_not_found() -> None:
    with pytest.raises(ToolNotFoundError, match="install the CUDA toolkit"):
        find_cuda_tool("nvcc-moec-test-absent")
