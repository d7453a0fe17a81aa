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


CONCURRENT = textwrap.dedent(
    """
    import importlib.abc, sys, threading, time
    started = threading.Event()

    class SlowTvm(importlib.abc.MetaPathFinder):  # holds thread A inside the TVM import
        def find_spec(self, name, path=None, target=None):
            if name == "tvm" and not started.is_set():
                started.set()
                time.sleep(1.0)
            return None

    sys.meta_path.insert(0, SlowTvm())  # before the path finder, which would find tvm first
    import numpy as np
    import moec.runtime
    from moec.runtime import _tvm
    errors = []

    def load_tvm():
        try:
            _tvm.tvm()
        except Exception as e:
            errors.append(f"tvm: {e!r}")

    a = threading.Thread(target=load_tvm)
    a.start()
    assert started.wait(60), "the TVM import never started"
    try:
        import torch  # another thread, while moec.runtime imports TVM
        torch.ones(1)
    except Exception as e:
        errors.append(f"torch: {e!r}")
    a.join()
    y, _ = moec.runtime.load(sys.argv[1])(np.ones((3, 64), np.float32), np.ones(3, np.float32))
    assert not errors, errors
    assert not any(isinstance(f, type(_tvm._NoTorchInThisThread())) for f in sys.meta_path)
    print("OK")
    """
)


def test_another_thread_can_import_torch_while_tvm_is_imported(saved_path: Path) -> None:
    """The runtime used to set sys.modules["torch"] = None for the whole process while it
    imported TVM: another thread's `import torch` failed meanwhile."""
    proc = subprocess.run([sys.executable, "-c", CONCURRENT, str(saved_path)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and proc.stdout.strip() == "OK", proc.stderr[-3000:]
