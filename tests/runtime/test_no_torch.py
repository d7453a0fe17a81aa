"""Running an artifact on numpy inputs must not import torch (a runtime-only deployment need
not pay for it), nor TVM's compiler-side Python modules beyond what `import tvm` loads."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import moec.runtime
    assert "tvm" not in sys.modules, "import moec.runtime must not load TVM yet"
    moec.runtime.verify(sys.argv[1])
    assert "tvm" not in sys.modules, "verify must not load native code"
    model = moec.runtime.load(sys.argv[1])
    y, z = model(np.ones((3, 64), np.float32), np.ones(3, np.float32))
    assert y.shape == (3, 64) and isinstance(y, np.ndarray)
    leaked = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
    assert not leaked, leaked
    import torch  # the user's own import still works afterwards
    yt, _ = model(torch.ones(3, 64), torch.ones(3))
    assert isinstance(yt, torch.Tensor)
    print("OK")
    """
)


def test_numpy_run_does_not_import_torch(saved_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(saved_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "OK", proc.stderr[-3000:]
