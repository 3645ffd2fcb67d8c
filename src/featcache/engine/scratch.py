"""Fingerprints and the scratch area where finished chunks wait for assembly.

A run works in ``.featcache/scratch/<stage>/<output>/<fingerprint>/``, outside every DVC output
(DVC deletes a stage's outputs before running it, but not this folder). The fingerprint hashes
everything that determines the result; a re-run with the same fingerprint reuses the finished
chunks, a different one starts clean (older fingerprints of that output are removed).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from featcache.atomic import save_npz
from featcache.engine.types import Failure

SCRATCH_ROOT = Path(".featcache") / "scratch"


def fingerprint_of(parts: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of ``parts``."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def file_signature(paths: Iterable[str | Path]) -> str:
    """A cheap identity of input files: sha256 over (path, size, mtime_ns) of each file.

    Content hashing a 20 GB image set on every run would cost more than the resume saves; DVC
    already hashes the contents to decide *whether* to run.
    """
    h = hashlib.sha256()
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{p}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}\tmissing\n".encode())
    return h.hexdigest()


@lru_cache(maxsize=1)
def code_version() -> str:
    """sha256 of featcache's own source files: a code change invalidates unfinished scratch."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "out"


class Scratch:
    """The chunk store of one output under one fingerprint."""

    def __init__(self, stage: str, output: str | Path, fingerprint: str,
                 root: Path = SCRATCH_ROOT) -> None:
        self.parent = root / _safe(stage) / _safe(str(output))
        self.dir = self.parent / fingerprint[:32]

    def prepare(self) -> None:
        """Create this fingerprint's folder and drop those of other fingerprints."""
        if self.parent.is_dir():
            for other in self.parent.iterdir():
                if other != self.dir:
                    shutil.rmtree(other, ignore_errors=True)
        self.dir.mkdir(parents=True, exist_ok=True)

    def chunk_path(self, index: int) -> Path:
        return self.dir / f"chunk_{index:06d}.npz"

    def has(self, index: int) -> bool:
        return self.chunk_path(index).is_file()

    def save(self, index: int, records: list[tuple[str, dict[str, np.ndarray]]],
             failures: list[Failure]) -> None:
        """Store a finished chunk atomically: its records in order and its failures."""
        arrays: dict[str, np.ndarray] = {
            "__keys__": np.array([k for k, _ in records], dtype=str),
            "__failures__": np.array([[f.item, f.error, f.message] for f in failures],
                                     dtype=str).reshape(-1, 3),
        }
        for i, (_, fields) in enumerate(records):
            for name, value in fields.items():
                arrays[f"{i}/{name}"] = np.asarray(value)
        save_npz(self.chunk_path(index), arrays)

    def load(self, index: int) -> tuple[list[tuple[str, dict[str, np.ndarray]]], list[Failure]]:
        """Read a finished chunk back: ``(records, failures)``."""
        with np.load(self.chunk_path(index), allow_pickle=False) as z:
            keys = [str(k) for k in z["__keys__"]]
            failures = [Failure(*map(str, row)) for row in z["__failures__"]]
            fields: list[dict[str, np.ndarray]] = [{} for _ in keys]
            for name in z.files:
                if not name.startswith("__"):
                    i, field = name.split("/", 1)
                    fields[int(i)][field] = z[name]
        return list(zip(keys, fields)), failures

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        try:
            self.parent.rmdir()
        except OSError:
            pass
