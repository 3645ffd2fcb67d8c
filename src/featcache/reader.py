"""The training-side reader: every layout featcache writes, as one read-only mapping.

::

    feats = featcache.open_features("data/features/clip_grid/coco_val2017.h5")
    grid = feats[139]              # np.ndarray (196, 768) float16: dataset "139_grids"
    pooled = featcache.open_features(path, field="global")["139"]

Layouts (detected from the path; the HDF5 ``layout`` attribute decides between the two HDF5
kinds):

- ``shards`` (every stage's default): a folder with ``index.h5`` and ``shards/*.h5`` (see
  :mod:`featcache.engine.shards`); default field ``grids`` or ``embeddings`` if stored, else
  an item is the dict of its fields (like ``npz``). Shard files are opened on first read, once
  per process;

- ``hdf5``: one dataset per key and field named ``{key}_{field}``; default field ``grids``
  (or the only field in the file);
- ``hdf5_packed``: ``keys (N,)`` plus ``(N, ...)`` datasets, row ``i`` belongs to ``keys[i]``;
  default field: ``grids`` if present, else the only floating-point dataset (e.g. siglip's
  ``embeddings``);
- ``npy``: a folder with ``index.tsv`` (``key``, ``field``, ``file``); default field: the one
  stored as ``{key}.npy``;
- ``npz``: a folder of ``{key}{suffix}.npz`` (sub-folders allowed: the key keeps the relative
  path, e.g. ``scene0000_00/frame_3``); without ``field`` an item is the dict of its arrays.
  ``suffix`` comes from ``provenance.json`` if recorded, else it is ``_features`` or ``_edges``
  when every file name ends with it (extract_sam2, edge_maps_methodB), else empty; pass
  ``suffix=`` to override.

Keys are strings; an ``int`` key is looked up as its decimal string (COCO image ids). A missing
key raises ``KeyError`` naming the key and the file: never a substitute.

Worker safety: nothing is opened by :func:`open_features` beyond a short look at the layout.
HDF5 files are opened on first read, once per process (the process id is checked on every
read), so a mapping or :class:`FeatureDataset` created before a DataLoader forks its workers
never shares an h5py handle across processes; pickling drops the handle.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from featcache.engine.shards import SHARDS_DIR, ShardReader, read_index
from featcache.provenance import OutputProvenance

_HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
KNOWN_NPZ_SUFFIXES = ("_features", "_edges")  # extract_sam2, edge_maps_methodB


class FeatureStore(Mapping):
    """Read-only ``key -> np.ndarray`` (or ``dict`` for whole NPZ items); see the module doc."""

    def __init__(self, path: str | Path, field: str | None = None,
                 suffix: str | None = None, layout: str | None = None) -> None:
        self.path = Path(path)
        self.layout = layout or detect_layout(self.path)
        self._pid: int | None = None
        self._file: Any = None
        self._stale: list[Any] = []    # handles inherited through fork: never closed here
        self._names = _h5_names(self.path) if self.layout.startswith("hdf5") else []
        self._shards: dict[int, Any] = {}   # this process's open shard files (layout shards)
        self._shard_files: list[str] = []
        self.provenance: dict[str, Any] = self._read_provenance()
        self.field = self._default_field(field)
        self._suffix = self._npz_suffix(suffix) if self.layout == "npz" else ""
        self._index = self._build_index()

    # --- Mapping -------------------------------------------------------------------------
    def __getitem__(self, key: str | int) -> Any:
        key = str(key)
        if key not in self._index:
            raise KeyError(f"{key!r} is not in {self.path} (layout {self.layout}, field "
                           f"{self.field!r}, {len(self._index)} keys)")
        return self._read(key, self._index[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: object) -> bool:
        return str(key) in self._index

    def __repr__(self) -> str:
        return (f"FeatureStore({str(self.path)!r}, layout={self.layout!r}, "
                f"field={self.field!r}, {len(self)} keys)")

    # --- handles -------------------------------------------------------------------------
    def _shard(self, index: int) -> Any:
        """This process's reader of shard ``index`` (reopened after a fork)."""

        if self._pid != os.getpid():
            self._stale.append(self._shards)  # the parent's handles: never closed here
            self._shards, self._pid = {}, os.getpid()
        if index not in self._shards:
            self._shards[index] = ShardReader(self.path / SHARDS_DIR / self._shard_files[index])
        return self._shards[index]

    def _h5(self) -> Any:
        """This process's read-only h5py handle (reopened after a fork)."""

        if self._file is None or self._pid != os.getpid():
            if self._file is not None:
                self._stale.append(self._file)  # the parent's: closing it here could hurt it
            self._file, self._pid = h5py.File(self.path, "r"), os.getpid()
        return self._file

    def close(self) -> None:
        """Close this process's HDF5 handle (reads reopen it)."""
        if self._pid == os.getpid():
            if self._file is not None:
                self._file.close()
            for shard in self._shards.values():
                shard.close()
        self._file, self._shards = None, {}

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_file": None, "_pid": None, "_stale": [], "_shards": {}}

    # --- layouts -------------------------------------------------------------------------
    def _read_provenance(self) -> dict[str, Any]:
        if self.layout in ("hdf5", "hdf5_packed"):
            return json.loads(_h5_attr(self.path, "provenance") or "{}")
        if self.layout == "shards":
            return json.loads(_h5_attr(self.path / "index.h5", "provenance") or "{}")
        sidecar = self.path / "provenance.json"
        return json.loads(sidecar.read_text()) if sidecar.is_file() else {}

    def _default_field(self, field: str | None) -> str | None:
        if field is not None or self.layout == "npz":
            return field
        fields = self.fields()
        if self.layout == "shards":
            return next((f for f in ("grids", "embeddings") if f in fields), None)
        if self.layout != "npy" and "grids" in fields:
            return "grids"
        if self.layout == "npy" and fields:
            return fields[0]
        if self.layout == "hdf5_packed":
            floats = [f for f in fields if self._packed_is_float(f)]
            fields = floats if len(floats) == 1 else fields
        if len(fields) != 1:
            raise ValueError(f"{self.path} holds fields {fields}; pass field=<one of them>")
        return fields[0]

    def fields(self) -> list[str]:
        """Field names stored in this file or folder (NPZ: none, items are whole dicts)."""
        if self.layout == "hdf5":
            return sorted({n.rsplit("_", 1)[1] for n in self._names if "_" in n})
        if self.layout == "hdf5_packed":
            return sorted(n for n in self._names if n != "keys")
        if self.layout == "npy":
            return list(dict.fromkeys(row[1] for row in _read_index(self.path)))
        if self.layout == "shards":

            names = json.loads(_h5_attr(self.path / "index.h5", "shards") or "[]")
            if not names:
                return []
            with ShardReader(self.path / SHARDS_DIR / names[0]) as r:
                return r.fields()
        return []

    def _packed_is_float(self, name: str) -> bool:

        with h5py.File(self.path, "r") as f:
            return np.issubdtype(f[name].dtype, np.floating)

    def _build_index(self) -> dict[str, Any]:
        """key -> where it is (dataset name, row, file)."""
        if self.layout == "hdf5":
            tail = f"_{self.field}"
            return {n[:-len(tail)]: n for n in self._names if n.endswith(tail)}
        if self.layout == "hdf5_packed":
            return _packed_rows(self.path, self.field)
        if self.layout == "npy":
            return {k: self.path / f for k, fld, f in _read_index(self.path) if fld == self.field}
        if self.layout == "shards":

            keys, shard, row, self._shard_files, _ = read_index(self.path)
            index = {k: (int(s), int(r)) for k, s, r in zip(keys, shard, row)}
            if self.field is None:
                return index
            present = {}   # which keys hold this field (a short look; no handle is kept)
            for s in sorted(set(shard.tolist())):
                with ShardReader(self.path / SHARDS_DIR / self._shard_files[s]) as r:
                    present[s] = r.present(self.field)
            return {k: (s, r) for k, (s, r) in index.items() if present[s][r]}
        return {_npz_key(p, self.path, self._suffix): p for p in _npz_files(self.path)}

    def _npz_suffix(self, suffix: str | None) -> str:
        if suffix is not None:
            return suffix
        recorded = OutputProvenance.from_dict(self.provenance).suffix
        if recorded is not None:
            return recorded
        stems = [p.name[:-len(".npz")] for p in _npz_files(self.path)]
        known = [s for s in KNOWN_NPZ_SUFFIXES if all(stem.endswith(s) for stem in stems)]
        return known[0] if known else ""

    def _read(self, key: str, where: Any) -> Any:
        if self.layout == "hdf5":
            return self._h5()[where][()]
        if self.layout == "hdf5_packed":
            return self._h5()[self.field][where]
        if self.layout == "npy":
            return np.load(where, allow_pickle=False)
        if self.layout == "shards":
            shard = self._shard(where[0])
            if self.field is None:
                return shard.record(where[1])
            value = shard.read(self.field, where[1])
            if value is None:
                raise KeyError(f"{key!r} in {self.path} has no field {self.field!r}")
            return value
        with np.load(where, allow_pickle=False) as z:
            if self.field is None:
                return {name: z[name] for name in z.files}
            if self.field not in z.files:
                raise KeyError(f"{key!r} in {where} has no field {self.field!r} ({z.files})")
            return z[self.field]


def open_features(path: str | Path, field: str | None = None,
                  suffix: str | None = None, layout: str | None = None) -> FeatureStore:
    """Open any featcache output (sharded folder, HDF5 file, NPY or NPZ folder) as a read-only
    mapping ``key -> np.ndarray`` in the stored dtype; see the module docstring for
    ``field``/``suffix``. ``layout`` reads a sharded folder's per-item files (``npy``/``npz``)
    instead of its shards. Raises ``FileNotFoundError`` for a missing path, ``ValueError`` for
    an unknown layout."""
    return FeatureStore(path, field=field, suffix=suffix, layout=layout)


def detect_layout(path: Path) -> str:
    """``shards`` | ``hdf5`` | ``hdf5_packed`` | ``npy`` | ``npz`` for an output path."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such feature file or folder")
    if path.is_file():
        if path.suffix.lower() not in _HDF5_SUFFIXES:
            raise ValueError(f"{path}: not a featcache output (expected .h5, or a folder)")
        layout = _h5_attr(path, "layout")
        if layout in ("hdf5", "hdf5_packed"):
            return layout
        return "hdf5_packed" if "keys" in _h5_names(path) else "hdf5"
    if (path / "index.h5").is_file():
        return "shards"
    if (path / "index.tsv").is_file():
        return "npy"
    if any(_npz_files(path)):
        return "npz"
    raise ValueError(f"{path}: a folder with no index.h5 (shards), index.tsv (npy) or .npz "
                     "files")


def _h5_attr(path: Path, name: str) -> str | None:

    with h5py.File(path, "r") as f:
        value = f.attrs.get(name)
    return value.decode() if isinstance(value, bytes) else value


def _h5_names(path: Path) -> list[str]:

    with h5py.File(path, "r") as f:
        return list(f.keys())


def _packed_rows(path: Path, field: str) -> dict[str, int]:

    with h5py.File(path, "r") as f:
        if field not in f:
            raise ValueError(f"{path} has no field {field!r}; fields: {sorted(f.keys())}")
        keys = [k.decode() if isinstance(k, bytes) else str(k) for k in f["keys"][()]]
    rows = {k: i for i, k in enumerate(keys)}
    if len(rows) != len(keys):
        raise ValueError(f"{path}: the keys dataset repeats keys")
    return rows


def _read_index(folder: Path) -> list[tuple[str, str, str]]:
    lines = (folder / "index.tsv").read_text().splitlines()
    return [tuple(line.split("\t")) for line in lines[1:] if line]  # type: ignore[misc]


def _npz_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.npz") if not p.name.startswith("."))


def _npz_key(path: Path, folder: Path, suffix: str) -> str:
    rel = path.relative_to(folder).as_posix()[:-len(".npz")]
    return rel[:-len(suffix)] if suffix and rel.endswith(suffix) else rel


class FeatureDataset(torch.utils.data.Dataset):
    """``torch`` Dataset over one output: item ``i`` is ``(key, torch.Tensor)`` in the stored
    dtype (``dtype=`` casts, e.g. ``torch.float32``). ``keys`` (default: all, sorted) fixes
    the order; a key that is not stored raises ``KeyError`` here, not in a worker."""

    def __init__(self, path: str | Path, keys: Sequence[str | int] | None = None,
                 field: str | None = None, dtype: torch.dtype | None = None) -> None:
        self.store = open_features(path, field=field)
        if self.store.layout in ("npz", "shards") and self.store.field is None:
            raise ValueError(f"{path}: NPZ items hold several arrays; pass field=<name>")
        self.keys = sorted(self.store) if keys is None else [str(k) for k in keys]
        missing = [k for k in self.keys if k not in self.store]
        if missing:
            raise KeyError(f"{len(missing)} keys not in {path}, e.g. {missing[:3]}")
        self.dtype = dtype

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> tuple[str, torch.Tensor]:
        key = self.keys[i]
        tensor = torch.from_numpy(np.ascontiguousarray(self.store[key]))
        return key, tensor if self.dtype is None else tensor.to(self.dtype)
