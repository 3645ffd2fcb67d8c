"""Shards: the unit of work, storage, reuse and scale-out.

An output is a folder::

    <out>/index.h5            keys (N,), shard (N,) int32, row (N,) int32; attrs: provenance,
                              shards (JSON list of file names), layout = "shards"
    <out>/shards/<id>.h5      one shard: its rows, written once

Membership (:func:`plan_shards`) is content-defined: walking the job's items in order, an item
starts a new shard when a hash of its name falls in a ``1 / target`` slice (or the current shard
has grown to ``MAX_FACTOR * target`` items). Adding or removing an item therefore changes only
the shard it falls in, never the boundaries elsewhere. ``target`` comes from the shard size in
bytes and the job's bytes-per-item estimate, both fixed by params (never by the data).

A shard file (HDF5, no timestamps, byte-deterministic)::

    attrs: format, identity
    members (m,) str          the member items, in job order
    member_id (m,) str        each member's identity (method identity + the item's signature)
    failures (f, 3) str       item, error, message
    keys (n,) str             one per row (an item may give several rows, or none)
    member (n,) int32         which member made each row
    <field> (n, ...)          dense fields: every row has the same shape
    <field>/data, /offsets (n+1,), /shapes (n, ndim)   ragged fields (shapes differ, or some
                              rows lack the field: shape row of -1)

The identity of a shard hashes its members' identities and the shard format, so a shard whose
identity matches one found anywhere (scratch, the previous output, DVC's cache) is the same
bytes and is linked, never recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from featcache.engine.atomic import temp_name
from featcache.engine import rows as _rows
from featcache.engine.rows import LazyRow, StoredRow, materialize
from featcache.engine.types import Failure

FORMAT = "featcache-shard-1"
INDEX_NAME = "index.h5"
SHARDS_DIR = "shards"
MAX_FACTOR = 4          # a shard never holds more than 4x the target items
ROW_CHUNK_BYTES = 256 * 1024  # HDF5 chunk of rows: a random row read touches one chunk

Record = tuple[str, dict[str, np.ndarray]]


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def target_items(shard_mb: float, item_bytes: int) -> int:
    """Items per shard on average: ``shard_mb`` MiB over the job's bytes-per-item estimate."""
    return max(1, int(round(shard_mb * 2**20 / max(1, item_bytes))))


def is_boundary(item: str, target: int) -> bool:
    """Does ``item`` start a shard? True for a ``1 / target`` slice of item names."""
    if target <= 1:
        return True
    return int.from_bytes(hashlib.sha256(item.encode()).digest()[:8], "big") % target == 0


def plan_shards(items: Sequence[str], target: int) -> list[list[str]]:
    """Split ``items`` (in order) into content-defined shards of ``target`` items on average."""
    shards: list[list[str]] = []
    for item in items:
        if not shards or is_boundary(item, target) or len(shards[-1]) >= MAX_FACTOR * target:
            shards.append([])
        shards[-1].append(item)
    return shards


def member_identity(method_identity: str, item: str, signature: str) -> str:
    """What one item's rows depend on: the method (params, weights, code) and its inputs."""
    return _hash(f"{method_identity}\t{item}\t{signature}")


def shard_identity(member_ids: Sequence[str]) -> str:
    return _hash(FORMAT + "\n" + "\n".join(member_ids))


def shard_name(identity: str) -> str:
    return f"{identity[:32]}.h5"


def _text(values: Sequence[str]) -> np.ndarray:
    return np.asarray(list(values), dtype=object)


def _is_text(a: np.ndarray) -> bool:
    return a.dtype.kind in ("U", "S", "O")


@dataclass
class ShardContent:
    """Everything a shard file holds, in memory (rows in member order)."""

    members: list[str]
    member_ids: list[str]
    records: list[tuple[int, str, dict[str, np.ndarray]]]   # (member index, key, fields)
    failures: list[tuple[int, Failure]]                       # (member index, failure)

    @property
    def identity(self) -> str:
        return shard_identity(self.member_ids)


def write_shard(path: Path, content: ShardContent, compression: Mapping[str, Any]) -> int:
    """Write ``content`` to ``path`` (a temporary name, then ``os.replace``); returns the bytes
    of feature data written."""
    tmp = path.with_name(temp_name(path.name, str(os.getpid())))
    path.parent.mkdir(parents=True, exist_ok=True)
    text = h5py.string_dtype()
    written = 0
    try:
        with h5py.File(tmp, "w", track_order=False) as f:
            f.attrs["format"] = FORMAT
            f.attrs["identity"] = content.identity
            f.create_dataset("members", data=_text(content.members), dtype=text,
                             track_times=False)
            f.create_dataset("member_id", data=_text(content.member_ids), dtype=text,
                             track_times=False)
            rows = [[x.item, x.error, x.message] for _, x in content.failures]
            f.create_dataset("failures", data=np.asarray(rows, dtype=object).reshape(-1, 3),
                             dtype=text, track_times=False)
            f.create_dataset("failure_member", data=np.asarray(
                [m for m, _ in content.failures], np.int32), track_times=False)
            f.create_dataset("keys", data=_text([k for _, k, _ in content.records]), dtype=text,
                             track_times=False)
            f.create_dataset("member", data=np.asarray([m for m, _, _ in content.records],
                                                       np.int32), track_times=False)
            names = list(dict.fromkeys(n for _, _, fields in content.records for n in fields))
            f.attrs["fields"] = canonical_json(names)   # in the order the job made them
            for name in names:
                written += _write_field(f, name, [fields.get(name) for _, _, fields
                                                  in content.records], compression)
            f.flush()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return written


def _chunks(rows: int, row_shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    row_bytes = max(1, int(np.prod(row_shape, dtype=np.int64)) * itemsize)
    return (max(1, min(rows, 4096, ROW_CHUNK_BYTES // row_bytes)), *row_shape)


def _write_field(f: h5py.File, name: str, values: list[np.ndarray | LazyRow | None],
                 compression: Mapping[str, Any]) -> int:
    arrays = [None if v is None else v if isinstance(v, LazyRow) else np.asarray(v)
              for v in values]
    present = [a for a in arrays if a is not None]
    first = present[0]
    if _is_text(first):
        data = _text(["" if a is None else str(a) for a in arrays])
        f.create_dataset(name, data=data, dtype=h5py.string_dtype(), track_times=False)
        f[name].attrs["text"] = True
        return 0
    dense = len(present) == len(arrays) and all(a.shape == first.shape and
                                                a.dtype == first.dtype for a in present)
    if dense:
        return _write_dense(f, name, arrays, first, compression)
    arrays = [None if a is None else np.asarray(materialize(a)) for a in arrays]
    present = [a for a in arrays if a is not None]
    dtype = np.result_type(*present)
    ndim = max(a.ndim for a in present)
    shapes = np.full((len(arrays), ndim), -1, np.int64)
    offsets = np.zeros(len(arrays) + 1, np.int64)
    for i, a in enumerate(arrays):
        if a is not None:
            shapes[i, :a.ndim] = a.shape
        offsets[i + 1] = offsets[i] + (0 if a is None else a.size)
    flat = np.concatenate([a.astype(dtype, copy=False).ravel() for a in present])
    g = f.create_group(name, track_order=False)
    g.attrs["ndims"] = np.asarray([-1 if a is None else a.ndim for a in arrays], np.int64)
    g.create_dataset("data", data=flat, track_times=False,
                     chunks=(min(max(1, flat.size), ROW_CHUNK_BYTES // dtype.itemsize),)
                     if flat.size else None, **compression)
    g.create_dataset("offsets", data=offsets, track_times=False)
    g.create_dataset("shapes", data=shapes, track_times=False)
    return flat.nbytes


def _write_dense(f: h5py.File, name: str, arrays: list, first: np.ndarray | LazyRow,
                 compression: Mapping[str, Any]) -> int:
    """One dataset ``(n, *row shape)``, written ``BLOCK_BYTES`` of rows at a time (whole
    chunks when compressed; :mod:`featcache.engine.rows`): memory holds one block, never the
    whole field; the file's bytes are those of writing it at once."""
    shape, dtype = (len(arrays), *first.shape), np.dtype(first.dtype)
    size = int(np.prod(shape, dtype=np.int64))
    # contiguous unless compressed: a row is then one read at a known offset (and the
    # HDF5 view's virtual datasets read it fastest)
    kwargs = dict(compression) if len(shape) > 1 and size else {}
    chunks = _chunks(len(arrays), first.shape, dtype.itemsize) if kwargs else None
    ds = f.create_dataset(name, shape=shape, dtype=dtype, track_times=False, chunks=chunks,
                          **kwargs)
    if not size:
        return 0
    step = max(1, _rows.BLOCK_BYTES // max(1, size // len(arrays) * dtype.itemsize))
    if chunks:
        step = max(1, step // chunks[0]) * chunks[0]
    block = np.empty((min(step, len(arrays)), *first.shape), dtype)   # one buffer, reused
    for lo in range(0, len(arrays), step):
        part = block[:len(arrays[lo:lo + step])]
        for j, a in enumerate(arrays[lo:lo + step]):
            if isinstance(a, LazyRow):
                a.load_into(part[j, ...])
            else:
                part[j, ...] = a
        ds[lo:lo + len(part)] = part
    return size * dtype.itemsize


def _strings(ds: h5py.Dataset) -> list[str]:
    return [s.decode() if isinstance(s, bytes) else str(s) for s in ds[()].ravel()]


class ShardReader:
    """Read access to one shard file (the reader, reuse and verify use it)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.file = h5py.File(self.path, "r")
        self._keys: list[str] | None = None
        self._member: np.ndarray | None = None
        self._fields: list[str] | None = None

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def identity(self) -> str:
        return str(self.file.attrs["identity"])

    def members(self) -> list[str]:
        return _strings(self.file["members"])

    def member_ids(self) -> list[str]:
        return _strings(self.file["member_id"])

    def keys(self) -> list[str]:
        if self._keys is None:
            self._keys = _strings(self.file["keys"])
        return self._keys

    def member_of_rows(self) -> np.ndarray:
        if self._member is None:
            self._member = self.file["member"][()]
        return self._member

    def failures(self) -> list[Failure]:
        flat = _strings(self.file["failures"])
        return [Failure(*flat[i:i + 3]) for i in range(0, len(flat), 3)]

    def failures_of(self, member: int) -> list[Failure]:
        which = self.file["failure_member"][()]
        return [f for f, m in zip(self.failures(), which) if m == member]

    def fields(self) -> list[str]:
        """Field names in the order the job made them."""
        if self._fields is None:
            self._fields = json.loads(self.file.attrs["fields"])
        return self._fields

    def present(self, field: str) -> np.ndarray:
        """``(n,)`` bool: which rows hold ``field`` (a ragged field may be absent in some)."""
        n = len(self.file["keys"])
        if field not in self.file:
            return np.zeros(n, bool)
        obj = self.file[field]
        if isinstance(obj, h5py.Group):
            return np.asarray(obj.attrs["ndims"]) >= 0
        return np.ones(n, bool)

    def read(self, field: str, row: int) -> np.ndarray | None:
        """Row ``row`` of ``field`` (``None`` where a ragged field has no value for that row)."""
        obj = self.file[field]
        if isinstance(obj, h5py.Group):
            ndim = int(obj.attrs["ndims"][row])
            if ndim < 0:
                return None
            lo, hi = obj["offsets"][row:row + 2]
            shape = tuple(int(s) for s in obj["shapes"][row, :ndim])
            return obj["data"][lo:hi].reshape(shape)
        if obj.attrs.get("text", False):
            value = obj[row]
            return np.asarray(value.decode() if isinstance(value, bytes) else str(value))
        return np.asarray(obj[row])

    def record(self, row: int) -> dict[str, np.ndarray]:
        out = {}
        for name in self.fields():
            value = self.read(name, row)
            if value is not None:
                out[name] = value
        return out

    def records_of(self, member: int) -> Iterator[Record]:
        """The rows one member item made, in order."""
        keys = self.keys()
        for row in np.flatnonzero(self.member_of_rows() == member):
            yield keys[row], self.record(int(row))

    def lazy_records_of(self, member: int) -> Iterator[Record]:
        """:meth:`records_of` with each dense numeric field as a :class:`StoredRow`, read
        only when used (while this reader is open)."""
        keys = self.keys()
        for row in np.flatnonzero(self.member_of_rows() == member):
            fields: dict[str, Any] = {}
            for name in self.fields():
                obj = self.file[name]
                if isinstance(obj, h5py.Dataset) and not obj.attrs.get("text", False):
                    fields[name] = StoredRow(obj, int(row))
                elif (value := self.read(name, int(row))) is not None:
                    fields[name] = value
            yield keys[row], fields


def write_index(out: Path, shards: Sequence[tuple[str, list[str]]],
                provenance: Mapping[str, Any]) -> int:
    """Write ``<out>/index.h5`` from ``(shard file name, row keys)`` pairs; returns the rows.
    Raises ``RuntimeError`` if a key appears twice (two items claiming one output name)."""
    keys, shard_col, row_col, seen = [], [], [], set()
    for s, (_, row_keys) in enumerate(shards):
        for r, key in enumerate(row_keys):
            if key in seen:
                raise RuntimeError(f"duplicate output key {key!r} in {out}")
            seen.add(key)
            keys.append(key)
            shard_col.append(s)
            row_col.append(r)
    tmp = out / temp_name(INDEX_NAME, str(os.getpid()))
    with h5py.File(tmp, "w", track_order=False) as f:
        f.attrs["layout"] = "shards"
        f.attrs["format"] = FORMAT
        f.attrs["provenance"] = canonical_json(provenance)
        f.attrs["shards"] = canonical_json([name for name, _ in shards])
        for key, value in provenance.items():
            if isinstance(value, (str, int, float, bool)):
                f.attrs[key] = value
        f.create_dataset("keys", data=_text(keys), dtype=h5py.string_dtype(),
                         track_times=False)
        f.create_dataset("shard", data=np.asarray(shard_col, np.int32), track_times=False)
        f.create_dataset("row", data=np.asarray(row_col, np.int32), track_times=False)
    os.replace(tmp, out / INDEX_NAME)
    return len(keys)


def read_index(out: str | Path) -> tuple[list[str], np.ndarray, np.ndarray, list[str],
                                          dict[str, Any]]:
    """``(keys, shard, row, shard file names, provenance)`` of a sharded output."""
    with h5py.File(Path(out) / INDEX_NAME, "r") as f:
        return (_strings(f["keys"]), f["shard"][()], f["row"][()],
                json.loads(f.attrs["shards"]), json.loads(f.attrs["provenance"]))
