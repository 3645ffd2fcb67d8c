"""A shard's rows held outside memory while it is built and written.

A shard holds ~``shard_mb`` MiB of rows (up to ``MAX_FACTOR`` times that, see
:mod:`featcache.engine.shards`). Kept in memory until the shard is written, they made the main
process grow with the dataset up to that size (measured: ~0.7 MB of RSS per 302 KB CLIP grid,
with the stacked copy the write made). So a shard builder keeps at most :data:`SPILL_BYTES` of
rows in memory and appends the rest to an unlinked temporary file in the scratch area
(:class:`RowSpill`); rows of an earlier shard are read when written, not before
(:class:`StoredRow`); and a dense field is written :data:`BLOCK_BYTES` of rows at a time. The
shard file's bytes are the same either way.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from featcache.engine.writers import cast

SPILL_BYTES = 8 << 20       # rows of a shard being built kept in memory; the rest go to a file
BLOCK_BYTES = 8 << 20       # rows stacked per write of a dense field
MIN_SPILL_BYTES = 1024      # smaller arrays stay in memory (a reference would cost as much)


class LazyRow:
    """One row of a field, read by :meth:`load` when the shard is written."""

    __slots__ = ("dtype", "shape")

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)

    def load(self) -> np.ndarray:
        raise NotImplementedError

    def load_into(self, out: np.ndarray) -> None:
        """Read the row into ``out`` (of its shape and dtype): no new buffer per row."""
        out[...] = self.load()


class SpilledRow(LazyRow):
    """A row in a :class:`RowSpill`'s file (already in the storage dtype)."""

    __slots__ = ("fd", "offset")

    def __init__(self, fd: int, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> None:
        super().__init__(shape, dtype)
        self.fd, self.offset = fd, offset

    def load(self) -> np.ndarray:
        out = np.empty(self.shape, self.dtype)
        self.load_into(out)
        return out

    def load_into(self, out: np.ndarray) -> None:
        view = memoryview(out.reshape(-1).view(np.uint8))
        done = 0
        while done < len(view):
            got = os.preadv(self.fd, [view[done:]], self.offset + done)
            if not got:
                raise OSError(f"spilled row at {self.offset}: read {done} of {len(view)} bytes")
            done += got


class StoredRow(LazyRow):
    """Row ``row`` of a dense dataset of an open (earlier) shard file."""

    __slots__ = ("dataset", "row")

    def __init__(self, dataset: Any, row: int) -> None:
        super().__init__(dataset.shape[1:], dataset.dtype)
        self.dataset, self.row = dataset, row

    def load(self) -> np.ndarray:
        return np.asarray(self.dataset[self.row])

    def load_into(self, out: np.ndarray) -> None:
        self.dataset.read_direct(out, np.s_[self.row])


def materialize(value: Any) -> Any:
    """``value`` itself, or the array a :class:`LazyRow` stands for."""
    return value.load() if isinstance(value, LazyRow) else value


class RowSpill:
    """Keeps one shard's rows in memory up to ``budget`` bytes; :meth:`keep` moves every
    further array (cast to the storage ``dtype``) into an unlinked temporary file in
    ``folder`` and returns a :class:`SpilledRow` for it. Not thread-safe: one thread keeps
    rows; loads may come from another once keeping is over. :meth:`close` frees the file."""

    def __init__(self, folder: Path, dtype: str | None, budget: int | None = None) -> None:
        self.folder, self.dtype = folder, dtype
        self.budget = SPILL_BYTES if budget is None else budget
        self.held = 0
        self.offset = 0
        self.fd: int | None = None

    def keep(self, fields: dict[str, Any], copy: bool = False) -> dict[str, Any]:
        """``fields`` with every array past the budget spilled; ``copy``: the arrays kept in
        memory are copies (the caller reuses the buffers behind them)."""
        out = {}
        for name, value in fields.items():
            a = np.asarray(value)
            if (a.dtype.kind in "USOV" or a.nbytes < MIN_SPILL_BYTES
                    or self.held + a.nbytes <= self.budget):
                self.held += a.nbytes
                out[name] = a.copy() if copy and isinstance(value, np.ndarray) else value
            else:
                out[name] = self._spill(cast(a, self.dtype))
        return out

    def _spill(self, a: np.ndarray) -> SpilledRow:
        if not a.flags.c_contiguous:   # (np.ascontiguousarray would make a 0-d array 1-d)
            a = a.copy(order="C")
        if self.fd is None:
            with tempfile.TemporaryFile(dir=self.folder, prefix=".rows-") as f:
                self.fd = os.dup(f.fileno())   # the file has no name: nothing to clean up
        view = memoryview(a.reshape(-1).view(np.uint8))
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], self.offset + done)
        row = SpilledRow(self.fd, self.offset, a.shape, a.dtype)
        self.offset += a.nbytes
        return row

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
