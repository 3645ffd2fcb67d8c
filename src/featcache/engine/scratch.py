"""The scratch area and fingerprints.

Shards are computed in ``.featcache/scratch/<stage>/<shard id>.h5``, outside every DVC output
(DVC deletes a stage's outputs before running it, but not this folder), and moved into the
output by rename when it is complete. A shard's file name is its identity, so a run that was
killed resumes from every shard it finished, and shards left over from other params are simply
never used again (``make clean-scratch`` removes them).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SCRATCH_ROOT = Path(".featcache") / "scratch"


def fingerprint_of(parts: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of ``parts``."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def safe_name(name: str) -> str:
    """``name`` reduced to characters safe in a folder name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "out"
