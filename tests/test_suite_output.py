"""The suite's own output stays pytest's: no test prints around the capture (the ptxas tables
once went into the progress line), and compiling from read-only weights warns about nothing."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np

TESTS = Path(__file__).resolve().parent


def test_no_test_writes_around_pytests_capture():
    bypass = re.compile(r"\b(capsys|capfd)\.disabled\(|sys\.__(stdout|stderr)__")
    found = [f"{p.relative_to(TESTS)}:{i}" for p in sorted(TESTS.rglob("*.py"))
             for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
             if bypass.search(line) and p.name != Path(__file__).name]
    assert not found, f"tests writing past pytest's capture (assert with a message): {found}"


def test_packing_read_only_weights_warns_nothing():
    """Weights mapped read-only from a file: torch.from_numpy warned "The given NumPy array is
    not writable" from moec/codegen/kernels/linear.py."""
    from moec.codegen.kernels.linear import pack_nk

    w = np.frombuffer(np.arange(6 * 40, dtype=np.float32).tobytes(), np.float32).reshape(6, 40)
    assert not w.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        packed = pack_nk(w, 4)
    assert packed.shape == (2, 40, 4)
    np.testing.assert_array_equal(packed[1, :, :2], w[4:6].T)  # panel 1: rows 4, 5 (+ padding)
    assert not packed[1, :, 2:].any()
