"""Coverage-guided fuzzing with atheris (optional: `pip install atheris`; not run in CI).

    python tests/reliability/fuzz_atheris.py parser   -max_total_time=60
    python tests/reliability/fuzz_atheris.py manifest -max_total_time=60
    python tests/reliability/fuzz_atheris.py archive  -max_total_time=60

Targets: `parser` feeds bytes (as UTF-8 text) to `moec.ir.parse`; `manifest` to
`Manifest.from_json`; `archive` writes them to a file and runs `moec.runtime.archive.unpack`.
Each may raise moec's own errors (`MoecError`) only; anything else is a crash that atheris
reports with the input that caused it (saved as crash-*). Arguments after the target go to
libFuzzer (-max_total_time, -runs, a corpus folder, ...).
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from moec.errors import MoecError
    from moec.ir import parse
    from moec.runtime import archive
    from moec.runtime.manifest import Manifest

_SCRATCH = Path(tempfile.mkdtemp(prefix="moec-atheris-"))


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")  # keeps the seeds' text as it is


def fuzz_parser(data: bytes) -> None:
    try:
        parse(_text(data))
    except MoecError:
        pass


def fuzz_manifest(data: bytes) -> None:
    try:
        Manifest.from_json(_text(data))
    except MoecError:
        pass


def fuzz_archive(data: bytes) -> None:
    tar = _SCRATCH / "a.moec.tar"
    tar.write_bytes(data)
    dest = Path(tempfile.mkdtemp(dir=_SCRATCH))
    try:
        archive.unpack(tar, dest)
    except MoecError:
        pass
    written = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    if written > len(data):  # no sparse or other bomb: never more than the archive holds
        raise AssertionError(f"unpack wrote {written} bytes from a {len(data)}-byte archive")
    outside = {p.name for p in _SCRATCH.iterdir() if not p.name.startswith("corpus-")}
    outside -= {"a.moec.tar", dest.name}
    shutil.rmtree(dest)
    if outside:
        raise AssertionError(f"unpack wrote outside its folder: {outside}")


TARGETS = {"parser": fuzz_parser, "manifest": fuzz_manifest, "archive": fuzz_archive}

_SEED_IR = """dim T: 0..64
input %x: f32[T, 16]
param @r: f32[4, 16]
%w: f32[T, 2], %j: i32[T, 2] = moe.router(%x, @r) {scoring=softmax, k=2}
%s: i32[(T*2//32+4)*32], %t: i32[T*2//32+4], %u: i32[T, 2] = moe.align(%j) {block_m=32, \
num_experts=4}
%y: f32[T, 16] = core.silu(%x)  # layers.0
output %y, %w
"""
_SEED_MANIFEST = json.dumps({
    "format_version": 1, "moec_version": "0.1.0", "tvm_version": "0.27.0", "meta": {},
    "target": {"kind": "llvm", "mcpu": "x86-64", "cpu_features": ["avx2"]},
    "signature": {"inputs": [{"name": "x", "shape": ["T", 64], "dtype": "float32"}],
                  "outputs": [{"name": "y", "shape": ["T*2", 64], "dtype": "float32"}],
                  "dims": {"T": {"min": 0, "max": 64}}},
    "params": ["w"], "pipeline": ["fuse-gating"],
    "files": {"model.ir": {"sha256": "0" * 64, "size": 3}},
})


def _seed_archive(sparse: bool = False) -> bytes:
    """A PAX archive whose manifest declares its model.ir (so that extraction gets past the
    manifest check); `sparse`: model.ir as a GNU sparse (PAX 0.1) member."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("m.moec/manifest.json", _SEED_MANIFEST.encode()),
                           ("m.moec/model.ir", b"ir\n")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if sparse and name.endswith(".ir"):
                info.pax_headers = {"GNU.sparse.size": "3", "GNU.sparse.map": "0,3"}
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _seed_corpus(target: str) -> str:
    seeds = {"parser": [_SEED_IR.encode()], "manifest": [_SEED_MANIFEST.encode()],
             "archive": [_seed_archive(), _seed_archive(sparse=True)]}[target]
    folder = _SCRATCH / f"corpus-{target}"
    folder.mkdir()
    for i, seed in enumerate(seeds):
        (folder / f"seed{i}").write_bytes(seed)
    return str(folder)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{'|'.join(TARGETS)}}} [libFuzzer options]")
    name = sys.argv.pop(1)
    if not any(not a.startswith("-") for a in sys.argv[1:]):  # no corpus folder given
        sys.argv.append(_seed_corpus(name))
    atheris.Setup(sys.argv, TARGETS[name])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
