"""The scratch area and fingerprints.

Shards are computed in ``.featcache/scratch/<stage>/<shard id>.h5``, outside every DVC output
(DVC deletes a stage's outputs before running it, but not this folder), and moved into the
output by rename when it is complete. A shard's file name is its identity, so a run that was
killed resumes from every shard it finished, and shards left over from other params are simply
never used again. At the end of every stage run (:func:`featcache.engine.finish_stage`) the
stage's scratch folder is emptied of what no current output can use (:func:`drop_unused`):
the shards of this run were moved into the outputs, so what is left belongs to outputs that
were renamed or removed, or to earlier params; the metrics report the scratch area's total
size (``scratch_bytes``). ``make clean-scratch`` removes all of it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SCRATCH_ROOT = Path(".featcache") / "scratch"


def fingerprint_of(parts: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of ``parts``."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def safe_name(name: str) -> str:
    """``name`` reduced to characters safe in a folder name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "out"


def scratch_dir(stage: str) -> Path:
    """The scratch folder of ``stage``."""
    return SCRATCH_ROOT / safe_name(stage)


def drop_unused(stage: str, keep: Iterable[str] = ()) -> int:
    """Remove every file in ``stage``'s scratch folder but those named in ``keep`` (shards a
    current output still needs); returns the bytes freed. Call it only when every output of
    the stage is final (never in compute-only mode: the array tasks' shards live there)."""
    folder, keep = scratch_dir(stage), set(keep)
    freed = 0
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if path.name in keep:
            continue
        try:
            if path.is_dir() and not path.is_symlink():
                size = tree_bytes(path)
                shutil.rmtree(path)
            else:
                size = path.lstat().st_size
                path.unlink()
        except FileNotFoundError:
            continue
        freed += size
    if freed:
        log.info("%s: dropped %.1f MB of scratch no current output uses (%s)", stage,
                 freed / 1e6, folder)
    return freed


def tree_bytes(folder: Path = SCRATCH_ROOT) -> int:
    """Bytes of the files under ``folder`` (0 if it does not exist)."""
    total = 0
    for path in folder.rglob("*") if folder.is_dir() else []:
        try:
            if path.is_file() and not path.is_symlink():
                total += path.stat().st_size
        except OSError:
            continue
    return total
