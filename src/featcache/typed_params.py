"""Frozen dataclasses built from plain mappings, checking every key, type and value.

The type machinery behind :mod:`featcache.config` (which re-exports :class:`ParamError`,
:func:`require` and :func:`build_dataclass`; stage code imports them from there). Types are read
from the annotations: ``int``, ``float``, ``str``, ``bool``, ``Literal[...]``, ``list[...]``,
``tuple[...]``, ``dict[...]``, nested dataclasses and ``X | None``. Every error names the dotted
key (``extract_sam2.images``, ``download.sizes[1]``), what was found and what is allowed.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

T = TypeVar("T")


class ParamError(ValueError):
    """A parameter in params.yaml is unknown, of the wrong type, or impossible."""


def require(condition: bool, key: str, message: str) -> None:
    """Raise :class:`ParamError` naming ``key`` unless ``condition`` holds.

    Used by ``validate()`` methods; the loader prefixes the key with its section.
    """
    if not condition:
        raise ParamError(f"{key}: {message}")


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
                         f"{key}: got {value!r}; allowed: {_type_name(hint)}")
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


_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _type_name(hint: Any) -> str:
    """``int | Literal["auto"]`` -> ``an integer or 'auto'`` (for error messages)."""
    if get_origin(hint) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(hint) if a is not type(None))
    if get_origin(hint) is Literal:
        return ", ".join(repr(a) for a in get_args(hint))
    return _TYPE_WORDS.get(hint) or getattr(hint, "__name__", None) or \
        str(hint).replace("typing.", "")
