"""sample_point_feats: grids whose channels encode their own coordinates, sampled at known pixels.

A map cell (row i, column j) of the upsampled grid holds (x=j, y=i) in its two channels, so a
bilinear sample returns the continuous cell coordinate of the sampling point. Any half-pixel
shift (1/16 cell here) or x/y swap (the test images are not square) changes the result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from featcache.verify.checks import Report
from featcache.verify.npz_checks import check_point_feats
from featcache.config import ParamError, build_dataclass
from featcache.encoders.base import EncoderSpec
from featcache.engine import EngineParams, run_job
from featcache.engine.shards import read_index
from featcache.engine.types import Failure, Piece
from featcache.provenance import GridProvenance
from featcache.stages._point_sampling import (GridError, normalise_coords, sample_map,
                                              sample_point_features, tokens_to_map)
from featcache.stages.sample_point_feats import PointFeatsJob, PointFeatsParams, grid_records, sample_point_feats
from featcache.reader import open_features

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


class RecordsJob:
    """A model-free engine job storing given records ``{key: {field: array}}``; an item's
    signature is its arrays' bytes."""

    def __init__(self, records: dict[str, dict[str, np.ndarray]]) -> None:
        self.records = records

    def items(self) -> list[str]:
        return sorted(self.records)

    def signature(self, item: str) -> str:
        h = hashlib.sha256()
        for name, value in sorted(self.records[item].items()):
            h.update(name.encode() + str(value.dtype).encode() + value.tobytes())
        return h.hexdigest()

    def load(self, item: str) -> list[Piece | Failure]:
        return [Piece(key=item, arrays=self.records[item])]


def write_output(out: Path, records: dict[str, dict[str, np.ndarray]], provenance: dict,
                 stage: str, layout: str = "shards") -> None:
    """A sharded output folder holding ``records`` (run in the test's working directory)."""
    run_job(RecordsJob(records), None, stage=stage, out=out, writer=layout,
            provenance=provenance, fingerprint={}, params=EngineParams(num_workers=0),
            item_bytes=1 << 16)


def grid_provenance(resize: str, array_layout: str = "tokens") -> dict:
    """An extract_clip_grid provenance (featcache.stages._grids) of a grid made with ``spec``."""
    return GridProvenance(
        model="tiny", family="open_clip", weights="random", weights_id="random(seed=0)",
        preprocessing=spec(resize), compute_precision="fp32", grid=G, native_grid=G,
        array_layout=array_layout, split="scene", images="color", key_rule="image_id",
        background=(255, 255, 255), precision="fp32").to_dict()


def write_grids(clip_grid: Path, scene: str, frames: dict[str, np.ndarray], resize: str,
                array_layout: str = "tokens", layout: str = "shards") -> None:
    """One scene's split as extract_clip_grid writes it: ``<clip_grid>/<scene>/``, key = the
    frame's image id, field ``grids`` (``tokens`` (g*g, C) or ``chw`` (C, g, g)), fp16."""
    def arranged(tokens: np.ndarray) -> np.ndarray:
        grid = tokens if array_layout == "tokens" else tokens.T.reshape(-1, G, G)
        return grid.astype(np.float16)

    write_output(clip_grid / scene, {k: {"grids": arranged(t)} for k, t in frames.items()},
                 grid_provenance(resize, array_layout), "test_grids", layout)


def write_grid_file(path: Path, frames: dict[str, np.ndarray], resize: str) -> None:
    """A lone seed-style grid file (no sharded folder): ``{frame}_grids`` + provenance JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.attrs["provenance"] = json.dumps(grid_provenance(resize))
        for frame, tokens in frames.items():
            f[f"{frame}_grids"] = tokens.astype(np.float16)


def uv_record(uv: np.ndarray, valid: np.ndarray, frame: str) -> dict[str, np.ndarray]:
    """One uv-index record with build_uv_index's fields."""
    return {"uv_idx": uv.astype(np.float32), "valid": valid,
            "depth": np.ones(len(uv), np.float32), "conf_2d": valid * np.float32(0.75),
            "frame": np.array(frame), "image_size": np.array(IMAGE, np.int32),
            "reproj_err_px": np.array(0.1, np.float32)}


def write_uv_index(out: Path, records: dict[str, dict[str, np.ndarray]],
                   layout: str = "shards") -> None:
    write_output(out, records, {"params": {"scannet": "nowhere"}}, "test_uv", layout)


def random_uv(seed: int = 1, n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    uv = np.c_[rng.uniform(0, 127, n), rng.uniform(0, 95, n)].astype(np.float32)
    return uv, rng.random(n) > 0.2


def make_params(tmp_path: Path, **kw: object) -> PointFeatsParams:
    values = {"uv_index": str(tmp_path / "uv"), "clip_grid": str(tmp_path / "grid"),
              "out": str(tmp_path / "pf"), "num_workers": 0, **kw}
    return build_dataclass(PointFeatsParams, values, "sample_point_feats")


@pytest.mark.parametrize("resize,array_layout,grid_layout", [
    ("squash", "tokens", "shards"), ("shortest_crop", "tokens", "shards"),
    ("squash", "chw", "shards"),             # the grids stage's (C, g, g) array layout
    ("shortest_crop", "tokens", "hdf5"),     # folder + <scene>.h5 view: the folder is read
    ("squash", "tokens", "h5_file"),         # a lone <scene>.h5 (no folder)
])
def test_job_end_to_end(tmp_path: Path, resize: str, array_layout: str, grid_layout: str,
                        monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    uv, valid = random_uv()
    write_uv_index(tmp_path / "uv", {
        "scene0000_00/frame_000003": uv_record(uv, valid, "3"),
        "scene0000_00/frame_000007": uv_record(uv, valid, "7"),      # no grid for it
        "scene0001_00/frame_000000": uv_record(uv, valid, "0")})     # no grids for the scene
    if grid_layout == "h5_file":
        write_grid_file(tmp_path / "grid/scene0000_00.h5", {"3": coordinate_tokens()}, resize)
    else:
        write_grids(tmp_path / "grid", "scene0000_00", {"3": coordinate_tokens()}, resize,
                    array_layout, grid_layout)
    job = PointFeatsJob(make_params(tmp_path))
    assert job.items() == ["scene0000_00/frame_000003", "scene0000_00/frame_000007",
                           "scene0001_00/frame_000000"]
    assert [r.error for r in job.load("scene0000_00/frame_000007")] == ["missing_grid"]
    assert [r.error for r in job.load("scene0001_00/frame_000000")] == ["missing_grid"]

    result = sample_point_feats(make_params(tmp_path, max_failures=2))
    assert result.records == 1 and result.failed == 2
    store = open_features(tmp_path / "pf")
    assert store.layout == "shards" and not list((tmp_path / "pf").rglob("*.npz"))
    record = store["scene0000_00/frame_000003"]
    feats, keep, conf = record["pts_feat"], record["valid"], record["conf_2d"]
    assert feats.dtype == np.float16 and feats.shape == (300, 2)
    np.testing.assert_array_equal(record["uv_idx"], uv)
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
    source = store.provenance["clip_grid"]["scene0000_00"]
    assert source["preprocessing"]["resize"] == resize
    assert source["source"] == ("scene0000_00.h5" if grid_layout == "h5_file" else "scene0000_00")
    metrics = json.loads((tmp_path / "metrics/sample_point_feats.json").read_text())
    assert metrics["frames"] == 1 and metrics["channels"] == 2 and metrics["computed"] == 3
    rows = (tmp_path / "pf/failures.tsv").read_text().splitlines()[1:]
    assert sorted(r.split("\t")[1] for r in rows) == ["scene0000_00/frame_000007",
                                                      "scene0001_00/frame_000000"]


def two_frame_world(tmp_path: Path, layout: str = "shards") -> dict[str, np.ndarray]:
    """uv index + grids of two frames of one scene; returns the grid tokens by image id."""
    uv, valid = random_uv()
    write_uv_index(tmp_path / "uv", {"scene0000_00/frame_000003": uv_record(uv, valid, "3"),
                                     "scene0000_00/frame_000011": uv_record(uv, valid, "11")},
                   layout)
    tokens = {"3": coordinate_tokens(), "11": coordinate_tokens()[::-1].copy()}
    write_grids(tmp_path / "grid", "scene0000_00", tokens, "squash")
    return tokens


def test_npz_layout_files_are_the_seed_format_and_read_like_the_shards(tmp_path: Path,
                                                                      monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    two_frame_world(tmp_path, layout="npz")          # an npz-layout uv index reads the same
    params = make_params(tmp_path, layout="npz")
    sample_point_feats(params)
    out = tmp_path / "pf"
    keys = ["scene0000_00/frame_000003", "scene0000_00/frame_000011"]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.npz")) == \
        [f"{k}.npz" for k in keys]
    store, job = open_features(out), PointFeatsJob(params)
    for key in keys:
        [piece] = job.load(key)
        with np.load(out / f"{key}.npz") as npz:
            files = {name: npz[name] for name in npz.files}
        assert list(files) == list(store[key]) == ["pts_feat", "uv_idx", "valid", "conf_2d"]
        for name, want in piece.arrays.items():
            for got in (files[name], store[key][name]):
                assert got.dtype == want.dtype and got.shape == want.shape, (key, name)
                np.testing.assert_array_equal(got, want)
    assert files["pts_feat"].dtype == np.float16 and files["valid"].dtype == bool
    # the layout is a view: switching back reuses every frame
    again = sample_point_feats(dataclasses.replace(params, layout="shards"))
    assert again.computed == 0 and again.reused == 2 and not list(out.rglob("*.npz"))


def test_a_changed_grid_or_uv_record_resamples_that_frame_only(tmp_path: Path,
                                                               monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    tokens = two_frame_world(tmp_path)
    params = make_params(tmp_path)
    assert sample_point_feats(params).computed == 2
    assert sample_point_feats(params).computed == 0             # nothing changed
    tokens["11"] = tokens["11"] + 1                              # one grid re-extracted
    write_grids(tmp_path / "grid", "scene0000_00", tokens, "squash")
    result = sample_point_feats(params)
    assert result.computed == 1 and result.reused == 1
    feats = open_features(tmp_path / "pf", field="pts_feat")["scene0000_00/frame_000011"]
    [piece] = PointFeatsJob(params).load("scene0000_00/frame_000011")
    np.testing.assert_array_equal(feats, piece.arrays["pts_feat"])
    uv, valid = random_uv()                                      # one uv frame changed
    write_uv_index(tmp_path / "uv", {"scene0000_00/frame_000003": uv_record(uv, ~valid, "3"),
                                     "scene0000_00/frame_000011": uv_record(uv, valid, "11")})
    assert sample_point_feats(params).computed == 1


def test_an_hdf5_view_without_its_folder_is_a_failure_not_zeros(tmp_path: Path,
                                                                monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    uv, valid = random_uv()
    write_uv_index(tmp_path / "uv", {"scene0000_00/frame_000003": uv_record(uv, valid, "3")})
    write_grids(tmp_path / "grid", "scene0000_00", {"3": coordinate_tokens()}, "squash",
                layout="hdf5")
    shutil.rmtree(tmp_path / "grid" / "scene0000_00")     # the view's sources are gone
    result = sample_point_feats(make_params(tmp_path, max_failures=1))
    assert [(f.item, f.error) for f in result.failures] == [("scene0000_00/frame_000003",
                                                             "bad_grid")]
    assert "missing" in result.failures[0].message


def test_grid_keys_by_image_id_or_stem(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_output(tmp_path / "g", {k: {"grids": np.zeros((G * G, 8), np.float16)}
                                  for k in ("3", "000011", "011", "x")}, {}, "test_grids")
    found = grid_records(tmp_path / "g")
    assert {i: key for i, (key, _) in found.items()} == {3: "3", 11: "011"}
    assert len({identity for _, identity in found.values()}) == 2


def test_verify_checks_pass_and_catch_features_where_not_valid(tmp_path: Path,
                                                                monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    two_frame_world(tmp_path)
    sample_point_feats(make_params(tmp_path, layout="npz"))
    out = tmp_path / "pf"
    report = Report()
    check_point_feats(report, out, tmp_path / "uv")
    assert not report.failed, report.to_json([])
    assert report.checks["point_feats.npz_view"].items == 2
    keys, shard, row, names, _ = read_index(out)
    record = open_features(out)[keys[0]]
    invalid = int(np.flatnonzero(~record["valid"])[0])
    with h5py.File(out / "shards" / names[shard[0]], "r+") as f:
        f["pts_feat"][row[0], invalid] = 1
    report = Report()
    check_point_feats(report, out, tmp_path / "uv")
    assert set(report.failed) == {"point_feats.valid", "point_feats.npz_view"}


def test_bad_params_name_the_key(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ParamError, match="sample_point_feats.upscale"):
        make_params(tmp_path, upscale=0)
    with pytest.raises(ParamError, match="sample_point_feats.uv_index: folder not found"):
        sample_point_feats(make_params(tmp_path))
    (tmp_path / "uv").mkdir()
    (tmp_path / "grid").mkdir()
    with pytest.raises(ParamError, match="sample_point_feats.uv_index: .* no index.h5"):
        sample_point_feats(make_params(tmp_path))
    uv, valid = random_uv()
    write_uv_index(tmp_path / "uv", {"scene0000_00/frame_000003": uv_record(uv, valid, "3")})
    with pytest.raises(ParamError, match="sample_point_feats.clip_grid: no grids for any scene"):
        sample_point_feats(make_params(tmp_path))
    (tmp_path / "grid" / "scene0000_00").mkdir()   # a folder per scene is accepted; an
    result = sample_point_feats(make_params(tmp_path, max_failures=1))   # empty one: a failure
    assert [(f.item, f.error) for f in result.failures] == [("scene0000_00/frame_000003",
                                                             "bad_grid")]
