"""Interchangeable output writers: HDF5 (per key or packed), NPY files + TSV index, NPZ per item.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from featcache.atomic import save_npz, write_text

Arrays = Mapping[str, Sequence[np.ndarray] | np.ndarray]

_FLOAT_DTYPES = {"fp16": np.float16, "fp32": np.float32}
PACKED_CHUNK_BYTES = 256 * 1024  # a chunk of rows for random row reads in training


@dataclass(frozen=True)
class WriterOptions:
    """How arrays are stored. ``dtype`` casts floating fields (``None`` keeps them)."""

    dtype: Literal["fp16", "fp32"] | None = None
    compression: Literal["none", "lzf", "gzip"] = "none"
    suffix: str = ""


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


def _h5_compression(options: WriterOptions) -> dict[str, Any]:
    if options.compression == "none":
        return {}
    if options.compression == "gzip":
        return {"compression": "gzip", "compression_opts": 4, "shuffle": True}
    return {"compression": "lzf"}


def _open_h5(path: Path, provenance: Mapping[str, Any]):
    import h5py

    f = h5py.File(path, "w", track_order=False)
    f.attrs["provenance"] = provenance_json(provenance)
    for key, value in provenance.items():
        if isinstance(value, (str, int, float, bool)):
            f.attrs[key] = value
        elif value is not None:  # nested values as JSON strings, e.g. attrs["preprocessing"]
            f.attrs[key] = provenance_json(value)
    return f


class Hdf5Writer(Writer):
    """One HDF5 file, one dataset per key and field, named ``{key}_{field}``."""

    name = "hdf5"

    def __init__(self, path: str | Path, *, provenance: Mapping[str, Any],
                 options: WriterOptions = WriterOptions()) -> None:
        super().__init__(path, provenance=provenance, options=options)
        self._file = _open_h5(self.path, self.provenance)

    def write(self, keys: Sequence[str], arrays: Arrays) -> None:
        comp = _h5_compression(self.options)
        for i, key in enumerate(keys):
            for field, values in arrays.items():
                data = cast(values[i], self.options.dtype)
                chunks = data.shape if comp and data.ndim else None
                self._file.create_dataset(f"{key}_{field}", data=data, track_times=False,
                                          chunks=chunks, **(comp if data.ndim else {}))

    def close(self) -> None:
        self._file.close()


class PackedHdf5Writer(Hdf5Writer):
    """One HDF5 file, one ``(N, ...)`` dataset per field plus ``keys (N,)``; row i is keys[i]."""

    name = "hdf5_packed"

    def __init__(self, path: str | Path, *, provenance: Mapping[str, Any],
                 options: WriterOptions = WriterOptions()) -> None:
        super().__init__(path, provenance=provenance, options=options)
        self._rows = 0

    def _dataset(self, name: str, row_shape: tuple[int, ...], dtype: Any):
        import h5py

        if name in self._file:
            return self._file[name]
        row_bytes = max(1, int(np.prod(row_shape)) * np.dtype(dtype).itemsize) \
            if dtype != h5py.string_dtype() else 64
        chunk_rows = max(1, min(4096, PACKED_CHUNK_BYTES // row_bytes))
        return self._file.create_dataset(
            name, shape=(0, *row_shape), maxshape=(None, *row_shape), dtype=dtype,
            chunks=(chunk_rows, *row_shape), track_times=False, **_h5_compression(self.options))

    def write(self, keys: Sequence[str], arrays: Arrays) -> None:
        import h5py

        n = len(keys)
        if n == 0:
            return
        columns = {"keys": (np.asarray(list(keys), dtype=object), h5py.string_dtype())}
        for field, values in arrays.items():
            data = cast(np.stack([np.asarray(v) for v in values]), self.options.dtype)
            columns[field] = (data, data.dtype)
        for name, (data, dtype) in columns.items():
            ds = self._dataset(name, tuple(data.shape[1:]), dtype)
            if ds.shape[0] != self._rows:
                raise ValueError(f"packed field {name!r} is missing rows: every write must "
                                 "carry the same fields")
            ds.resize(self._rows + n, axis=0)
            ds[self._rows:self._rows + n] = data
        self._rows += n

    def close(self) -> None:
        import h5py

        if "keys" not in self._file:
            self._file.create_dataset("keys", shape=(0,), dtype=h5py.string_dtype(),
                                      track_times=False)
        super().close()


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
    """A folder: one ``{key}{suffix}.npz`` per key holding every field, and ``provenance.json``."""

    name = "npz"
    is_dir = True

    def __init__(self, path: str | Path, *, provenance: Mapping[str, Any],
                 options: WriterOptions = WriterOptions()) -> None:
        super().__init__(path, provenance=provenance, options=options)
        self.provenance["suffix"] = options.suffix
        self.path.mkdir(parents=True, exist_ok=True)

    def write(self, keys: Sequence[str], arrays: Arrays) -> None:
        for i, key in enumerate(keys):
            record = {field: cast(values[i], self.options.dtype)
                      for field, values in arrays.items()}
            save_npz(self.path / f"{key}{self.options.suffix}.npz", record,
                     compress=self.options.compression != "none")

    def close(self) -> None:
        write_text(self.path / "provenance.json",
                   json.dumps(self.provenance, sort_keys=True, indent=2, default=str) + "\n")


WRITERS: dict[str, type[Writer]] = {
    w.name: w for w in (Hdf5Writer, PackedHdf5Writer, NpyWriter, NpzWriter)}


def get_writer(name: str) -> type[Writer]:
    """The writer class called ``name``; raises ``KeyError`` listing the known names."""
    try:
        return WRITERS[name]
    except KeyError:
        raise KeyError(f"unknown writer {name!r}; known writers: {', '.join(WRITERS)}") from None
