"""Typed loading of ``params.yaml``.

Every stage reads one section of ``params.yaml`` plus a few shared top-level keys into frozen
dataclasses. Loading checks everything before any work starts: an unknown key, a wrong type or an
impossible value raises :class:`ParamError` whose message names the key, what was found and what
is allowed.

A stage module declares its own section dataclass; :func:`load_stage_params` builds it::

    @dataclass(frozen=True)
    class EdgeParams:
        sa1b: str
        out: str
        kernel_size: int = 3

        def validate(self) -> None:
            require(self.kernel_size >= 1, "kernel_size", "must be >= 1")

    shared, params = load_stage_params("edge_maps_methodB", EdgeParams)
"""

from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")

PARAMS_FILE = "params.yaml"


class ParamError(ValueError):
    """A parameter in params.yaml is unknown, of the wrong type, or impossible."""


class StageError(Exception):
    """An expected way for a stage to fail (missing weights, a bad download, too many bad
    inputs): reported in one line by :func:`featcache.stage.run_stage`, without a traceback."""


def require(condition: bool, key: str, message: str) -> None:
    """Raise :class:`ParamError` naming ``key`` unless ``condition`` holds.

    Used by ``validate()`` methods; the loader prefixes the key with its section.
    """
    if not condition:
        raise ParamError(f"{key}: {message}")


@dataclass(frozen=True)
class SharedParams:
    """Top-level keys of params.yaml shared by several stages.

    ``model`` is the open_clip model of extract_clip_grid (so ``dvc exp run -S model=ViT-L-14``
    works); ``weights`` is ``random`` (seeded init, offline), ``pretrained`` (upstream default),
    an upstream tag, or a file path; ``device`` is ``auto``, ``cpu``, ``cuda`` or ``cuda:<i>``.
    """

    model: str = "ViT-B-16"
    weights: str = "random"
    device: str = "auto"
    seed: int = 0

    def validate(self) -> None:
        require(bool(self.model.strip()), "model", "must name an open_clip model, e.g. ViT-B-16")
        require(bool(self.weights.strip()), "weights",
                "use random, pretrained, an upstream tag or a checkpoint path")
        validate_device(self.device, "device")
        require(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")


def validate_device(device: str, key: str) -> None:
    """Accept ``auto``, ``cpu``, ``cuda`` and ``cuda:<index>``."""
    ok = device in ("auto", "cpu", "cuda") or (
        device.startswith("cuda:") and device[5:].isdigit())
    require(ok, key, f"got {device!r}; allowed: auto, cpu, cuda, cuda:<index>")


SHARED_KEYS = tuple(f.name for f in dataclasses.fields(SharedParams))
STAGE_SECTIONS = ("download", "extract_clip_grid", "extract_dinov2", "extract_siglip",
                  "extract_sam2", "edge_maps_methodB", "build_uv_index", "sample_point_feats",
                  "verify")


def read_params_file(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    """Read params.yaml as a plain mapping (no validation)."""
    path = Path(path)
    if not path.is_file():
        raise ParamError(f"{path}: not found; run the stage from the repository root")
    with path.open() as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ParamError(f"{path}: the top level must be a mapping of keys")
    return data


def load_shared(data: dict[str, Any]) -> SharedParams:
    """Build :class:`SharedParams` from the top-level keys of a params mapping."""
    unknown = sorted(k for k in data if k not in SHARED_KEYS and k not in STAGE_SECTIONS)
    if unknown:
        raise ParamError(f"{unknown[0]}: unknown top-level key; shared keys are "
                         f"{', '.join(SHARED_KEYS)} and stage sections are "
                         f"{', '.join(STAGE_SECTIONS)}")
    values = {k: data[k] for k in SHARED_KEYS if k in data}
    return build_dataclass(SharedParams, values, prefix="")


def load_stage_params(section: str, cls: type[T], path: str | Path = PARAMS_FILE,
                      ) -> tuple[SharedParams, T]:
    """Load the shared keys and the ``section`` of params.yaml into ``cls``.

    Raises :class:`ParamError` naming the offending key before any work is done.
    """
    data = read_params_file(path)
    if section not in data:
        raise ParamError(f"{section}: section missing from {path}")
    return load_shared(data), build_dataclass(cls, data[section], prefix=section)


def build_dataclass(cls: type[T], values: Any, prefix: str) -> T:
    """Recursively build dataclass ``cls`` from a mapping, checking keys, types and values."""
    where = prefix or "params.yaml"
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ParamError(f"{where}: expected a mapping of keys, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ParamError(f"{_join(prefix, unknown[0])}: unknown key; allowed keys: "
                         f"{', '.join(sorted(fields))}")
    hints = get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        key = _join(prefix, name)
        if name in values:
            kwargs[name] = _convert(values[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ParamError(f"{key}: required key is missing")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except ParamError as e:
            raise ParamError(f"{_join(prefix, str(e))}") from None
    return obj


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _convert(value: Any, hint: Any, key: str) -> Any:
    origin = get_origin(hint)
    args = get_args(hint)
    if hint is Any:
        return value
    if origin is Literal:
        if value not in args:
            allowed = ", ".join(repr(a) for a in args)
            raise ParamError(f"{key}: got {value!r}; allowed: {allowed}")
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ParamError as e:
                errors.append(str(e))
        raise ParamError(errors[0] if len(errors) == 1 else
                         f"{key}: {value!r} matches none of: {_type_name(hint)}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ParamError(f"{key}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return type(value)(_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)) \
            if origin is list else tuple(_convert(v, item, f"{key}[{i}]")
                                         for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamError(f"{key}: expected a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_convert(k, kt, key): _convert(v, vt, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, key)
    if hint is bool:
        if not isinstance(value, bool):
            raise ParamError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ParamError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported parameter type {hint!r}")  # a bug in a dataclass


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
