"""Typed provenance: what every output records about how it was made.

One dataclass per output kind (:data:`KINDS` maps each stage to its class). A stage builds its
kind's dataclass and hands ``to_dict()`` to the engine, which stores it (HDF5 attribute or
``provenance.json``); every reader (verify's checks, the spot check, the pictures,
sample_point_feats) reads a store's provenance back with ``from_dict``, which raises
:class:`ProvenanceError` naming the key that is missing or holds the wrong type.

The same fact has the same key in every output. :class:`OutputProvenance` holds the facts every
output records; the engine fills them in when it writes (:func:`featcache.engine.run_job`:
``stage``, ``layout``, ``storage_dtype``, ``libraries``, ``code_version``, ``shard_mb``; the
per-item views add ``suffix`` and ``aliases``), so they are None in a provenance a stage builds,
and ``to_dict`` leaves out a None that is a field's default. :class:`EncodedProvenance` adds what
an encoder's outputs record (model, family, weights and their identity, the full
:class:`~featcache.encoders.base.EncoderSpec` as ``preprocessing``). A key this version does not
know is kept in ``extra`` and written back as it was; nothing reads it.

No timestamps, no host names: outputs must be byte-identical across runs and machines with the
same software.
"""

from __future__ import annotations

import importlib.metadata
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from functools import cache
from typing import Any, ClassVar, Literal, Self, Union

from featcache.encoders.base import Encoder, EncoderSpec, Family

_LIBRARIES = ("featcache", "numpy", "torch", "torchvision", "open_clip_torch", "transformers",
              "sam2", "h5py", "opencv-python-headless", "pycocotools", "pillow")


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that can change a feature's value."""
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


class ProvenanceError(ValueError):
    """A provenance lacks a key its kind records, or a key holds a value of the wrong type."""


class _Record:
    """``to_dict``/``from_dict`` from the dataclass fields and their type hints.

    Supported hints: ``str``, ``int``, ``float``, ``bool``, ``Any``, ``Literal[...]``,
    ``X | None``, ``tuple[X, ...]``/``tuple[X, Y, Z]`` (JSON lists), ``dict[str, X]`` and any
    class with ``from_dict``/``to_dict`` (nested records, :class:`EncoderSpec`). A class with
    an ``extra`` field keeps unknown keys there; any other refuses them.
    """

    KIND: ClassVar[str] = "record"

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able form that is stored (tuples as lists, nested records as dicts)."""
        out: dict[str, Any] = dict(getattr(self, "extra", {}))
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if f.name == "extra" or (value is None and f.default is None):
                continue
            out[f.name] = _plain(value)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """The record ``data`` describes; :class:`ProvenanceError` names the first key that is
        missing or of the wrong type (or unknown, for a class without ``extra``)."""
        if not isinstance(data, Mapping):
            raise ProvenanceError(f"{cls.KIND} provenance: expected a mapping, got "
                                  f"{type(data).__name__}")
        names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
        hints, values = _hints(cls), {}
        for f in fields(cls):  # type: ignore[arg-type]
            if f.name == "extra":
                continue
            if f.name not in data:
                if f.default is MISSING and f.default_factory is MISSING:
                    raise ProvenanceError(f"{cls.KIND} provenance: missing key {f.name!r}")
                continue
            values[f.name] = _convert(hints[f.name], data[f.name], f.name, cls.KIND)
        unknown = {k: v for k, v in data.items() if k not in names or k == "extra"}
        if "extra" in names:
            values["extra"] = unknown
        elif unknown:
            raise ProvenanceError(f"{cls.KIND} provenance: unknown key {min(unknown)!r}")
        return cls(**values)


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _plain(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _convert(hint: Any, value: Any, where: str, kind: str) -> Any:
    """``value`` checked against ``hint`` (lists become tuples, dicts nested records)."""

    def bad(expected: str) -> ProvenanceError:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        return ProvenanceError(f"{kind} provenance: key {where!r} is {shown}, expected "
                               f"{expected}")

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _convert(next(a for a in args if a is not type(None)), value, where, kind)
    if origin is Literal:
        if value not in args:
            raise bad(f"one of {list(args)}")
        return value
    if origin is tuple:
        n = None if len(args) == 2 and args[1] is Ellipsis else len(args)
        if not isinstance(value, (list, tuple)) or (n is not None and len(value) != n):
            raise bad(f"a list of {n or 'any number of'} values")
        return tuple(_convert(args[0 if n is None else i], v, f"{where}[{i}]", kind)
                     for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise bad("a mapping")
        return {str(k): _convert(args[1], v, f"{where}.{k}", kind) for k, v in value.items()}
    if hasattr(hint, "from_dict"):
        try:
            return hint.from_dict(value)
        except (TypeError, ValueError) as e:  # EncoderSpec's or a nested record's message
            raise ProvenanceError(f"{kind} provenance: key {where!r}: {e}") from None
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {str: isinstance(value, str), bool: isinstance(value, bool),
          int: numeric and isinstance(value, int), float: numeric}.get(hint)
    if ok is None:
        raise TypeError(f"{kind} provenance: no conversion for {where!r} of type {hint}")
    if not ok:
        raise bad(hint.__name__)
    return value


@dataclass(frozen=True, kw_only=True)
class OutputProvenance(_Record):
    """What every output records. The engine fills these in when it writes; ``params`` is the
    stage's method params (engine knobs excluded) where it records them as one mapping."""

    KIND: ClassVar[str] = "output"

    stage: str | None = None
    layout: str | None = None
    storage_dtype: Literal["fp16", "fp32"] | None = None
    libraries: dict[str, str] | None = None
    code_version: str | None = None
    shard_mb: float | None = None
    suffix: str | None = None                # per-item NPZ views: ``{key}{suffix}.npz``
    aliases: dict[str, str] | None = None    # per-item NPZ views: entry -> field it copies
    params: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)   # unknown keys, kept as they were


@dataclass(frozen=True, kw_only=True)
class EncodedProvenance(OutputProvenance):
    """What an encoder's outputs record: the model, its family, the weights as params named
    them and their identity, the full spec (``preprocessing``), the upstream library, what the
    features are in words, and the precision the forward pass ran in."""

    KIND: ClassVar[str] = "encoded output"

    model: str
    family: Family
    weights: str
    weights_id: str
    preprocessing: EncoderSpec
    library: str = ""
    notes: str = ""
    compute_precision: str


def encoder_facts(encoder: Encoder) -> dict[str, Any]:
    """The :class:`EncodedProvenance` fields an encoder determines (keyword arguments)."""
    spec = encoder.spec
    return {"model": spec.name, "family": spec.family, "weights": spec.weights,
            "weights_id": encoder.weights_id, "preprocessing": spec,
            "library": encoder.upstream, "notes": encoder.notes}


@dataclass(frozen=True, kw_only=True)
class GridProvenance(EncodedProvenance):
    """One split's output of ``extract_clip_grid`` or ``extract_dinov2``: the stored ``grid``
    (``native_grid`` pooled by ``pooling``), the ``array_layout`` (``tokens`` ``(g*g, C)`` or
    ``chw`` ``(C, g, g)``), the split's name and image folder, how keys are made from file
    names, the background alpha is composited over, the precision and preprocess params."""

    KIND: ClassVar[str] = "grid"

    grid: int
    native_grid: int
    pooling: str = ""
    array_layout: Literal["tokens", "chw"]
    array_shape: str = ""
    split: str
    images: str
    key_rule: Literal["image_id", "stem"]
    background: tuple[int, int, int]
    alpha: str = ""
    precision: str
    host_path: str = ""
    preprocess: str = "exact"   # the stage's preprocess param (exact | fast | gpu_decode)


@dataclass(frozen=True)
class CropSettings(_Record):
    """How a segment becomes a crop (see :mod:`featcache.stages.extract_siglip`); stored as
    ``crop`` in its provenance."""

    KIND: ClassVar[str] = "crop"

    bg_alpha: float
    pad_ratio: float
    fill: tuple[int, int, int]
    min_crop: int


@dataclass(frozen=True, kw_only=True)
class SiglipProvenance(EncodedProvenance):
    """``extract_siglip``'s output: the COCO root and split, the crop settings, and in words
    the key, the embedding and how PNG colours map to segment ids."""

    KIND: ClassVar[str] = "siglip"

    coco: str
    split: str
    crop: CropSettings
    key: str = ""
    embedding: str = ""
    png_ids: str = ""


@dataclass(frozen=True, kw_only=True)
class Sam2Provenance(EncodedProvenance):
    """``extract_sam2``'s output: the SAM2 config, the image folder, what each stored key is,
    and in words which levels are raw and how the input was made (the storage dtype is
    ``storage_dtype``, as in every output)."""

    KIND: ClassVar[str] = "sam2"

    config: str
    images: str
    keys: dict[str, str] = field(default_factory=dict)
    raw_levels: str = ""
    input: str = ""
    preprocess: str = "exact"   # the stage's preprocess param (exact | fast | gpu_decode)


@dataclass(frozen=True, kw_only=True)
class EdgeProvenance(OutputProvenance):
    """``edge_maps_methodB``'s output: method and version, the SA-1B folder, the morphology
    kernel, the map sizes, the compression, and in words the edge and the resize."""

    KIND: ClassVar[str] = "edges"

    method: str
    edge_version: str
    sa1b: str
    kernel_size: int
    sizes: tuple[int, ...]
    compression: str
    edge: str = ""
    resize: str = ""


@dataclass(frozen=True, kw_only=True)
class UvIndexProvenance(OutputProvenance):
    """``build_uv_index``'s output: its method params, the geometry conventions in words, and
    per scene how its intrinsics were fitted (only scenes that were scaled or do not fit)."""

    KIND: ClassVar[str] = "uv index"

    params: dict[str, Any] = field()   # required here (field(): not the base's None default)
    conventions: str = ""
    intrinsics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class GridSource(_Record):
    """What made one scene's CLIP grids, as sample_point_feats records it: the grid output's
    facts and ``source``, the name of the split folder or ``.h5`` file it read."""

    KIND: ClassVar[str] = "grid source"

    model: str
    weights: str
    weights_id: str
    preprocessing: EncoderSpec
    grid: int
    array_layout: Literal["tokens", "chw"]
    key_rule: Literal["image_id", "stem"]
    code_version: str | None = None
    source: str

    @classmethod
    def of(cls, grids: GridProvenance, source: str) -> GridSource:
        """The source record of a grid output read from ``source``."""
        return cls(model=grids.model, weights=grids.weights, weights_id=grids.weights_id,
                   preprocessing=grids.preprocessing, grid=grids.grid,
                   array_layout=grids.array_layout, key_rule=grids.key_rule,
                   code_version=grids.code_version, source=source)


@dataclass(frozen=True, kw_only=True)
class PointFeatsProvenance(OutputProvenance):
    """``sample_point_feats``'s output: its method params, the module doc, and per scene what
    made the CLIP grids it sampled."""

    KIND: ClassVar[str] = "point features"

    params: dict[str, Any] = field()   # required here (field(): not the base's None default)
    notes: str = ""
    clip_grid: dict[str, GridSource] = field(default_factory=dict)


KINDS: dict[str, type[OutputProvenance]] = {
    "extract_clip_grid": GridProvenance, "extract_dinov2": GridProvenance,
    "extract_siglip": SiglipProvenance, "extract_sam2": Sam2Provenance,
    "edge_maps_methodB": EdgeProvenance, "build_uv_index": UvIndexProvenance,
    "sample_point_feats": PointFeatsProvenance,
}


def parse_provenance(data: Mapping[str, Any]) -> OutputProvenance:
    """A written provenance as its stage's kind (:data:`KINDS`, chosen by ``stage``)."""
    stage = data.get("stage") if isinstance(data, Mapping) else None
    if stage not in KINDS:
        raise ProvenanceError(f"provenance of stage {stage!r}: not one of {sorted(KINDS)}")
    return KINDS[stage].from_dict(data)
