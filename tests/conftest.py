"""Suite-wide settings.

- Tests never read or write the user's tuning cache (~/.cache/moec/tuning.json, which
  `moec tune` fills): they see an empty one of their own.
- A test that stops because a build tool is not installed (nvcc, ptxas, a C compiler, g++ with
  C++20 for the CUDA emulator: `moec.codegen.cuda.build.ToolNotFoundError`) is reported as
  skipped, with the missing tool named, instead of failing: a user's `pytest` passes on a
  machine without the CUDA toolkit. Any other failure stays a failure.
"""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Any

import pytest

os.environ["MOEC_TUNING_DB"] = os.path.join(tempfile.mkdtemp(prefix="moec-tests-"),
                                            "tuning.json")


def _missing_tool(excinfo: Any) -> str | None:
    build = sys.modules.get("moec.codegen.cuda.build")
    if build is None or excinfo is None or not excinfo.errisinstance(build.ToolNotFoundError):
        return None
    return str(excinfo.value)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    outcome = yield
    report = outcome.get_result()
    reason = _missing_tool(call.excinfo) if report.failed else None
    if reason is not None:
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: {reason}")
