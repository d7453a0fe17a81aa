"""Every subcommand's common failures: one line on stderr (`moec: error: ...`), exit status 1, and
with `--debug` the exception itself (a traceback in a real process)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from moec.cli import main
from moec.runtime import archive
from moec.runtime.artifact import write_manifest

from .conftest import HIDDEN, MAX_TOKENS, Demo

GOOD_FACTORY = textwrap.dedent("""
    from moec.models.reference import demo_model

    def make():
        return demo_model(seed=0, hidden=16, intermediate=16, experts=2, top_k=1)

    def boom():
        raise RuntimeError("the user's factory failed")

    def wrong():
        return 42
""")


@pytest.fixture(scope="module")
def work(demo: Demo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with good and bad artifacts, inputs and IR for the CLI to fail on."""
    d = tmp_path_factory.mktemp("cli")
    (d / "good.moec").symlink_to(demo.path)
    damaged = archive.unpack(archive.pack(demo.path, d / "tmp.tar"), d)
    damaged.rename(d / "damaged.moec")
    ir = d / "damaged.moec" / "model.ir"
    ir.write_bytes(ir.read_bytes().replace(b"moe.router", b"moe.r0uter"))  # same size
    (d / "tmp.tar").rename(d / "good.moec.tar")
    (d / "factory.py").write_text(GOOD_FACTORY)
    np.save(d / "x.npy", np.zeros((3, HIDDEN), np.float32))
    np.save(d / "x_int.npy", np.zeros((3, HIDDEN), np.int64))
    np.save(d / "x_shape.npy", np.zeros((3, HIDDEN + 1), np.float32))
    np.save(d / "x_many.npy", np.zeros((MAX_TOKENS + 1, HIDDEN), np.float32))
    np.save(d / "x_obj.npy", np.array([object()]), allow_pickle=True)
    np.savez(d / "x_obj.npz", a=np.array([object()]), allow_pickle=True)
    np.savez(d / "x_crc.npz", a=np.ones((3, HIDDEN), np.float32))
    data = bytearray((d / "x_crc.npz").read_bytes())
    data[data.index(b"\x00\x00\x80\x3f") + 3] ^= 1  # a 1.0f of the data: the CRC fails
    (d / "x_crc.npz").write_bytes(bytes(data))
    latin1 = Path(shutil.copytree(demo.path, d / "latin1.moec"))  # model.ir not UTF-8, re-hashed
    ir = latin1 / "model.ir"
    ir.write_bytes(ir.read_bytes().replace(b"moe.router", b"moe.r\xe9uter"))
    manifest = json.loads((latin1 / "manifest.json").read_text())
    manifest["files"]["model.ir"] = {"sha256": hashlib.sha256(ir.read_bytes()).hexdigest(),
                                     "size": ir.stat().st_size}
    write_manifest(latin1, json.dumps(manifest).encode())
    (d / "notnpy.npy").write_text("hello")
    (d / "bad.ir").write_text("dim T: 0..8\ninput %x: f32[T, 4]\n%y: f32[T, 4] = core.nope(%x)\n")
    (d / "good.ir").write_text("dim T: 0..8\ninput %x: f32[T, 4]\noutput %x\n")
    (d / "plain_file").write_text("not an artifact")
    (d / "plain_file.tar").write_text("not an archive")
    return d


CASES = {
    # run
    "run-missing-artifact": ["run", "nope.moec", "--input", "x.npy"],
    "run-damaged-artifact": ["run", "damaged.moec", "--input", "x.npy"],
    "run-missing-input": ["run", "good.moec", "--input", "nope.npy"],
    "run-not-npy": ["run", "good.moec", "--input", "notnpy.npy"],
    "run-pickled-npy": ["run", "good.moec", "--input", "x_obj.npy"],
    "run-wrong-dtype": ["run", "good.moec", "--input", "x_int.npy"],
    "run-wrong-shape": ["run", "good.moec", "--input", "x_shape.npy"],
    "run-too-many-tokens": ["run", "good.moec", "--input", "x_many.npy"],
    "run-two-inputs": ["run", "good.moec", "--input", "x.npy", "--input", "x.npy"],
    "run-bad-device": ["run", "good.moec", "--input", "x.npy", "--device", "tpu"],
    "run-cuda-device": ["run", "good.moec", "--input", "x.npy", "--device", "cuda"],
    "run-unwritable-output": ["run", "good.moec", "--input", "x.npy", "--output",
                              "/nonexistent/dir/y.npy"],
    "run-plain-file": ["run", "plain_file", "--input", "x.npy"],
    "run-long-artifact-name": ["run", "m" * 300, "--input", "x.npy"],
    "run-long-input-name": ["run", "good.moec", "--input", "x" * 300 + ".npy"],
    "run-npz-object-array": ["run", "good.moec", "--input", "x_obj.npz"],
    "run-npz-bad-crc": ["run", "good.moec", "--input", "x_crc.npz"],
    "inspect-non-utf8-ir": ["inspect", "latin1.moec"],
    # verify / inspect / pack
    "verify-missing": ["verify", "nope.moec"],
    "verify-damaged": ["verify", "damaged.moec"],
    "verify-plain-file": ["verify", "plain_file"],
    "inspect-missing": ["inspect", "nope.moec"],
    "inspect-damaged": ["inspect", "damaged.moec"],
    "pack-missing": ["pack", "nope.moec"],
    "pack-damaged": ["pack", "damaged.moec"],
    "pack-onto-folder": ["pack", "good.moec", "-o", "."],
    # compile
    "compile-no-colon": ["compile", "factory.py", "-o", "o.moec"],
    "compile-missing-file": ["compile", "nofile.py:make", "-o", "o.moec"],
    "compile-missing-module": ["compile", "no_such_pkg.mod:make", "-o", "o.moec"],
    "compile-missing-factory": ["compile", "factory.py:nope", "-o", "o.moec"],
    "compile-factory-raises": ["compile", "factory.py:boom", "-o", "o.moec"],
    "compile-factory-wrong": ["compile", "factory.py:wrong", "-o", "o.moec"],
    "compile-bad-target": ["compile", "factory.py:make", "-o", "o.moec", "--target", "tpu"],
    "compile-max-tokens-0": ["compile", "factory.py:make", "-o", "o.moec", "--max-tokens", "0"],
    "compile-bad-pass": ["compile", "factory.py:make", "-o", "o.moec", "--passes", "nope"],
    "compile-onto-file": ["compile", "factory.py:make", "-o", "plain_file"],  # before compiling
    "compile-onto-non-tar": ["compile", "factory.py:make", "-o", "plain_file.tar"],
    # opt
    "opt-missing-file": ["opt", "nope.ir", "-p", "canonicalize"],
    "opt-parse-error": ["opt", "bad.ir", "-p", "canonicalize"],
    "opt-unknown-pass": ["opt", "good.ir", "-p", "no-such-pass"],
    "opt-bad-options": ["opt", "good.ir", "-p", "reorder-dispatch{block_m=x=1}"],
    "opt-binary-input": ["opt", "x.npy", "-p", "canonicalize"],
    # profile
    "profile-missing-file": ["profile", "nofile.py:make"],
    "profile-artifact-no-input": ["profile", "good.moec"],
    "profile-bad-input": ["profile", "good.moec", "--input", "notnpy.npy"],
    "profile-damaged": ["profile", "damaged.moec", "--input", "x.npy"],
    # bench (single process)
    "bench-missing": ["bench", "nope.moec"],
    "bench-damaged": ["bench", "damaged.moec"],
}
UNEXPECTED = {"compile-factory-raises"}  # the user's code raised: said so, with the --debug hint


@pytest.mark.parametrize("name", list(CASES))
def test_common_failures_print_one_line(work: Path, name: str, capsys: pytest.CaptureFixture,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(work)
    assert main(CASES[name]) == 1
    err = capsys.readouterr().err
    # Progress lines ("[  0.15s] passes...") may come first; the error is one line, the last.
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("[")]
    assert len(lines) == 1 and lines[0].startswith("moec: error: "), err
    assert ("rerun with --debug" in err) == (name in UNEXPECTED), err
    with pytest.raises(Exception):  # noqa: B017  (--debug re-raises whatever it was)
        main(["--debug", *CASES[name]])


def test_success_paths_still_work(work: Path, capsys: pytest.CaptureFixture,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(work)
    assert main(["verify", "good.moec.tar"]) == 0
    assert main(["inspect", "good.moec.tar"]) == 0
    assert main(["pack", "good.moec", "-o", "again.moec.tar"]) == 0
    assert main(["verify", "again.moec.tar"]) == 0
    assert main(["run", "good.moec.tar", "--input", "x.npy", "--output", "y.npy"]) == 0
    assert np.load(work / "y.npy").shape == (3, HIDDEN)
    out = capsys.readouterr().out
    assert "ok (manifest, hashes" in out and "final IR:" in out
    digest = hashlib.sha256((work / "good.moec" / "manifest.json").read_bytes()).hexdigest()
    assert f"sha256 of manifest.json: {digest}" in out


def test_run_output_is_written_to_the_name_given(work: Path, capsys: pytest.CaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """`--output y.txt` said it wrote y.txt but wrote y.txt.npy (numpy appends the suffix)."""
    monkeypatch.chdir(work)
    assert main(["run", "good.moec", "--input", "x.npy", "--output", "y.txt"]) == 0
    assert "wrote y.txt (in .npy format)" in capsys.readouterr().out
    assert np.load(work / "y.txt").shape == (3, HIDDEN)
    assert not (work / "y.txt.npy").exists()
    assert not [p for p in work.iterdir() if ".tmp-" in p.name]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TVM_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, "-m", "moec.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name", ["verify-damaged", "opt-parse-error", "compile-factory-raises"])
def test_real_process_exit_status_and_debug_traceback(work: Path, name: str) -> None:
    plain = _cli(*CASES[name], cwd=work)
    assert plain.returncode == 1 and plain.stdout == ""
    assert len(plain.stderr.strip().splitlines()) == 1 and "Traceback" not in plain.stderr
    debug = _cli("--debug", *CASES[name], cwd=work)
    assert debug.returncode != 0 and "Traceback (most recent call last)" in debug.stderr


def test_verify_reports_the_problem(work: Path) -> None:
    out = _cli("verify", "damaged.moec", cwd=work)
    assert "model.ir" in out.stderr and "hash mismatch" in out.stderr
    manifest = json.loads((work / "good.moec" / "manifest.json").read_text())
    assert manifest["files"]["model.ir"]["sha256"][:16] in out.stderr
