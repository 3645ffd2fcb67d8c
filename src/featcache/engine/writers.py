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

Per-item file names come from keys, which come from data (file stems, ids, scene names). Every
name the filesystem allows works (unicode, spaces, leading dots, up to 255 bytes: temporary names
never add to a long one, :mod:`featcache.engine.atomic`); a key that cannot be a file name here raises
:class:`ItemNameError` for that key alone: a final name over 255 bytes, an empty, absolute or
``..`` component, a NUL byte, text that is not valid unicode, a name reserved by the output
folder (``shards/``, ``index.tsv``, ...) or, in the NPY layout, a tab, newline or other control
character (``index.tsv`` is tab-separated). :func:`plan_files` also refuses every key whose
file would be another key's (``b`` + field ``global`` and the key ``b_global`` both make
``b_global.npy``), so no item's file silently replaces another's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from featcache.engine.atomic import (
    NAME_MAX,
    atomic_path,
    name_bytes,
    save_npz,
    write_text,
)
from featcache.failures import CodedError, FailureCode

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


class ItemNameError(CodedError, ValueError):
    """One key cannot be written as a per-item file; ``code`` is its ``failures.tsv`` error
    (``bad_name``, ``name_too_long`` or ``name_collision``)."""


# top-level names of an output folder that per-item files must not take
RESERVED_NAMES = frozenset({"shards", "index.h5", "index.tsv", "provenance.json",
                            "failures.tsv", "inst2feat.tsv"})
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_file_name(rel: str, *, tsv: bool = False) -> None:
    """Raise :class:`ItemNameError` unless ``rel`` (``/``-separated, relative to the output
    folder) is a path every POSIX filesystem accepts and that stays inside the folder; with
    ``tsv`` also refuse control characters (they would break a tab-separated index)."""
    if "\x00" in rel:
        raise ItemNameError(FailureCode.BAD_NAME, f"{rel!r}: a NUL byte cannot be in a file name")
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        raise ItemNameError(FailureCode.BAD_NAME,
                            f"{rel!r}: not valid unicode (undecodable bytes in "
                            "the source name)") from None
    if tsv and _CONTROL.search(rel):
        raise ItemNameError(FailureCode.BAD_NAME,
                            f"{rel!r}: a tab, newline or other control character "
                            "would break index.tsv")
    parts = rel.split("/")
    if rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ItemNameError(FailureCode.BAD_NAME, f"{rel!r}: an empty, '.', '..' or absolute path "
                                                  "component would leave the output folder")
    if parts[0] in RESERVED_NAMES:
        raise ItemNameError(FailureCode.BAD_NAME,
                            f"{rel!r}: {parts[0]!r} is reserved in the output "
                            "folder")
    for part in parts:
        if name_bytes(part) > NAME_MAX:
            raise ItemNameError(FailureCode.NAME_TOO_LONG,
                                f"{part[:40]}...: the file name would be "
                                f"{name_bytes(part)} bytes, more than the filesystem's "
                                f"{NAME_MAX}; shorten the input's name")


def plan_files(writer: type["Writer"], options: "WriterOptions",
               entries: Sequence[tuple[str, Sequence[str]]]) -> dict[str, ItemNameError]:
    """Check every ``(key, fields)`` a per-item writer would write; returns the refused keys
    with their error. A file claimed by two keys, or a file that is another key's folder,
    refuses every key involved (which one was meant cannot be known)."""
    refused: dict[str, ItemNameError] = {}
    files: dict[str, str] = {}   # relative file -> key
    dirs: dict[str, str] = {}    # relative folder -> a key with a file below it
    claims: list[tuple[str, list[str]]] = []
    for key, fields in entries:
        try:
            names = writer.file_names(key, fields, options)
        except ItemNameError as e:
            refused[key] = e
            continue
        claims.append((key, names))
        for name in names:
            parts = name.split("/")
            for i in range(1, len(parts)):
                dirs.setdefault("/".join(parts[:i]), key)

    def clash(a: str, b: str, name: str) -> None:
        for k, other in ((a, b), (b, a)):
            refused.setdefault(k, ItemNameError(
                FailureCode.NAME_COLLISION, f"{name}: the file of {k!r} would also be the file (or "
                                            f"folder) of {other!r}; rename one of the inputs"))

    for key, names in claims:
        for name in names:
            owner = files.setdefault(name, key)
            if owner != key:
                clash(owner, key, name)
            if name in dirs and dirs[name] != key:
                clash(dirs[name], key, name)
    return refused


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

    @classmethod
    def file_names(cls, key: str, fields: Sequence[str], options: WriterOptions) -> list[str]:
        """The files (relative to the folder) one key's record with ``fields`` is written to;
        raises :class:`ItemNameError` if the key cannot be a file name (see the module doc)."""
        raise NotImplementedError

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


def write_array(dest: Path, array: np.ndarray) -> None:
    """One ``.npy`` file, atomically (a killed run leaves no half-written array)."""

    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as f:
            np.lib.format.write_array(f, array, allow_pickle=False)


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

    @classmethod
    def file_names(cls, key: str, fields: Sequence[str], options: WriterOptions) -> list[str]:
        names = [f"{key}.npy" if j == 0 else f"{key}_{field}.npy"
                 for j, field in enumerate(fields)]
        for name in names:
            check_file_name(name, tsv=True)
        return names

    def write(self, keys: Sequence[str], arrays: Arrays) -> None:
        fields = list(arrays)
        for i, key in enumerate(keys):
            names = self.file_names(key, fields, self.options)
            for field, name in zip(fields, names):
                write_array(self.path / name, cast(arrays[field][i], self.options.dtype))
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

    @classmethod
    def file_names(cls, key: str, fields: Sequence[str], options: WriterOptions) -> list[str]:
        name = f"{key}{options.suffix}.npz"
        check_file_name(name)
        return [name]

    def write(self, keys: Sequence[str], arrays: Arrays) -> None:
        for i, key in enumerate(keys):
            (file,) = self.file_names(key, list(arrays), self.options)
            record = {name: cast(values[i], self.options.dtype)
                      for name, values in arrays.items()}
            record.update({alias: record[source] for alias, source
                           in self.options.aliases.items() if source in record})
            save_npz(self.path / file, record, compress=self.options.compression != "none")

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
