"""Do the artifact's parts agree with each other? Checks `verify` and `load` make after the
hashes, so that an artifact whose files are each intact but do not belong together (a weight
stored where another belongs, a manifest edited to contradict the kernels, another model's IR)
is refused at load instead of running silently wrong or failing at the first call.

What each check compares (docs/security.md, "What load checks", has the full table):

- `stored_weights`: weights.safetensors is laid out exactly as `save_aligned` writes it: the
  manifest's `params`, in that order, each at the next 64-byte boundary, padding tensors only
  in the gaps, nothing else. A header whose `data_offsets` were swapped between two tensors of
  one shape, an extra or a missing tensor, a tensor of an unknown dtype are refused.
- `check_ir`: model.ir's `input` and `param` declarations: every signature input is declared
  with the same name, dtype and shape; every stored weight is a declared parameter (packed
  weights, `NAME@kernel.i`, by their parameter's name) and, when stored unpacked, has its
  declared dtype and shape.
- `check_kernel_params` (at load, on the loaded library; moec.runtime.kernels): `main`'s
  parameters, as the compiled Relax VM records them, have the signature's inputs and the
  manifest's params as names, in order, with the dtypes and static dims of the signature and
  of the stored weights.

What no check can detect: an artifact rewritten consistently (other weight values with their
hashes, manifest and digest updated); two weights of one shape and dtype whose *bytes* were
exchanged in the file (hashes recomputed). The hashes are not a signature (docs/security.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from moec.errors import ArtifactError
from moec.runtime.manifest import Signature
from moec.runtime.weights import ALIGN, DTYPE_NAMES, PAD_PREFIX

_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4,
             "int16": 2, "int8": 1, "uint64": 8, "uint32": 4, "uint16": 2, "uint8": 1,
             "bool": 1, "float8_e4m3fn": 1, "float8_e5m2": 1}
_IR_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16", "f64": "float64",
              "i32": "int32", "i64": "int64", "i8": "int8", "u8": "uint8", "bool": "bool"}


@dataclass(frozen=True)
class StoredTensor:
    """A weight as weights.safetensors stores it."""

    dtype: str
    shape: tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.dtype}{list(self.shape)}"


def stored_weights(header: dict, data_size: int, params: tuple[str, ...], where: str
                   ) -> dict[str, StoredTensor]:
    """Check the parsed safetensors `header` (entries without `__metadata__`; `data_size`: the
    bytes after the header) against the canonical layout of `params`; return their types."""

    def refuse(what: str) -> ArtifactError:
        return ArtifactError(f"{where}: {what}; a moec artifact stores its params in manifest "
                             f"order, each at the next {ALIGN}-byte boundary: the file was "
                             f"edited or damaged, recompile the model")

    known = set(params)
    for name in header:
        if name not in known and not name.startswith(PAD_PREFIX):
            raise refuse(f"it holds tensor {name!r}, which the manifest's params do not list")
    out: dict[str, StoredTensor] = {}
    pos = 0
    pads = 0
    for name in params:
        if name not in header:
            raise ArtifactError(f"{where} lacks weight {name!r}, which the manifest's params "
                                f"list")
        entry = header[name]
        try:
            dtype = DTYPE_NAMES[entry["dtype"]]
            shape = tuple(entry["shape"])
            lo, hi = entry["data_offsets"]
            if not all(type(d) is int and d >= 0 for d in (*shape, lo, hi)):
                raise TypeError
        except (KeyError, TypeError, ValueError):
            raise refuse(f"bad header entry for {name!r}: {str(entry)[:200]}") from None
        nbytes = _ITEMSIZE[dtype]
        for d in shape:
            nbytes *= d
        gap = (-pos) % ALIGN
        if gap:
            pads += 1
            pad = [v for k, v in header.items() if k.startswith(PAD_PREFIX)
                   and v.get("data_offsets") == [pos, pos + gap]]
            if not pad:
                raise refuse(f"no padding tensor fills bytes {pos}..{pos + gap}")
            pos += gap
        if [lo, hi] != [pos, pos + nbytes]:
            raise refuse(f"weight {name!r} ({dtype}{list(shape)}) spans bytes {lo}..{hi} of the "
                         f"data, not {pos}..{pos + nbytes}")
        out[name] = StoredTensor(dtype, shape)
        pos += nbytes
    if sum(1 for k in header if k.startswith(PAD_PREFIX)) != pads:
        raise refuse("it holds padding tensors outside the gaps between weights")
    if pos != data_size:
        raise refuse(f"the weights end at byte {pos} of the data, but it has {data_size}")
    return out


# `input %x: f32[T, 64]`, `param @mlp.gate.weight: f32[8, 64]`
_DECL = re.compile(r"^(input|param) ([%@])(\S+): (\w+)\[(.*)\]$")
_HEADER = re.compile(r"^(dim|input|param) ")


def ir_declarations(text: str, where: str) -> tuple[dict[str, str], dict[str, str]]:
    """The `input` and `param` lines at the top of an IR text: name -> `dtype[dims]` (numpy
    dtype names, dims as written)."""
    inputs: dict[str, str] = {}
    params: dict[str, str] = {}
    for line in text.splitlines():
        if not _HEADER.match(line):
            break
        if line.startswith("dim "):
            continue
        m = _DECL.match(line)
        if m is None or m.group(4) not in _IR_DTYPES:
            raise ArtifactError(f"{where}: cannot read the declaration {line[:200]!r}")
        kind, _, name, dtype, dims = m.groups()
        shape = "[" + ", ".join(d.strip() for d in dims.split(",") if d.strip()) + "]"
        (inputs if kind == "input" else params)[name] = _IR_DTYPES[dtype] + shape
    return inputs, params


def check_ir(text: str, signature: Signature, stored: dict[str, StoredTensor], where: str
             ) -> None:
    """Refuse an IR whose declarations contradict the signature or the stored weights."""
    inputs, params = ir_declarations(text, where)
    for spec in signature.inputs:
        want = spec.dtype + "[" + ", ".join(str(d) for d in spec.shape) + "]"
        if spec.name not in inputs:
            raise ArtifactError(f"{where} declares no input %{spec.name}, which the manifest's "
                                f"signature lists: the IR belongs to another model; recompile")
        if inputs[spec.name] != want:
            raise ArtifactError(f"{where} declares input %{spec.name} as {inputs[spec.name]}, "
                                f"the manifest's signature as {want}: the manifest and the IR "
                                f"disagree (edited or damaged); recompile")
    for name, t in stored.items():
        base = name if name in params else name.rpartition("@")[0]
        if base not in params:
            raise ArtifactError(f"{where} declares no parameter @{base}, but weight {name!r} "
                                f"is stored: the IR belongs to another model; recompile")
        if base == name and params[name] != str(t):
            raise ArtifactError(f"{where} declares @{name} as {params[name]}, but it is stored "
                                f"as {t}: the weights and the IR disagree; recompile")


def check_ir_file(path: Path, signature: Signature, stored: dict[str, StoredTensor]) -> None:
    """`check_ir` on the file `path` (model.ir), read as UTF-8."""
    where = f"{path.name} in {path.parent}"
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ArtifactError(f"{where} is not UTF-8 text ({e}); the file is damaged") from None
    except OSError as e:
        raise ArtifactError(f"{where} cannot be read ({e})") from None
    check_ir(text, signature, stored, where)
