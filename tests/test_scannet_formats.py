"""ScanNet as it is really exported: zero-padded (25k-frames release) and plain (SensReader)
frame names end to end through extract_clip_grid (tiny model), build_uv_index and
sample_point_feats; calibration files that do not match the image size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from featcache.clip_grid import STAGE as CLIP_STAGE
from featcache.clip_grid import ClipGridParams, extract_clip_grid
from featcache.config import SharedParams, build_dataclass
from featcache.encoders import TINY_OPENCLIP
from featcache.point_feats import PointFeatsParams, sample_point_feats
from featcache.reader import open_features
from featcache.uv_index import UvIndexParams, build_uv_index
from test_uv_index import build_scene

TINY = SharedParams(model=TINY_OPENCLIP, weights="random", device="cpu", seed=0)
SCENE = "scene0000_00"


def run_three_stages(root: Path, work: Path) -> tuple[object, object, object]:
    """extract_clip_grid on the scene's colour folder, build_uv_index, sample_point_feats."""
    clip = build_dataclass(ClipGridParams, {
        "root": str(root), "out": str(work / "grid"), "num_workers": 0, "batch_size": 2,
        "splits": [{"name": SCENE, "images": f"scans/{SCENE}/color"}]}, CLIP_STAGE)
    [grids] = extract_clip_grid(TINY, clip)
    uv = build_uv_index(build_dataclass(UvIndexParams, {
        "scannet": str(root), "scenes": "scenes.txt", "out": str(work / "uv"),
        "frames_per_scene": 0, "num_workers": 0, "max_failures": 0.5}, "build_uv_index"))
    feats = sample_point_feats(build_dataclass(PointFeatsParams, {
        "uv_index": str(work / "uv"), "clip_grid": str(work / "grid"),
        "out": str(work / "pf"), "num_workers": 0, "max_failures": 0.5},
        "sample_point_feats"))
    return grids, uv, feats


@pytest.mark.parametrize("names", [("000000", "000001", "000011"), ("0", "1", "11")],
                         ids=["padded_25k", "plain_sensreader"])
def test_both_frame_naming_styles_give_point_features(tmp_path, monkeypatch, names):
    root = tmp_path / "scannet"
    build_scene(root, SCENE, {n: "good" for n in names})
    (root / "scenes.txt").write_text(f"{SCENE}\n")
    monkeypatch.chdir(tmp_path)
    grids, uv, feats = run_three_stages(root, tmp_path)
    keys = [f"{SCENE}/frame_{i:06d}" for i in (0, 1, 11)]
    assert (grids.failed, uv.failed, feats.failed) == (0, 0, 0), feats.failures
    assert sorted(open_features(tmp_path / "uv")) == keys
    store = open_features(tmp_path / "pf")
    assert sorted(store) == keys
    for key in keys:
        record = store[key]
        assert record["valid"].sum() > 100
        assert np.abs(record["pts_feat"][record["valid"]].astype(np.float32)).sum(1).min() > 0
