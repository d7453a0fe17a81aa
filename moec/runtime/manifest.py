"""The artifact's `manifest.json`: typed, validated, and serialised the same way every time.

The schema is described in `moec.runtime.artifact`. Everything here is pure Python (no TVM, no
numpy) so that `moec verify` and `moec inspect` can read a manifest without loading native code.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from moec.errors import ArtifactError
from moec.runtime.dimexpr import DimExprError, parse_dim_expr

FORMAT_VERSION = 1
"""The artifact format this runtime writes and reads. Bump it on any incompatible change."""

SUPPORTED_FORMAT_VERSIONS = frozenset({1})

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _fail(what: str) -> ArtifactError:
    return ArtifactError(f"manifest.json: {what}")


def _no_constant(name: str) -> Any:
    # json.loads accepts NaN and Infinity, which are not JSON and which to_json cannot write.
    raise _fail(f"not valid JSON ({name} is not a JSON value)")


def _expect(value: Any, kind: type | tuple[type, ...], where: str) -> Any:
    # bool is an int in Python; a manifest saying `"size": true` is still malformed.
    if isinstance(value, bool) and kind is int:
        raise _fail(f"{where} must be an integer, not {value!r}")
    if not isinstance(value, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise _fail(f"{where} must be {names}, not {type(value).__name__} {value!r}")
    return value


@dataclass(frozen=True)
class DimSpec:
    """Bounds of one symbolic dimension (e.g. the token count `T`), both inclusive.

    `max=None` means unbounded."""

    min: int = 0
    max: int | None = None

    def to_dict(self) -> dict[str, int | None]:
        return {"min": self.min, "max": self.max}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> DimSpec:
        _expect(data, dict, where)
        lo = _expect(data.get("min", 0), int, f"{where}.min")
        hi = data.get("max")
        if hi is not None:
            _expect(hi, int, f"{where}.max")
        if lo < 0 or (hi is not None and hi < lo):
            raise _fail(f"{where} has bounds [{lo}, {hi}]; need 0 <= min <= max")
        return cls(lo, hi)


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, shape (ints and symbolic dim names) and dtype name."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str

    def __str__(self) -> str:
        return f"{self.name}: {self.type_str()}"

    def type_str(self) -> str:
        """`float32[T, 64]`: the type as error messages and `moec inspect` show it."""
        return f"{self.dtype}[{', '.join(str(d) for d in self.shape)}]"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> TensorSpec:
        _expect(data, dict, where)
        name = _expect(data.get("name"), str, f"{where}.name")
        shape = _expect(data.get("shape"), list, f"{where}.shape")
        dtype = _expect(data.get("dtype"), str, f"{where}.dtype")
        for i, d in enumerate(shape):
            if isinstance(d, bool) or not isinstance(d, (int, str)):
                raise _fail(f"{where}.shape[{i}] must be an int or a dim name, not {d!r}")
            if isinstance(d, int) and d < 0:
                raise _fail(f"{where}.shape[{i}] is negative ({d})")
        return cls(name, tuple(shape), dtype)


@dataclass(frozen=True)
class Limit:
    """An upper bound on an expression of dims: `B*S <= 4096` (the token count of a call)."""

    expr: str
    max: int

    def to_dict(self) -> dict[str, Any]:
        return {"expr": self.expr, "max": self.max}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Limit:
        _expect(data, dict, where)
        expr = _expect(data.get("expr"), str, f"{where}.expr")
        hi = _expect(data.get("max"), int, f"{where}.max")
        if hi < 0:
            raise _fail(f"{where}.max is negative ({hi})")
        return cls(expr, hi)


def _dim_names(d: str, where: str) -> frozenset[str]:
    try:
        return parse_dim_expr(d).names
    except DimExprError as e:
        raise _fail(f"{where}: {e}") from None


@dataclass(frozen=True)
class Signature:
    """What `main` takes and returns. Input shapes hold ints, declared dim names (each one
    dynamic, bound by the call) and expressions of them (`"B*S"`, checked against the call's
    values); output shapes may hold any expression (`"T*2"`), informative only. `limits`
    bound expressions of the dims (the token count `B*S` of a `[B, S, H]` input)."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: Mapping[str, DimSpec] = field(default_factory=dict)
    limits: tuple[Limit, ...] = ()

    def __post_init__(self) -> None:
        for spec in self.inputs:
            for d in spec.shape:
                if not isinstance(d, str):
                    continue
                unknown = sorted(_dim_names(d, f"input {spec.name!r}") - set(self.dims))
                if unknown:
                    raise _fail(
                        f"input {spec.name!r} uses dim {unknown[0]!r}, which signature.dims "
                        f"does not declare (declared: {sorted(self.dims) or 'none'})"
                    )
        for i, lim in enumerate(self.limits):
            unknown = sorted(_dim_names(lim.expr, f"signature.limits[{i}]") - set(self.dims))
            if unknown:
                raise _fail(f"signature.limits[{i}] uses undeclared dim {unknown[0]!r}")
        names = [s.name for s in self.inputs]
        if len(set(names)) != len(names):
            raise _fail(f"signature.inputs has duplicate names: {names}")

    def __str__(self) -> str:
        ins = ", ".join(str(s) for s in self.inputs)
        outs = ", ".join(str(s) for s in self.outputs)
        bounds = ", ".join(
            f"{n} in [{d.min}, {'inf' if d.max is None else d.max}]" for n, d in self.dims.items()
        )
        bounds += "".join(f", {lim.expr} <= {lim.max}" for lim in self.limits)
        return f"({ins}) -> ({outs})" + (f" where {bounds}" if bounds else "")

    def to_dict(self) -> dict[str, Any]:
        out = {
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
            "dims": {n: d.to_dict() for n, d in self.dims.items()},
        }
        if self.limits:
            out["limits"] = [lim.to_dict() for lim in self.limits]
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str = "signature") -> Signature:
        """Parse the manifest form; raises ArtifactError naming the bad field."""
        if isinstance(data, Signature):
            return data
        _expect(data, dict, where)
        ins = _expect(data.get("inputs"), list, f"{where}.inputs")
        outs = _expect(data.get("outputs"), list, f"{where}.outputs")
        dims = _expect(data.get("dims", {}), dict, f"{where}.dims")
        limits = _expect(data.get("limits", []), list, f"{where}.limits")
        for n in dims:
            if not _IDENT.match(n):
                raise _fail(f"{where}.dims has a name that is not an identifier: {n!r}")
        return cls(
            inputs=tuple(
                TensorSpec.from_dict(s, f"{where}.inputs[{i}]") for i, s in enumerate(ins)
            ),
            outputs=tuple(
                TensorSpec.from_dict(s, f"{where}.outputs[{i}]") for i, s in enumerate(outs)
            ),
            dims={n: DimSpec.from_dict(d, f"{where}.dims.{n}") for n, d in dims.items()},
            limits=tuple(
                Limit.from_dict(x, f"{where}.limits[{i}]") for i, x in enumerate(limits)
            ),
        )


@dataclass(frozen=True)
class FileEntry:
    """Size in bytes and hex sha256 of one file of the artifact."""

    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest(Mapping[str, Any]):
    """The parsed `manifest.json`. `files` maps every file of the artifact except the manifest
    itself to its size and hash.

    Typed fields for code (`m.signature.inputs[0].shape`), and it also reads as the JSON
    mapping it was parsed from (`m["files"]["kernels.so"]["size"]`, `dict(m)`), which is what
    printing tools such as `moec inspect` want."""

    format_version: int
    moec_version: str
    tvm_version: str
    target: Mapping[str, Any]
    signature: Signature
    params: tuple[str, ...]
    pipeline: tuple[str, ...]
    files: Mapping[str, FileEntry]
    meta: Mapping[str, Any] = field(default_factory=dict)

    @cached_property
    def _json(self) -> dict[str, Any]:
        return self.to_dict()

    def __getitem__(self, key: str) -> Any:
        return self._json[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._json)

    def __len__(self) -> int:
        return len(self._json)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, as plain dicts and lists."""
        return {
            "format_version": self.format_version,
            "moec_version": self.moec_version,
            "tvm_version": self.tvm_version,
            "target": dict(self.target),
            "signature": self.signature.to_dict(),
            "params": list(self.params),
            "pipeline": list(self.pipeline),
            # Sorted so that the same build always gives the same bytes.
            "files": {
                n: {"sha256": e.sha256, "size": e.size} for n, e in sorted(self.files.items())
            },
            "meta": dict(self.meta),
        }

    def to_json(self) -> str:
        """Deterministic JSON text (fixed key order, no timestamps), ending in a newline."""
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parse and validate; raises ArtifactError saying which field is wrong."""
        try:
            data = json.loads(text, parse_constant=_no_constant)
        except json.JSONDecodeError as e:
            raise _fail(f"not valid JSON ({e})") from None
        except ValueError as e:  # an integer of more than 4300 digits (sys.int_max_str_digits)
            raise _fail(f"not valid JSON ({str(e)[:120]})") from None
        except RecursionError:
            raise _fail("not a manifest: JSON nested too deeply") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        _expect(data, dict, "the top level")
        if "format_version" not in data:
            raise _fail("has no format_version; this is not a moec artifact manifest")
        version = _expect(data["format_version"], int, "format_version")
        if version not in SUPPORTED_FORMAT_VERSIONS:
            newest = max(SUPPORTED_FORMAT_VERSIONS)
            hint = "upgrade moec" if version > newest else "recompile the model with this moec"
            raise ArtifactError(
                f"artifact format version {version} is not supported by this moec (it reads "
                f"{sorted(SUPPORTED_FORMAT_VERSIONS)}); {hint}"
            )
        for key in ("moec_version", "tvm_version", "target", "signature", "params", "files"):
            if key not in data:
                raise _fail(f"missing required field {key!r}")
        target = _expect(data["target"], dict, "target")
        _expect(target.get("kind"), str, "target.kind")
        features = target.get("cpu_features", [])
        if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
            raise _fail(f"target.cpu_features must be a list of strings, not {features!r}")
        params = _expect(data["params"], list, "params")
        for i, p in enumerate(params):
            _expect(p, str, f"params[{i}]")
        if len(set(params)) != len(params):
            raise _fail("params has duplicate names")
        pipeline = _expect(data.get("pipeline", []), list, "pipeline")
        for i, p in enumerate(pipeline):
            _expect(p, str, f"pipeline[{i}]")
        files: dict[str, FileEntry] = {}
        for name, entry in _expect(data["files"], dict, "files").items():
            # A name like "../x" would make verify() read outside the artifact folder.
            if not _FILE_NAME.match(name) or name == "manifest.json":
                raise _fail(f"files has an invalid file name {name!r}")
            _expect(entry, dict, f"files.{name}")
            sha = _expect(entry.get("sha256"), str, f"files.{name}.sha256")
            if not _SHA256.match(sha):
                raise _fail(f"files.{name}.sha256 is not a hex sha256: {sha!r}")
            size = _expect(entry.get("size"), int, f"files.{name}.size")
            files[name] = FileEntry(sha, size)
        return cls(
            format_version=version,
            moec_version=_expect(data["moec_version"], str, "moec_version"),
            tvm_version=_expect(data["tvm_version"], str, "tvm_version"),
            target=target,
            signature=Signature.from_dict(data["signature"]),
            params=tuple(params),
            pipeline=tuple(pipeline),
            files=files,
            meta=_expect(data.get("meta", {}), dict, "meta"),
        )


def signature_from(data: Signature | Mapping[str, Any]) -> Signature:
    """Accept a Signature or its manifest dict form (what codegen hands over)."""
    return data if isinstance(data, Signature) else Signature.from_dict(dict(data))


def as_str_tuple(items: Sequence[str], what: str) -> tuple[str, ...]:
    """Validate a list of names (pipeline, params) given by the compiler."""
    out = tuple(items)
    for x in out:
        if not isinstance(x, str):
            raise TypeError(f"{what} must hold strings, got {x!r}")
    return out
