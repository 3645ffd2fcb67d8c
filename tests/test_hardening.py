"""Hardening: every legal name works, every bad one is one row, nothing escapes its folder.

Per-item layouts (npy, npz) with long, unicode, dotted and tab-holding keys and with keys whose
files would collide; temporary names near the 255-byte limit; scratch left by abandoned outputs.
Inputs are generated; the engine runs a model-free job inline.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import featcache.atomic as atomic
from featcache.engine import EngineParams, WriterOptions, finish_stage, run_job
from featcache.engine.types import Failure, Piece
from featcache.reader import open_features

NAME_MAX = 255   # bytes per file name (ext4, xfs, btrfs, apfs, ...)


class NamedJob:
    """Items are the given keys; each gives ``grids`` and, for names listed in ``extra``,
    the extra fields (``global``, ``mask``): what the grid stages store per image."""

    def __init__(self, keys: list[str], extra: dict[str, tuple[str, ...]] | None = None) -> None:
        self.keys, self.extra = keys, extra or {}

    def items(self) -> list[str]:
        return list(self.keys)

    def signature(self, item: str) -> str:
        return f"named {item}"

    def load(self, item: str) -> list[Piece | Failure]:
        seed = sum(item.encode("utf-8", "surrogateescape"))
        arrays = {"grids": np.full((2, 3), seed, np.float32)}
        for field in self.extra.get(item, ()):
            arrays[field] = np.full((4,), seed + len(field), np.float32)
        return [Piece(item, None, arrays)]


def run_named(tmp_path: Path, keys: list[str], layout: str, extra=None, suffix: str = "",
              out: str = "out"):
    os.chdir(tmp_path)
    params = EngineParams(batch_size=4, num_workers=0, max_failures=1000, shard_mb=0.001)
    result = run_job(NamedJob(keys, extra), None, stage="named", out=tmp_path / out,
                     writer=layout, writer_options=WriterOptions(suffix=suffix),
                     provenance={"model": "none"}, fingerprint={}, params=params,
                     item_bytes=256)
    return result


@pytest.fixture(autouse=True)
def _keep_cwd():
    cwd = os.getcwd()
    yield
    os.chdir(cwd)


def failures_by_item(result) -> dict[str, str]:
    return {f.item: f.error for f in result.failures}


# ------------------------------------------------------------ names (point 1)


def test_long_names_write_and_over_long_ones_are_one_row(tmp_path):
    fits = "x" * (NAME_MAX - len("_edges.npz"))         # the final name is exactly 255 bytes
    near = "é" * 118 + "n"                                # 237 bytes of unicode
    over = "y" * (NAME_MAX - len("_edges.npz") + 1)       # 256 bytes: no filesystem takes it
    keys = ["a", fits, near, over, "with space", "sub/dir/leaf"]
    for run in range(2):   # a re-run must finish the same way (no crash, nothing left behind)
        result = run_named(tmp_path, keys, "npz", suffix="_edges")
        assert failures_by_item(result) == {over: "name_too_long"}, result.failures
        store = open_features(tmp_path / "out", layout="npz", suffix="_edges")
        assert sorted(store) == sorted(k for k in keys if k != over)
        assert store[fits]["grids"].shape == (2, 3)
        assert not [p for p in (tmp_path / "out").rglob("*.tmp")]
    # the shards keep every key, the over-long one included
    assert over in open_features(tmp_path / "out", field="grids")


def test_npy_layout_unicode_dots_and_tabs(tmp_path):
    keys = [".hidden", "ünï cödé", "z" * (NAME_MAX - len("_global.npy")), "tab\there",
            "new\nline", "../escape", "shards/x"]
    result = run_named(tmp_path, keys, "npy", extra={k: ("global",) for k in keys})
    assert failures_by_item(result) == {"tab\there": "bad_name", "new\nline": "bad_name",
                                        "../escape": "bad_name", "shards/x": "bad_name"}
    assert not (tmp_path / "escape.npy").exists() and not (tmp_path / "escape_global.npy").exists()
    grids = open_features(tmp_path / "out", layout="npy")
    assert sorted(grids) == sorted(keys[:3])        # index.tsv stays readable
    pooled = open_features(tmp_path / "out", layout="npy", field="global")
    for key in keys[:3]:
        assert grids[key].shape == (2, 3) and pooled[key].shape == (4,)


def test_temporary_names_never_exceed_the_limit(tmp_path):
    long = "t" * NAME_MAX
    assert len(os.fsencode(atomic.temp_prefix(long))) + 16 <= NAME_MAX
    atomic.write_text(tmp_path / long, "fine")                 # a 255-byte name, written atomically
    assert (tmp_path / long).read_text() == "fine"
    stale = tmp_path / f"{atomic.temp_prefix(long)}abc.tmp"
    stale.write_text("left by a killed run")
    assert atomic.stale_temps(tmp_path / long) == [stale]


# ------------------------------------------------------------ collisions (point 2)


def test_npy_collisions_are_rows_not_replacements(tmp_path):
    keys = ["b", "b_global", "c", "c_mask", "d", "d_mask"]
    extra = {"b": ("global",), "c": ("mask",)}    # d has no mask: d_mask.npy is d_mask's own
    result = run_named(tmp_path, keys, "npy", extra=extra)
    assert failures_by_item(result) == {k: "name_collision" for k in ("b", "b_global", "c",
                                                                      "c_mask")}
    grids = open_features(tmp_path / "out", layout="npy")
    assert sorted(grids) == ["d", "d_mask"]
    assert grids["d_mask"][0, 0] == sum(b"d_mask")    # its own grid, not another item's
    with pytest.raises(KeyError):
        open_features(tmp_path / "out", layout="npy", field="global")["b"]


def test_file_folder_collision_is_a_row(tmp_path):
    result = run_named(tmp_path, ["a", "a.npz/x"], "npz")
    assert failures_by_item(result) == {"a": "name_collision", "a.npz/x": "name_collision"}


# ------------------------------------------------------------ scratch (point 10)


def test_stage_run_drops_scratch_no_output_can_use(tmp_path):
    os.chdir(tmp_path)
    run_named(tmp_path, ["p", "q"], "shards", out="old")
    scratch = tmp_path / ".featcache" / "scratch" / "named"
    # an abandoned output's shards (renamed output, old params): left in scratch by a kill
    leftover = scratch / ("0" * 32 + ".h5")
    leftover.write_bytes(b"x" * 1000)
    (scratch / f".{leftover.name}.123.tmp").write_bytes(b"y" * 10)
    params = EngineParams(batch_size=4, num_workers=0, max_failures=0, shard_mb=0.001,
                          metrics=str(tmp_path / "m.json"))
    result = run_named(tmp_path, ["p", "q", "r"], "shards", out="new")
    finish_stage("named", tmp_path / "new", [result], params)
    assert not list(scratch.iterdir())
    import json
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["scratch_bytes"] == 0
