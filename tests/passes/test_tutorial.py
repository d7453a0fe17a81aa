"""docs/writing-passes.md: every Python block runs, in order, in one namespace."""

import re
from pathlib import Path

DOC = Path(__file__).parents[2] / "docs" / "writing-passes.md"


def test_tutorial_code_runs():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) >= 5
    ns: dict = {"__name__": "tutorial"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"{DOC.name}[block {i}]", "exec"), ns)
    from moec.passes import registered_passes

    assert "fold-router-scale" in registered_passes()
    assert ns["g"].find("moe.router")[0].attrs["scale"] == 2.5
    assert not ns["g"].find("core.scale")
