"""The seeds' layouts, as views of a sharded output.

- ``shards``: nothing more (the default, and the scalable one);
- ``hdf5``: one file beside the output folder (``<out>.h5``) with one dataset per key and field,
  ``{key}_{field}`` (the FSGR seed's reader opens it unchanged). Each dataset is an HDF5
  *virtual dataset* that maps one row of a shard file: nothing is copied, and the file is a few
  hundred bytes per key;
- ``hdf5_packed``: one file beside the output folder with ``keys (N,)`` and one ``(N, ...)``
  virtual dataset per field, concatenating the shards' rows (also no copy);
- ``npy``: per-item ``{key}.npy`` (first field) and ``{key}_{field}.npy`` files plus
  ``index.tsv`` inside the output folder (the seeds' per-segment files);
- ``npz``: one ``{key}{suffix}.npz`` per key inside the output folder.

A view returns the rows it refused (:class:`~featcache.engine.types.Failure`, for
``failures.tsv``): a per-item view refuses, one key at a time, a key that cannot be a file name
or whose file another key would also write (:func:`featcache.engine.writers.plan_files`); the
key's row stays in the shards.

The per-item layouts are copies (the shards stay, so a later run can reuse them): twice the
disk, and one file per item for DVC to track. Pick them only for a tool that reads those files.
Virtual datasets name their source files relative to the view file, so an output folder and its
view move together (DVC checkout, ``dvc pull``, a copy to another machine).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from featcache.engine.atomic import atomic_path
from featcache.engine.shards import SHARDS_DIR, ShardReader, canonical_json, read_index
from featcache.engine.types import Failure
from featcache.engine.writers import NpyWriter, NpzWriter, WriterOptions, plan_files

View = Callable[[Path, Path | None, Mapping[str, Any], WriterOptions], list[Failure]]
VIEW_SUFFIX = ".h5"


def _attrs(f: h5py.File, provenance: Mapping[str, Any], layout: str) -> None:
    prov = dict(provenance, layout=layout)
    f.attrs["provenance"] = canonical_json(prov)
    for key, value in prov.items():
        if isinstance(value, (str, int, float, bool)):
            f.attrs[key] = value
        elif value is not None:
            f.attrs[key] = canonical_json(value)


class _Layout(h5py.VirtualLayout):
    """A virtual layout whose dataset carries no timestamps (byte-deterministic views)."""

    def _get_dcpl(self, dst_filename):  # noqa: ANN001 - h5py's own hook
        dcpl = super()._get_dcpl(dst_filename)
        dcpl.set_obj_track_times(False)
        return dcpl


def _dense_fields(shard: h5py.File) -> dict[str, h5py.Dataset]:
    fixed = {"members", "member_id", "failures", "failure_member", "keys", "member"}
    return {n: o for n, o in shard.items() if n not in fixed and isinstance(o, h5py.Dataset)
            and not o.attrs.get("text", False)}


def _shard_files(out: Path) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    keys, shard, row, names, _ = read_index(out)
    return keys, shard, row, names


def write_hdf5_view(out: Path, path: Path | None, provenance: Mapping[str, Any],
                    options: WriterOptions) -> list[Failure]:
    """``{key}_{field}`` virtual datasets, one row of a shard each (see the module doc)."""
    path = path or out.with_suffix(VIEW_SUFFIX)
    keys, shard, row, names = _shard_files(out)
    rel = os.path.relpath(out, path.parent)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w", track_order=False) as f:
            _attrs(f, provenance, "hdf5")
            sources: dict[int, dict[str, tuple[str, tuple, Any]]] = {}
            for s, name in enumerate(names):
                with h5py.File(out / SHARDS_DIR / name, "r") as sf:
                    sources[s] = {n: (f"{rel}/{SHARDS_DIR}/{name}", d.shape, d.dtype)
                                  for n, d in _dense_fields(sf).items()}
            for key, s, r in zip(keys, shard, row):
                for field, (file, shape, dtype) in sources[int(s)].items():
                    layout = _Layout(shape=shape[1:], dtype=dtype)
                    layout[...] = h5py.VirtualSource(file, field, shape=shape)[int(r)]
                    f.create_virtual_dataset(f"{key}_{field}", layout)
    return []


def write_packed_view(out: Path, path: Path | None, provenance: Mapping[str, Any],
                      options: WriterOptions) -> list[Failure]:
    """``keys (N,)`` and per field one ``(N, ...)`` virtual dataset over every shard."""
    path = path or out.with_suffix(VIEW_SUFFIX)
    keys, _, _, names = _shard_files(out)
    rel = os.path.relpath(out, path.parent)
    parts: dict[str, list[tuple[str, tuple, Any]]] = {}
    for name in names:
        with h5py.File(out / SHARDS_DIR / name, "r") as sf:
            for field, d in _dense_fields(sf).items():
                parts.setdefault(field, []).append((f"{rel}/{SHARDS_DIR}/{name}", d.shape,
                                                    d.dtype))
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w", track_order=False) as f:
            _attrs(f, provenance, "hdf5_packed")
            f.create_dataset("keys", data=np.asarray(keys, dtype=object),
                             dtype=h5py.string_dtype(), track_times=False)
            for field, sources in parts.items():
                if sum(s[1][0] for s in sources) != len(keys):
                    continue   # a field only some shards have: read it through the shards
                shape = (len(keys), *sources[0][1][1:])
                layout = _Layout(shape=shape, dtype=sources[0][2])
                start = 0
                for file, s_shape, _ in sources:
                    if s_shape[0]:
                        layout[start:start + s_shape[0]] = h5py.VirtualSource(
                            file, field, shape=s_shape)
                    start += s_shape[0]
                f.create_virtual_dataset(field, layout)
    return []


def _export(writer_cls: type, out: Path, provenance: Mapping[str, Any],
            options: WriterOptions) -> list[Failure]:
    """Write every row of ``out``'s shards as per-item files into ``out``, except the keys
    :func:`plan_files` refuses; returns one failure row per refused key."""
    _, _, _, names = _shard_files(out)
    entries = []
    for name in names:
        with ShardReader(out / SHARDS_DIR / name) as r:
            present = {f: r.present(f) for f in r.fields()}
            entries += [(key, [f for f in r.fields() if present[f][row]])
                        for row, key in enumerate(r.keys())]
    refused = plan_files(writer_cls, options, entries)
    writer = writer_cls(out, provenance=provenance, options=options)
    with writer:
        for name in names:
            with ShardReader(out / SHARDS_DIR / name) as r:
                for row, key in enumerate(r.keys()):
                    if key not in refused:
                        record = r.record(row)
                        writer.write([key], {n: [v] for n, v in record.items()})
    return [Failure(key, e.code, f"not written as a {writer_cls.name} file (still in the "
                                 f"shards): {e}") for key, e in refused.items()]


def write_npy_view(out: Path, path: Path | None, provenance: Mapping[str, Any],
                   options: WriterOptions) -> list[Failure]:
    return _export(NpyWriter, out, provenance, options)


def write_npz_view(out: Path, path: Path | None, provenance: Mapping[str, Any],
                   options: WriterOptions) -> list[Failure]:
    return _export(NpzWriter, out, provenance, options)


VIEWS: dict[str, View | None] = {"shards": None, "hdf5": write_hdf5_view,
                                 "hdf5_packed": write_packed_view, "npy": write_npy_view,
                                 "npz": write_npz_view}


def get_view(name: str) -> View | None:
    """The view writer of layout ``name`` (None for plain shards); ``KeyError`` names the
    known layouts."""
    try:
        return VIEWS[name]
    except KeyError:
        raise KeyError(f"unknown layout {name!r}; known layouts: {', '.join(VIEWS)}") from None
