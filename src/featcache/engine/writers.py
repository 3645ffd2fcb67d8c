"""Per-item writers (NPY files + TSV index, NPZ per item) for the seeds' per-item layouts.

The engine writes shards (:mod:`featcache.engine.shards`); these writers make the per-item
views of them (:mod:`featcache.engine.views`).

Every writer has the same constructor shape and protocol, is a context manager, and is chosen by
name from :data:`WRITERS` (:func:`get_writer` raises on an unknown name)::

    with get_writer("hdf5")(path, provenance=prov, options=WriterOptions(dtype="fp16")) as w:
        w.write(keys, {"grids": grids, "global": pooled})   # arrays[field][i] belongs to keys[i]

Outputs are byte-deterministic for the same inputs: HDF5 objects are created without
timestamps (``track_times=False``) in a fixed order, NPZ entries carry a fixed zip date.
Provenance (a JSON-able dict) goes into HDF5 file attributes or a ``provenance.json`` sidecar.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from featcache.atomic import save_npz, write_text

Arrays = Mapping[str, Sequence[np.ndarray] | np.ndarray]

_FLOAT_DTYPES = {"fp16": np.float16, "fp32": np.float32}


@dataclass(frozen=True)
class WriterOptions:
    """How arrays are stored. ``dtype`` casts floating fields (``None`` keeps them).

    ``suffix`` ends the per-item NPZ file names (``{key}{suffix}.npz``); ``aliases`` maps an
    extra NPZ entry to the field it copies (``{"IMAGE_EMB_S16": "P4_S16"}``): a seed's
    compatibility key, written into the per-item files only, never stored twice in the shards.
    """

    dtype: Literal["fp16", "fp32"] | None = None
    compression: Literal["none", "lzf", "gzip"] = "none"
    suffix: str = ""
    aliases: Mapping[str, str] = field(default_factory=dict)


def cast(array: np.ndarray, dtype: str | None) -> np.ndarray:
    """Cast a floating array to the storage dtype; other arrays are returned unchanged."""
    array = np.asarray(array)
    if dtype is None or not np.issubdtype(array.dtype, np.floating):
        return array
    return array.astype(_FLOAT_DTYPES[dtype], copy=False)


def provenance_json(provenance: Mapping[str, Any]) -> str:
    """Provenance as canonical JSON (sorted keys), identical for identical provenance."""
    return json.dumps(provenance, sort_keys=True, separators=(",", ":"), default=str)


class Writer:
    """Base class: ``write(keys, arrays)`` any number of times, then ``close()``."""

    is_dir: ClassVar[bool] = False

    def __init__(self, path: str | Path, *, provenance: Mapping[str, Any],
                 options: WriterOptions = WriterOptions()) -> None:
        self.path = Path(path)
        self.provenance = dict(provenance, layout=self.name, storage_dtype=options.dtype)
        self.options = options

    name: ClassVar[str] = "base"

    def write(self, keys: Sequence[str], arrays: Arrays) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def h5_compression(options: WriterOptions) -> dict[str, Any]:
    """h5py keyword arguments of ``options.compression`` (gzip gets the shuffle filter)."""
    if options.compression == "none":
        return {}
    if options.compression == "gzip":
        return {"compression": "gzip", "compression_opts": 4, "shuffle": True}
    return {"compression": "lzf"}


class NpyWriter(Writer):
    """A folder: ``{key}.npy`` for the first field, ``{key}_{field}.npy`` for the others, an
    ``index.tsv`` (``key``, ``field``, ``file``) and ``provenance.json``."""

    name = "npy"
    is_dir = True

    def __init__(self, path: str | Path, *, provenance: Mapping[str, Any],
                 options: WriterOptions = WriterOptions()) -> None:
        super().__init__(path, provenance=provenance, options=options)
        self.path.mkdir(parents=True, exist_ok=True)
        self._index: list[str] = ["key\tfield\tfile"]

    def write(self, keys: Sequence[str], arrays: Arrays) -> None:
        fields = list(arrays)
        for i, key in enumerate(keys):
            for j, field in enumerate(fields):
                name = f"{key}.npy" if j == 0 else f"{key}_{field}.npy"
                dest = self.path / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                with open(dest, "wb") as f:
                    np.lib.format.write_array(f, cast(arrays[field][i], self.options.dtype),
                                              allow_pickle=False)
                self._index.append(f"{key}\t{field}\t{name}")

    def close(self) -> None:
        write_text(self.path / "index.tsv", "\n".join(self._index) + "\n")
        write_text(self.path / "provenance.json",
                   json.dumps(self.provenance, sort_keys=True, indent=2, default=str) + "\n")


class NpzWriter(Writer):
    """A folder: one ``{key}{suffix}.npz`` per key holding every field (then each alias of
    ``options.aliases``, a copy of its source field), and ``provenance.json``."""

    name = "npz"
    is_dir = True

    def __init__(self, path: str | Path, *, provenance: Mapping[str, Any],
                 options: WriterOptions = WriterOptions()) -> None:
        super().__init__(path, provenance=provenance, options=options)
        self.provenance["suffix"] = options.suffix
        if options.aliases:
            self.provenance["aliases"] = dict(options.aliases)
        self.path.mkdir(parents=True, exist_ok=True)

    def write(self, keys: Sequence[str], arrays: Arrays) -> None:
        for i, key in enumerate(keys):
            record = {name: cast(values[i], self.options.dtype)
                      for name, values in arrays.items()}
            record.update({alias: record[source] for alias, source
                           in self.options.aliases.items() if source in record})
            save_npz(self.path / f"{key}{self.options.suffix}.npz", record,
                     compress=self.options.compression != "none")

    def close(self) -> None:
        write_text(self.path / "provenance.json",
                   json.dumps(self.provenance, sort_keys=True, indent=2, default=str) + "\n")


WRITERS: dict[str, type[Writer]] = {w.name: w for w in (NpyWriter, NpzWriter)}


def get_writer(name: str) -> type[Writer]:
    """The writer class called ``name``; raises ``KeyError`` listing the known names."""
    try:
        return WRITERS[name]
    except KeyError:
        raise KeyError(f"unknown writer {name!r}; known writers: {', '.join(WRITERS)}") from None
