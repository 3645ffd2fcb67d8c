"""ScanNet as it is really exported: zero-padded (25k-frames release) and plain (SensReader)
frame names end to end through extract_clip_grid (tiny model), build_uv_index and
sample_point_feats; calibration files that do not match the image size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from featcache.stages.extract_clip_grid import STAGE as CLIP_STAGE
from featcache.stages.extract_clip_grid import ClipGridParams, extract_clip_grid
from featcache.config import SharedParams, build_dataclass
from featcache.encoders import TINY_OPENCLIP
from featcache.stages.sample_point_feats import PointFeatsParams, sample_point_feats
from featcache.reader import open_features
from featcache.stages.build_uv_index import UvIndexParams, build_uv_index
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


# --- the embedded sample's ScanNet scenes, re-exported the ways real releases differ ---------

import dataclasses  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402

from PIL import Image  # noqa: E402

from featcache.datasets import geometry, scannet  # noqa: E402
from featcache.verify.checks import Report  # noqa: E402
from featcache.verify.npz_checks import check_uv_index  # noqa: E402
from featcache.config import ParamError  # noqa: E402
from featcache.sample import generate_sample  # noqa: E402
from featcache.sample.scannet_scenes import COLOR_K, SCENE_LIST, format_matrix  # noqa: E402
from featcache.stages.build_uv_index import FrameData, UvIndexJob, index_frame, read_frame  # noqa: E402


@pytest.fixture(scope="module")
def sample_scannet(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sample")
    generate_sample(root, seed=0)
    return root / "scannet"


@pytest.fixture()
def scannet_copy(sample_scannet, tmp_path) -> Path:
    return Path(shutil.copytree(sample_scannet, tmp_path / "scannet"))


def uv_params(root: Path, work: Path, **kw: object) -> UvIndexParams:
    values = {"scannet": str(root), "scenes": SCENE_LIST, "out": str(work / "uv"),
              "frames_per_scene": 0, "num_workers": 0, "max_failures": 0.9, **kw}
    return build_dataclass(UvIndexParams, values, "build_uv_index")


def resize_all(folder: Path, size: tuple[int, int]) -> None:
    for path in sorted(folder.iterdir()):
        with Image.open(path) as image:
            image.load()
        resample = Image.NEAREST if path.suffix == ".png" else Image.BILINEAR
        image.resize(size, resample).save(path)


def failures(result) -> dict[str, str]:
    return {f.item: f.error for f in result.failures}


@pytest.mark.parametrize("meta", [True, False], ids=["scene_meta", "principal_point"])
def test_25k_style_half_resolution_colour_gets_scaled_intrinsics(scannet_copy, tmp_path,
                                                                 monkeypatch, meta):
    """The 25k-frames release: colour at a lower resolution than intrinsic_color.txt."""
    monkeypatch.chdir(tmp_path)
    scene = scannet_copy / "scans" / SCENE
    full = {s: read_frame(scene, s, 1000.0) for s in ("0", "1")}
    resize_all(scene / "color", (160, 120))
    if not meta:
        (scene / f"{SCENE}.txt").unlink()
    result = build_uv_index(uv_params(scannet_copy, tmp_path))
    assert set(failures(result).values()) == {"bad_pose"}        # the sample's -inf pose only
    store = open_features(tmp_path / "uv")
    points = scannet.read_point_cloud(scene / f"{SCENE}_vh_clean_2.ply")
    for stem, frame in full.items():
        record = store[f"{SCENE}/frame_{int(stem):06d}"]
        assert int(record["intrinsics_scaled"]) == 1 and record["image_size"].tolist() == [160, 120]
        want = geometry.project_points(points, frame.pose, frame.k_color, frame.size).uv
        both = record["valid"] & (want[:, 0] >= 0)
        np.testing.assert_allclose(record["uv_idx"][both], (want[both] + 0.5) * 0.5 - 0.5,
                                   atol=1e-3)
        assert record["k_color"][0, 0] == pytest.approx(COLOR_K[0] / 2)
    note = store.provenance["intrinsics"][SCENE]["color"]
    assert note["calibrated_at"] == [320, 240] and note["image"] == [160, 120]
    assert note["calibration_size_from"] == ("scene meta" if meta else "principal point")
    assert "scene0001_00" not in store.provenance["intrinsics"]
    metrics = json.loads(Path("metrics/build_uv_index.json").read_text())
    assert metrics["intrinsics_scaled_frames"] == sum(
        k.startswith(SCENE) for k in store) > 0
    report = Report()
    check_uv_index(report, tmp_path / "uv", Path("metrics/build_uv_index.json"), 1.0)
    assert not report.failed, report.to_json([])


def test_half_resolution_depth_gets_scaled_intrinsics(scannet_copy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    resize_all(scannet_copy / "scans" / SCENE / "depth", (80, 60))
    result = build_uv_index(uv_params(scannet_copy, tmp_path))
    assert set(failures(result).values()) == {"bad_pose"}
    record = open_features(tmp_path / "uv")[f"{SCENE}/frame_000000"]
    assert int(record["intrinsics_scaled"]) == 2 and float(record["depth_agreement"]) > 0.3


def test_intrinsics_of_another_aspect_ratio_are_an_error(scannet_copy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    resize_all(scannet_copy / "scans" / SCENE / "color", (240, 240))
    result = build_uv_index(uv_params(scannet_copy, tmp_path))
    rows = {k: v for k, v in failures(result).items() if k.startswith(SCENE)}
    assert set(rows.values()) <= {"intrinsics_mismatch", "bad_pose"}
    assert list(rows.values()).count("intrinsics_mismatch") == len(rows) - 1
    message = next(f.message for f in result.failures if f.error == "intrinsics_mismatch")
    assert "240x240" in message and "intrinsic_color.txt" in message
    assert not [k for k in open_features(tmp_path / "uv") if k.startswith(SCENE)]


def test_world_to_camera_pose_fails_the_depth_agreement_check(scannet_copy, tmp_path,
                                                              monkeypatch):
    monkeypatch.chdir(tmp_path)
    pose_file = scannet_copy / "scans" / SCENE / "pose" / "1.txt"
    pose = scannet.read_pose(pose_file)
    pose_file.write_text(format_matrix(np.linalg.inv(pose)))    # the other convention
    result = build_uv_index(uv_params(scannet_copy, tmp_path))
    assert failures(result)[f"{SCENE}/frame_000001"] == "pose_check"
    assert "world-to-camera" in next(f.message for f in result.failures
                                     if f.error == "pose_check")
    store = open_features(tmp_path / "uv")
    assert f"{SCENE}/frame_000000" in store
    assert min(float(store[k]["depth_agreement"]) for k in store) > 0.3
    # the round trip through the same (wrong) pose would have passed it
    frame = read_frame(scannet_copy / "scans" / SCENE, "0", 1000.0)
    wrong = dataclasses.replace(frame, pose=np.linalg.inv(frame.pose))
    assert geometry.reprojection_error(wrong.depth, wrong.k_depth, wrong.k_color, wrong.pose,
                                       wrong.size) < 1e-3


def test_colour_intrinsics_of_twice_the_resolution_fail_the_depth_in_image_check(
        sample_scannet):
    scene = sample_scannet / "scans" / SCENE
    frame = read_frame(scene, "0", 1000.0)
    points = scannet.read_point_cloud(scene / f"{SCENE}_vh_clean_2.ply")
    params = uv_params(sample_scannet, sample_scannet)
    assert float(index_frame(points, frame, params)["depth_in_image"]) > 0.99
    half = FrameData(frame.stem, frame.pose, frame.k_color, frame.k_depth, (160, 120),
                     frame.depth)                            # unscaled K, half-size image
    with pytest.raises(scannet.ScanNetError) as info:
        index_frame(points, half, params)
    assert info.value.code == "intrinsics_check" and "25.0%" in str(info.value)


def test_no_frame_written_reports_no_error_figure(scannet_copy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (scannet_copy / "none.txt").write_text("scene0099_00\n")
    result = build_uv_index(uv_params(scannet_copy, tmp_path, scenes="none.txt",
                                      max_failures=1))
    assert result.records == 0
    metrics = json.loads(Path("metrics/build_uv_index.json").read_text())
    assert metrics["frames"] == 0 and metrics["reprojection_max_px"] is None
    assert metrics["depth_agreement_min"] is None
    report = Report()
    check_uv_index(report, tmp_path / "uv", Path("metrics/build_uv_index.json"), 1.0)
    check = report.checks["uv_index.reprojection"]
    assert "uv_index.reprojection" in report.failed and check.numbers["max_px"] is None


def test_scene_list_entries_outside_scans_are_rows_and_never_read(scannet_copy, tmp_path,
                                                                  monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(scannet_copy / "scans" / "scene0001_00", scannet_copy / "outside")
    (scannet_copy / "evil.txt").write_text(
        f"{SCENE}\n../outside\nscene0001_00/../../outside\n/etc\n..\n")
    job = UvIndexJob(uv_params(scannet_copy, tmp_path, scenes="evil.txt"))
    bad = [i for i in job.items() if not i.startswith(f"{SCENE}/")]
    assert len(bad) == 4
    result = build_uv_index(uv_params(scannet_copy, tmp_path, scenes="evil.txt"))
    rows = failures(result)
    assert [rows[i] for i in bad] == ["bad_scene_name"] * 4
    assert all(k.startswith(f"{SCENE}/") for k in open_features(tmp_path / "uv"))
    assert "outside" not in json.dumps(job.calibration())


def test_non_finite_vertices_are_excluded_and_counted(scannet_copy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cloud = scannet_copy / "scans" / SCENE / f"{SCENE}_vh_clean_2.ply"
    data = bytearray(cloud.read_bytes())
    start = data.index(b"end_header\n") + len(b"end_header\n")
    stride = 16                                          # x y z float32 + rgba
    bad = [0, 5, 17]
    for i, value in zip(bad, (np.nan, np.inf, -np.inf)):
        data[start + i * stride + 4: start + i * stride + 8] = np.float32(value).tobytes()
    cloud.write_bytes(bytes(data))
    build_uv_index(uv_params(scannet_copy, tmp_path))
    store = open_features(tmp_path / "uv")
    for key in store:
        record = store[key]
        for name in ("uv_idx", "depth", "conf_2d"):
            assert np.isfinite(record[name]).all(), (key, name)
        if key.startswith(SCENE):
            assert int(record["nonfinite_points"]) == 3 and not record["valid"][bad].any()
            assert (record["depth"][bad] == 0).all() and (record["uv_idx"][bad] == -1).all()
    assert json.loads(Path("metrics/build_uv_index.json").read_text())["nonfinite_points"] == 3


def test_upscale_that_does_not_fit_the_grid_width_fails_before_work(tmp_path, monkeypatch):
    root = tmp_path / "scannet"
    build_scene(root, SCENE, {"0": "good", "1": "good"})
    (root / "scenes.txt").write_text(f"{SCENE}\n")
    monkeypatch.chdir(tmp_path)
    run_three_stages(root, tmp_path)
    params = build_dataclass(PointFeatsParams, {
        "uv_index": str(tmp_path / "uv"), "clip_grid": str(tmp_path / "grid"),
        "out": str(tmp_path / "pf3"), "num_workers": 0, "upscale": 3}, "sample_point_feats")
    with pytest.raises(ParamError, match=r"sample_point_feats.upscale: 3 .* 64-channel .* "
                                         r"\[1, 2, 4, 8\]"):
        sample_point_feats(params)
    assert not (tmp_path / "pf3").exists()
