"""sample_point_feats: grids whose channels encode their own coordinates, sampled at known pixels.

A map cell (row i, column j) of the upsampled grid holds (x=j, y=i) in its two channels, so a
bilinear sample returns the continuous cell coordinate of the sampling point. Any half-pixel
shift (1/16 cell here) or x/y swap (the test images are not square) changes the result.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from featcache.config import ParamError, build_dataclass
from featcache.encoders.base import EncoderSpec
from featcache.engine.types import Failure, Piece
from featcache.point_feats import (GridError, PointFeatsJob, PointFeatsParams, normalise_coords,
                                   sample_map, sample_point_feats, sample_point_features,
                                   tokens_to_map)

G, R = 4, 2              # token grid 4x4, PixelShuffle x2 -> 8x8 map with 2 channels
INPUT = (64, 64)         # model input (H, W); a map cell covers 8x8 input pixels
IMAGE = (128, 96)        # colour frame (W, H)


def spec(resize: str) -> EncoderSpec:
    return EncoderSpec(family="open_clip", name="tiny", weights="random", input_size=INPUT,
                       resize=resize, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                       interpolation="bicubic", patch_size=16)


def coordinate_tokens() -> np.ndarray:
    """(G*G, 2*R*R) tokens that PixelShuffle(R) turns into the map value(c, y, x) = (x, y)[c].

    Written from PixelShuffle's definition, out[c, i*R+a, j*R+b] = in[c*R*R + a*R + b, i, j],
    with row-major tokens (token i*G + j is grid row i, column j).
    """
    tokens = np.zeros((G * G, 2 * R * R), dtype=np.float32)
    for i in range(G):
        for j in range(G):
            for a in range(R):
                for b in range(R):
                    tokens[i * G + j, 0 * R * R + a * R + b] = j * R + b   # x of the cell
                    tokens[i * G + j, 1 * R * R + a * R + b] = i * R + a   # y of the cell
    return tokens


def expected_cells(uv: np.ndarray, scale: tuple[float, float], offset: tuple[int, int],
                   ) -> np.ndarray:
    """Continuous map-cell coordinates (x, y) of colour pixels, clamped to the border cells."""
    cells = []
    for axis, extent in ((0, INPUT[1]), (1, INPUT[0])):
        x_in = (uv[:, axis] + 0.5) * scale[axis] - offset[axis] - 0.5
        cell = (x_in + 0.5) / extent * (G * R) - 0.5
        cells.append(np.clip(cell, 0, G * R - 1))
    return np.stack(cells, axis=1)


def test_tokens_to_map_is_pixel_shuffle_of_row_major_tokens() -> None:
    fmap = tokens_to_map(coordinate_tokens(), R).numpy()
    assert fmap.shape == (2, G * R, G * R)
    ys, xs = np.mgrid[0:G * R, 0:G * R]
    np.testing.assert_array_equal(fmap[0], xs)
    np.testing.assert_array_equal(fmap[1], ys)
    with pytest.raises(GridError):
        tokens_to_map(np.zeros((15, 8), np.float32), 2)       # not a square grid
    with pytest.raises(GridError):
        tokens_to_map(np.zeros((16, 6), np.float32), 2)       # 6 channels, upscale² = 4


def test_sample_map_hits_cell_centres_and_edges() -> None:
    fmap = tokens_to_map(coordinate_tokens(), R)
    # cell centre (x=3, y=5) of an 8x8 map: x_norm = (3 + 0.5)/8*2 - 1
    coords = np.array([[(3.5 / 8) * 2 - 1, (5.5 / 8) * 2 - 1],
                       [-1.0, -1.0],                 # outer corner: border value (0, 0)
                       [0.0, 0.0],                   # map centre: (3.5, 3.5)
                       [(1.25 / 8) * 2 - 1, 1.0]])   # x between cells 0 and 1; bottom edge
    out = sample_map(fmap, coords)
    np.testing.assert_allclose(out, [[3, 5], [0, 0], [3.5, 3.5], [0.75, 7]], atol=1e-5)


def test_normalise_coords_marks_pixels_outside_the_input() -> None:
    xy = np.array([[-0.5, 0.0], [63.5, 63.5], [-0.6, 10.0], [10.0, 63.6], [31.5, 31.5]])
    norm, inside = normalise_coords(xy, INPUT)
    assert inside.tolist() == [True, True, False, False, True]
    np.testing.assert_allclose(norm[[0, 1, 4]], [[-1, -1 + 1 / 64], [1, 1], [0, 0]])


def test_squash_samples_the_right_cells() -> None:
    uv = np.array([[0, 0], [127, 95], [63.5, 47.5], [10, 80], [100.25, 3.0]], np.float32)
    feats, keep = sample_point_features(coordinate_tokens(), uv, np.ones(5, bool), IMAGE,
                                        spec("squash"), R)
    assert feats.dtype == np.float16 and feats.shape == (5, 2) and keep.all()
    want = expected_cells(uv, (64 / 128, 64 / 96), (0, 0))
    np.testing.assert_allclose(feats.astype(np.float32), want, atol=4e-3)
    # hand-computed: u=10 -> cell (10.5)/128*8 - 0.5 = 0.15625; v=80 -> 80.5/96*8 - 0.5 = 6.2083
    np.testing.assert_allclose(feats[3].astype(np.float32), [0.15625, 6.2083], atol=4e-3)


def test_shortest_crop_maps_through_the_centre_crop() -> None:
    # 128x96 -> short side 64: resized 85x64 (int(64*128/96)), crop x offset round(21/2) = 10
    uv = np.array([[64, 48], [5, 48], [120, 10], [20, 90], [110, 48]], np.float32)
    valid = np.array([True, True, True, True, False])
    feats, keep = sample_point_features(coordinate_tokens(), uv, valid, IMAGE,
                                        spec("shortest_crop"), R)
    # u=5 -> x_in = 5.5*85/128 - 10.5 = -6.85 and u=120 -> 69.5: cropped away; the last
    # point was invalid in the uv index
    assert keep.tolist() == [True, False, False, True, False]
    assert (feats[~keep] == 0).all()
    want = expected_cells(uv, (85 / 128, 64 / 96), (10, 0))
    np.testing.assert_allclose(feats[keep].astype(np.float32), want[keep], atol=4e-3)
    # hand-computed centre point: x_in = 64.5*85/128 - 10.5 = 32.332, cell 32.832/8 - 0.5
    np.testing.assert_allclose(feats[0].astype(np.float32), [3.6040, 3.5417], atol=4e-3)


def write_grid_file(path: Path, frames: dict[str, np.ndarray], resize: str) -> None:
    """A grid file as extract_clip_grid writes it: ``{frame}_grids`` + provenance JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    prov = {"model": "tiny", "grid": G, "preprocessing": spec(resize).to_dict()}
    with h5py.File(path, "w") as f:
        f.attrs["provenance"] = json.dumps(prov)
        for frame, tokens in frames.items():
            f[f"{frame}_grids"] = tokens.astype(np.float16)


def write_uv_frame(path: Path, uv: np.ndarray, valid: np.ndarray, frame: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, uv_idx=uv.astype(np.float32), valid=valid,
             depth=np.ones(len(uv), np.float32), conf_2d=valid * np.float32(0.75),
             frame=np.array(frame), image_size=np.array(IMAGE, np.int32))


def make_params(tmp_path: Path, **kw: object) -> PointFeatsParams:
    values = {"uv_index": str(tmp_path / "uv"), "clip_grid": str(tmp_path / "grid"),
              "out": str(tmp_path / "pf"), "num_workers": 0, **kw}
    return build_dataclass(PointFeatsParams, values, "sample_point_feats")


@pytest.mark.parametrize("resize", ["squash", "shortest_crop"])
def test_job_end_to_end(tmp_path: Path, resize: str, monkeypatch) -> None:
    rng = np.random.default_rng(1)
    uv = np.c_[rng.uniform(0, 127, 300), rng.uniform(0, 95, 300)].astype(np.float32)
    valid = rng.random(300) > 0.2
    write_uv_frame(tmp_path / "uv/scene0000_00/frame_000003.npz", uv, valid, "3")
    write_uv_frame(tmp_path / "uv/scene0000_00/frame_000007.npz", uv, valid, "7")  # no grid
    write_uv_frame(tmp_path / "uv/scene0001_00/frame_000000.npz", uv, valid, "0")  # no file
    write_grid_file(tmp_path / "grid/scene0000_00.h5", {"3": coordinate_tokens()}, resize)
    job = PointFeatsJob(make_params(tmp_path))
    assert job.items() == ["scene0000_00/frame_000003", "scene0000_00/frame_000007",
                           "scene0001_00/frame_000000"]
    assert [r.error for r in job.load("scene0000_00/frame_000007")] == ["missing_grid"]
    assert isinstance(job.load("scene0001_00/frame_000000")[0], Failure)

    monkeypatch.chdir(tmp_path)
    result = sample_point_feats(make_params(tmp_path, max_failures=2))
    assert result.records == 1 and result.failed == 2
    with np.load(tmp_path / "pf/scene0000_00/frame_000003.npz") as npz:
        feats, keep, conf = npz["pts_feat"], npz["valid"], npz["conf_2d"]
        assert feats.dtype == np.float16 and feats.shape == (300, 2)
        np.testing.assert_array_equal(npz["uv_idx"], uv)
    scale, offset = ((64 / 128, 64 / 96), (0, 0)) if resize == "squash" else \
        ((85 / 128, 64 / 96), (10, 0))
    want = expected_cells(uv, scale, offset)
    assert not (keep & ~valid).any() and (feats[~keep] == 0).all() and (conf[~keep] == 0).all()
    assert (conf[keep] == 0.75).all() and conf.dtype == np.float32
    if resize == "squash":
        np.testing.assert_array_equal(keep, valid)
    else:
        assert keep.sum() < valid.sum()             # the crop removed some points
    np.testing.assert_allclose(feats[keep].astype(np.float32), want[keep], atol=4e-3)
    prov = json.loads((tmp_path / "pf/provenance.json").read_text())
    assert prov["clip_grid"]["scene0000_00"]["preprocessing"]["resize"] == resize
    metrics = json.loads((tmp_path / "metrics/sample_point_feats.json").read_text())
    assert metrics["frames"] == 1 and metrics["channels"] == 2


def test_bad_params_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ParamError, match="sample_point_feats.upscale"):
        make_params(tmp_path, upscale=0)
    with pytest.raises(ParamError, match="sample_point_feats.uv_index"):
        sample_point_feats(make_params(tmp_path))
    (tmp_path / "uv").mkdir()
    (tmp_path / "grid").mkdir()
    with pytest.raises(ParamError, match="sample_point_feats.clip_grid: no <scene>.h5"):
        sample_point_feats(make_params(tmp_path))
