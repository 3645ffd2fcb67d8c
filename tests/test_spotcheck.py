"""spot_check: recomputing cached grids live, and catching a cache that does not match."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from featcache.stages.extract_clip_grid import STAGE as CLIP_STAGE
from featcache.stages.extract_clip_grid import ClipGridParams, extract_clip_grid
from featcache.config import SharedParams, build_dataclass
from featcache.stages.extract_dinov2 import STAGE as DINO_STAGE
from featcache.stages.extract_dinov2 import Dinov2Params, extract_dinov2
from featcache.encoders import TINY_DINOV2, TINY_OPENCLIP
from featcache.verify.spotcheck import spot_check

SHARED = SharedParams(model=TINY_OPENCLIP, weights="random", device="cpu", seed=0)


@pytest.fixture()
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Four JPEGs and one RGBA PNG in ``imgs/``; the working directory is ``tmp_path``."""
    rng = np.random.default_rng(2)
    (tmp_path / "imgs").mkdir()
    for i in (1, 2, 3, 4):
        Image.fromarray(rng.integers(0, 256, (50, 70, 3), np.uint8)).save(
            tmp_path / "imgs" / f"{i:012d}.jpg")
    rgba = rng.integers(0, 256, (40, 40, 4), np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "imgs" / "cutout.png")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_clip(root: Path, **overrides: object) -> Path:
    values = {"root": ".", "out": "out", "splits": [{"name": "val", "images": "imgs"}],
              "num_workers": 0, "background": [0, 128, 255], **overrides}
    extract_clip_grid(SHARED, build_dataclass(ClipGridParams, values, CLIP_STAGE))
    return root / "out"


def test_fp16_cache_passes_the_spot_check(root: Path) -> None:
    out = run_clip(root, grid=7, layout="hdf5")
    result = spot_check(out / "val", n=3, seed=1)
    assert len(result.keys) == 3 and result.errors == ()
    assert result.min_cosine > 0.9999 and 0 < result.max_abs_diff < 0.01
    assert result.passed()
    every = spot_check(out / "val.h5", n=10, field="global")   # through the FSGR view
    assert sorted(every.keys) == ["1", "2", "3", "4", "cutout"] and every.passed()


def test_a_tampered_item_fails_the_spot_check(root: Path) -> None:
    from featcache.engine.shards import SHARDS_DIR, read_index

    out = run_clip(root, dtype="fp32")
    keys, shard, row, names, _ = read_index(out / "val")
    i = keys.index("3")
    with h5py.File(out / "val" / SHARDS_DIR / names[shard[i]], "r+") as f:
        tokens = f["grids"][row[i]]
        f["grids"][row[i]] = np.roll(tokens, 1, axis=0)  # patches shifted by one position
    result = spot_check(out / "val", n=5)
    assert not result.passed() and result.min_cosine < 0.99
    assert result.max_abs_diff > 0.1


def test_missing_source_images_are_errors_and_images_can_be_relocated(root: Path) -> None:
    out = run_clip(root, layout="npy")
    shutil.move(root / "imgs", root / "moved")
    result = spot_check(out / "val", n=2)
    assert len(result.errors) == 2 and not result.passed()
    relocated = spot_check(out / "val", n=5, images=root / "moved")
    assert relocated.passed() and len(relocated.keys) == 5
    mask = spot_check(out / "val", n=5, images=root / "moved", field="mask")
    assert mask.passed() and mask.max_abs_diff < 1e-3


def test_dinov2_cache_passes_the_spot_check(root: Path) -> None:
    values = {"root": ".", "out": "dino", "model": TINY_DINOV2, "size": 42, "num_workers": 0,
              "splits": [{"name": "val", "images": "imgs"}]}
    extract_dinov2(SHARED, build_dataclass(Dinov2Params, values, DINO_STAGE))
    result = spot_check(root / "dino" / "val", n=2)
    assert result.passed(min_cosine=0.9999) and len(result.keys) == 2
