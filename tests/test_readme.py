"""README.md's code runs as written: every fenced ```bash and ```python block, in order, in one
fresh temporary directory, the way a reader pastes them. A bash block runs through `bash -e -o
pipefail` (the first failing command fails the block); a python block runs in a new `python`
process. `moec` and `python` there are this checkout's (shims on PATH, PYTHONPATH = the
repository), so the README is checked against the code beside it.

A block may be preceded by a marker comment, which the rendered README does not show:

    <!-- readme-test: skip (REASON) -->   never run here: the block installs packages, runs the
                                          test suite itself, needs tools or minutes of timing
    <!-- readme-test: slow (REASON) -->   run only by `pytest -m slow` (test_readme_with_slow)

The reason is required. A fence without a language (a diagram) is not code; any other language
fails test_every_block_is_runnable_or_marked until this harness learns to run it.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RUNNERS = ("bash", "python")
MARKER = re.compile(r"<!--\s*readme-test:\s*(\w+)\s*(?:\((.*)\))?\s*-->")
BLOCK_TIMEOUT_S = 1200


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    mark: str | None  # "skip", "slow" or None
    reason: str


def blocks(text: str) -> list[Block]:
    """The fenced blocks of a Markdown text, with the marker of the line before each fence."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = re.match(r"^```(\S*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(1)
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        prev = lines[start - 1] if start else ""
        mk = MARKER.fullmatch(prev.strip())
        out.append(Block(start + 1, lang, "\n".join(lines[start + 1:j]) + "\n",
                         mk.group(1) if mk else None, (mk.group(2) or "").strip() if mk else ""))
        i = j + 1
    return out


def _env(tmp: Path) -> dict[str, str]:
    """This checkout's `moec` and `python` first on PATH, whatever is installed."""
    bin_dir = tmp / ".readme-bin"
    bin_dir.mkdir()
    for name, cmd in (("moec", f'"{sys.executable}" -m moec.cli'), ("python", f'"{sys.executable}"')):
        shim = bin_dir / name
        shim.write_text(f'#!/bin/sh\nexec {cmd} "$@"\n')
        shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def _run(block: Block, cwd: Path, env: dict[str, str]) -> None:
    cmd = (["bash", "-e", "-o", "pipefail", "-c", block.code] if block.lang == "bash"
           else [sys.executable, "-c", block.code])
    try:
        r = subprocess.run(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                           text=True, timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"README.md:{block.line}: the {block.lang} block ran past "
                    f"{BLOCK_TIMEOUT_S} s:\n{block.code}")
    if r.returncode != 0:
        pytest.fail(f"README.md:{block.line}: the {block.lang} block failed (exit "
                    f"{r.returncode}):\n{block.code}\n--- stdout (end) ---\n{r.stdout[-3000:]}"
                    f"\n--- stderr (end) ---\n{r.stderr[-5000:]}")


def _run_all(tmp: Path, with_slow: bool) -> int:
    env = _env(tmp)
    work = tmp / "fresh"
    work.mkdir()
    ran = 0
    for block in blocks(README.read_text(encoding="utf-8")):
        if block.lang not in RUNNERS or block.mark == "skip":
            continue
        if block.mark == "slow" and not with_slow:
            continue
        _run(block, work, env)
        ran += 1
    return ran


def test_every_block_is_runnable_or_marked():
    """Each code block is bash or python (or a plain diagram), each marker is one this harness
    knows and says why, and each `pip install` names extras that pyproject.toml defines."""
    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"])
    found = blocks(README.read_text(encoding="utf-8"))
    assert sum(b.lang in RUNNERS and b.mark is None for b in found) >= 5, found
    for b in found:
        where = f"README.md:{b.line}"
        assert b.lang in (*RUNNERS, ""), f"{where}: no runner for ```{b.lang} blocks"
        assert b.mark in (None, "skip", "slow"), f"{where}: unknown marker {b.mark!r}"
        assert b.mark is None or b.reason, f"{where}: a {b.mark} marker must say why"
        for names in re.findall(r"pip install[^\n]*?\.\[([\w,]+)\]", b.code):
            for name in names.split(","):
                assert name in extras, f"{where}: pyproject.toml has no extra {name!r}"


def test_block_parser_reads_markers():
    text = ("Text\n\n<!-- readme-test: skip (needs a GPU) -->\n```bash\nnvidia-smi\n```\n\n"
            "```python\nprint(1)\n```\n```\na diagram\n```\n")
    b = blocks(text)
    assert [(x.line, x.lang, x.mark, x.reason) for x in b] == [
        (4, "bash", "skip", "needs a GPU"), (8, "python", None, ""), (11, "", None, "")]
    assert b[1].code == "print(1)\n"


def test_readme(tmp_path):
    """The README's blocks but the slow and skipped ones, in order, in a fresh directory."""
    assert _run_all(tmp_path, with_slow=False) >= 5


@pytest.mark.slow
def test_readme_with_slow(tmp_path):
    """Every block but the skipped ones."""
    assert _run_all(tmp_path, with_slow=True) >= 6
