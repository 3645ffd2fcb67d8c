"""build_uv_index on a generated ScanNet-style scene with exact geometry.

The scene: an infinite wall at world z = 4 and a rectangular occluder at z = 2
(x in [-0.5, 0.5], y in [-0.4, 0.4]), cameras near the origin looking along +z. Depth maps are
rendered analytically at half the colour resolution (uint16 mm), so visibility is known exactly.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest

from featcache.datasets import geometry, scannet
from featcache.verify.checks import Report
from featcache.verify.npz_checks import check_uv_index
from featcache.config import ParamError, build_dataclass
from featcache.engine.shards import read_index
from featcache.engine.types import Failure, Piece
from featcache.verify.pictures import uv_picture
from featcache.reader import open_features
from featcache.sample import generate_sample
from featcache.stages.build_uv_index import (UvIndexJob, UvIndexParams, build_uv_index, index_frame,
                                 read_frame)

K_COLOR = np.array([[260.0, 0, 159.5], [0, 260.0, 119.5], [0, 0, 1]])
K_DEPTH = np.array([[130.0, 0, 79.5], [0, 130.0, 59.5], [0, 0, 1]])
COLOR_SIZE, DEPTH_SIZE = (320, 240), (160, 120)
WALL_Z, OCC_Z, OCC_X, OCC_Y = 4.0, 2.0, 0.5, 0.4


def camera(i: int) -> np.ndarray:
    """Camera-to-world pose of good frame ``i``: small rotations, some translation."""
    ay, ax = np.deg2rad(4.0 * (i - 1)), np.deg2rad(2.0 * i - 3)
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    pose = np.eye(4)
    pose[:3, :3] = ry @ rx
    pose[:3, 3] = [0.25 * (i - 1), 0.1 * i - 0.1, 0.2 * (i % 2)]
    return pose


def occluder_hit(origin: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where segments origin→target ``(...,3)`` cross the occluder plane: (param, point)."""
    alpha = (OCC_Z - origin[..., 2]) / (target[..., 2] - origin[..., 2])
    return alpha, origin + alpha[..., None] * (target - origin)


def in_occluder(p: np.ndarray, margin: float = 0.0) -> np.ndarray:
    return (np.abs(p[..., 0]) <= OCC_X + margin) & (np.abs(p[..., 1]) <= OCC_Y + margin)


def render_depth(pose: np.ndarray) -> np.ndarray:
    """uint16 mm depth (h,w) of wall + occluder, rendered per depth pixel centre."""
    width, height = DEPTH_SIZE
    u, v = np.meshgrid(np.arange(width), np.arange(height))
    rays = np.stack([u, v, np.ones_like(u)], -1).reshape(-1, 3).astype(float) \
        @ np.linalg.inv(K_DEPTH).T
    dirs = rays @ pose[:3, :3].T          # camera z = 1, so the ray parameter is camera z
    origin = pose[:3, 3]
    z_wall = (WALL_Z - origin[2]) / dirs[:, 2]
    z_occ = (OCC_Z - origin[2]) / dirs[:, 2]
    hit = in_occluder(origin + z_occ[:, None] * dirs) & (z_occ > 0)
    z = np.where(hit, z_occ, z_wall)
    return np.round(z * 1000).astype(np.uint16).reshape(height, width)


def scene_points(seed: int = 0) -> np.ndarray:
    """(N,3) world points: 3000 on the wall, 600 on the occluder, 50 behind the cameras."""
    rng = np.random.default_rng(seed)
    wall = np.c_[rng.uniform(-4, 4, (3000, 2)), np.full(3000, WALL_Z)]
    occ = np.c_[rng.uniform([-OCC_X, -OCC_Y], [OCC_X, OCC_Y], (600, 2)), np.full(600, OCC_Z)]
    behind = np.c_[rng.uniform(-1, 1, (50, 2)), np.full(50, -1.0)]
    return np.concatenate([wall, occ, behind]).astype(np.float32)


def write_ply(path: Path, points: np.ndarray, fmt: str) -> None:
    """ScanNet-like PLY: x y z float + red green blue uchar vertices, then a face element."""
    header = (f"ply\nformat {fmt} 1.0\ncomment test\nelement vertex {len(points)}\n"
              "property float x\nproperty float y\nproperty float z\nproperty uchar red\n"
              "property uchar green\nproperty uchar blue\nelement face 1\n"
              "property list uchar int vertex_indices\nend_header\n")
    if fmt == "ascii":
        body = "".join(f"{x} {y} {z} 10 20 30\n" for x, y, z in points.tolist()) + "3 0 1 2\n"
        path.write_bytes(header.encode() + body.encode())
        return
    rows = np.zeros(len(points), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"),
                                        ("r", "u1"), ("g", "u1"), ("b", "u1")])
    rows["x"], rows["y"], rows["z"] = points.T
    face = np.array([3], "u1").tobytes() + np.array([0, 1, 2], "<i4").tobytes()
    path.write_bytes(header.encode() + rows.tobytes() + face)


def write_matrix(path: Path, m: np.ndarray) -> None:
    path.write_text("\n".join(" ".join(f"{x:.9g}" for x in row) for row in m) + "\n")


def write_frame(scene_dir: Path, stem: str, pose: np.ndarray, kind: str = "good") -> None:
    """One frame; ``kind`` in good | inf_pose | no_depth | zero_depth."""
    color = np.zeros((COLOR_SIZE[1], COLOR_SIZE[0], 3), np.uint8)
    color[:, :, 1] = np.arange(COLOR_SIZE[0]) * 255 // COLOR_SIZE[0]
    cv2.imwrite(str(scene_dir / "color" / f"{stem}.jpg"), color)
    write_matrix(scene_dir / "pose" / f"{stem}.txt",
                 np.full((4, 4), -np.inf) if kind == "inf_pose" else pose)
    depth = render_depth(pose) if kind != "zero_depth" else np.zeros(DEPTH_SIZE[::-1], np.uint16)
    if kind != "no_depth":
        cv2.imwrite(str(scene_dir / "depth" / f"{stem}.png"), depth)


def build_scene(root: Path, scene: str, frames: dict[str, str], cloud: str = "binary") -> Path:
    """Write ``root/scans/<scene>`` with ``frames = {stem: kind}``; returns the scene folder."""
    scene_dir = root / "scans" / scene
    for sub in ("color", "depth", "pose", "intrinsic"):
        (scene_dir / sub).mkdir(parents=True, exist_ok=True)
    k4 = np.eye(4)
    for name, k in (("color", K_COLOR), ("depth", K_DEPTH)):
        k4[:3, :3] = k
        write_matrix(scene_dir / "intrinsic" / f"intrinsic_{name}.txt", k4)
    points = scene_points()
    if cloud == "npy":
        np.save(scene_dir / f"{scene}_vh_clean_2.npy", points)
    else:
        fmt = "ascii" if cloud == "ascii" else "binary_little_endian"
        write_ply(scene_dir / f"{scene}_vh_clean_2.ply", points, fmt)
    for stem, kind in frames.items():
        write_frame(scene_dir, stem, camera(int(stem) % 3), kind)
    return scene_dir


@pytest.fixture()
def scannet_root(tmp_path: Path) -> Path:
    root = tmp_path / "scannet"
    build_scene(root, "scene0000_00", {"0": "good", "1": "good", "2": "good", "3": "inf_pose",
                                       "4": "no_depth", "5": "zero_depth", "10": "good"})
    build_scene(root, "scene0001_00", {"0": "good", "1": "good"}, cloud="ascii")
    (root / "scenes.txt").write_text("scene0000_00\nscene0001_00\nscene0009_00\n")
    return root


def make_params(root: Path, tmp_path: Path, **kw: object) -> UvIndexParams:
    values = {"scannet": str(root), "scenes": "scenes.txt", "out": str(tmp_path / "uv"),
              "frames_per_scene": 0, "num_workers": 0, **kw}
    return build_dataclass(UvIndexParams, values, "build_uv_index")


def expected_visibility(points: np.ndarray, pose: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth from the analytic scene: (visible (N,), near_silhouette (N,))."""
    origin = pose[:3, 3]
    alpha, hit = occluder_hit(origin, points.astype(float))
    on_occ = np.isclose(points[:, 2], OCC_Z)
    z_hit = (hit - origin) @ pose[:3, 2]              # camera depth of the crossing point
    margin = 2.5 * z_hit / K_DEPTH[0, 0]              # 2.5 depth pixels at the occluder
    blocked = (alpha > 0) & (alpha < 1 - 1e-9) & in_occluder(hit)
    near = in_occluder(hit, margin) & ~in_occluder(hit, -margin) & ((alpha > 0) | on_occ)
    return ~blocked, near


def test_items_select_frames_numerically_and_report_missing_scene(scannet_root, tmp_path):
    job = UvIndexJob(make_params(scannet_root, tmp_path))
    assert job.items() == [f"scene0000_00/frame_{i:06d}" for i in (0, 1, 2, 3, 4, 5, 10)] + [
        "scene0001_00/frame_000000", "scene0001_00/frame_000001", "scene0009_00"]
    job = UvIndexJob(make_params(scannet_root, tmp_path, frames_per_scene=2, frame_stride=3))
    assert job.items()[:2] == ["scene0000_00/frame_000000", "scene0000_00/frame_000003"]
    assert job.load("scene0009_00")[0].error == "missing_scene"
    (scannet_root / "dupes.txt").write_text("# comment\nscene0001_00\n\nscene0001_00\n")
    job = UvIndexJob(make_params(scannet_root, tmp_path, scenes="dupes.txt"))
    assert job.items() == ["scene0001_00/frame_000000", "scene0001_00/frame_000001"]


@pytest.mark.parametrize("kind,code", [("3", "bad_pose"), ("4", "missing_file"),
                                       ("5", "empty_depth")])
def test_bad_frames_become_failures(scannet_root, tmp_path, kind, code):
    job = UvIndexJob(make_params(scannet_root, tmp_path))
    [result] = job.load(f"scene0000_00/frame_{int(kind):06d}")
    assert isinstance(result, Failure) and result.error == code, result


@pytest.mark.parametrize("scene,stem", [("scene0000_00", "1"), ("scene0000_00", "2"),
                                        ("scene0000_00", "10"), ("scene0001_00", "0")])
def test_frame_index_matches_exact_geometry(scannet_root, tmp_path, scene, stem,
                                            record_property):
    params = make_params(scannet_root, tmp_path)
    [piece] = UvIndexJob(params).load(f"{scene}/frame_{int(stem):06d}")
    assert isinstance(piece, Piece), piece
    a = piece.arrays
    points, pose = scene_points(), camera(int(stem) % 3)
    n = len(points)
    assert a["uv_idx"].shape == (n, 2) and a["uv_idx"].dtype == np.float32
    assert a["valid"].dtype == bool and a["depth"].dtype == np.float32
    assert a["conf_2d"].dtype == np.float32 and str(a["frame"]) == stem
    assert a["image_size"].tolist() == list(COLOR_SIZE)
    record_property("reprojection_max_px", float(a["reproj_err_px"]))
    assert float(a["reproj_err_px"]) < 1.0
    assert not a["valid"][-50:].any()                       # behind the camera
    visible, near = expected_visibility(points, pose)
    check = a["valid"] & ~near
    assert check.sum() > 1000
    np.testing.assert_array_equal(a["conf_2d"][check] == 1, visible[check])
    assert (a["conf_2d"][~a["valid"]] == 0).all()
    assert 0 < (~visible[check]).sum()                      # some points are really occluded


def test_depth_backprojection_lands_on_projected_points(scannet_root, record_property):
    """Scene points visible in the depth map, lifted from depth and projected again, land
    within 1 px of where the uv index puts them."""
    scene_dir = scannet_root / "scans" / "scene0000_00"
    frame = read_frame(scene_dir, "1", 1000.0)
    params = make_params(scannet_root, scannet_root, occlusion_check=True)
    arrays = index_frame(scene_points(), frame, params)
    cam = geometry.world_to_camera(scene_points(), frame.pose)
    d_uv = geometry.camera_to_pixels(cam, frame.k_depth)
    rows, cols = np.rint(d_uv[:, 1]).astype(int), np.rint(d_uv[:, 0]).astype(int)
    sel = arrays["conf_2d"] == 1
    # lift the *measured* depth at the point's own (sub-pixel) depth coordinates
    z = frame.depth[rows[sel], cols[sel]].astype(float)
    rays = np.c_[d_uv[sel], np.ones(sel.sum())] @ np.linalg.inv(frame.k_depth).T
    world = (rays * z[:, None]) @ frame.pose[:3, :3].T + frame.pose[:3, 3]
    again = geometry.project_points(world, frame.pose, frame.k_color, COLOR_SIZE)
    err = np.abs(again.uv - arrays["uv_idx"][sel]).max()
    record_property("lifted_max_px", float(err))
    assert err < 1.0


@pytest.mark.parametrize("text,code", [("1 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n", None),
                                       ("-inf " * 16, "bad_pose"), ("0 " * 16, "bad_pose"),
                                       ("2 0 0 0 0 1 0 0 0 0 1 0 0 0 0 1", "bad_pose"),
                                       ("1 0 0\n0 1 0\n0 0 1\n", "bad_matrix"),
                                       ("1 0 0 0 0 1 0 0 0 0 1 0 0 0 0 x", "bad_matrix")])
def test_read_pose_rejects_non_rigid_and_malformed(tmp_path, text, code):
    path = tmp_path / "0.txt"
    path.write_text(text)
    if code is None:
        np.testing.assert_array_equal(scannet.read_pose(path), np.eye(4))
        return
    with pytest.raises(scannet.ScanNetError) as info:
        scannet.read_pose(path)
    assert info.value.code == code


def test_occlusion_check_off_gives_valid_as_conf(scannet_root, tmp_path):
    params = make_params(scannet_root, tmp_path, occlusion_check=False)
    [piece] = UvIndexJob(params).load("scene0000_00/frame_000001")
    np.testing.assert_array_equal(piece.arrays["conf_2d"], piece.arrays["valid"].astype(np.float32))


@pytest.mark.parametrize("cloud", ["binary", "ascii", "npy"])
def test_point_cloud_formats_read_the_same(tmp_path, cloud):
    scene_dir = build_scene(tmp_path, "s", {}, cloud=cloud)
    path = scene_dir / ("s_vh_clean_2.npy" if cloud == "npy" else "s_vh_clean_2.ply")
    points = scannet.read_point_cloud(path)
    assert points.dtype == np.float32
    np.testing.assert_allclose(points, scene_points(), rtol=1e-6)


def test_truncated_ply_is_an_error(tmp_path):
    scene_dir = build_scene(tmp_path, "s", {})
    path = scene_dir / "s_vh_clean_2.ply"
    path.write_bytes(path.read_bytes()[:-4000])
    with pytest.raises(scannet.ScanNetError, match="truncated"):
        scannet.read_point_cloud(path)


@pytest.mark.parametrize("key,value", [("frame_stride", 0), ("depth_min", 20.0),
                                       ("occlusion_tolerance", 0.0), ("point_cloud", "x.obj"),
                                       ("frames_per_scene", "5")])
def test_bad_params_name_the_key(tmp_path, key, value):
    with pytest.raises(ParamError, match=f"build_uv_index.{key}"):
        make_params(tmp_path, tmp_path, **{key: value})


GOOD_KEYS = [f"scene0000_00/frame_{i:06d}" for i in (0, 1, 2, 10)] + [
    "scene0001_00/frame_000000", "scene0001_00/frame_000001"]


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_stage_writes_frames_failures_and_metrics(scannet_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = make_params(scannet_root, tmp_path, max_failures=0.5)
    result = build_uv_index(params)
    out = tmp_path / "uv"
    store = open_features(out)
    assert store.layout == "shards" and (out / "index.h5").is_file()
    assert sorted(store) == GOOD_KEYS
    assert not list(out.rglob("*.npz"))           # the default layout: shards only
    assert result.failed == 4 and result.computed == 10 and result.reused == 0
    rows = (out / "failures.tsv").read_text().splitlines()[1:]
    assert sorted(r.split("\t")[2] for r in rows) == ["bad_pose", "empty_depth", "missing_file",
                                                      "missing_scene"]
    metrics = json.loads((tmp_path / "metrics" / "build_uv_index.json").read_text())
    assert metrics["frames"] == 6 and 0 <= metrics["reprojection_max_px"] < 1.0
    assert 0 < metrics["visible_of_valid_mean"] < 1
    assert metrics["computed"] == 10 and metrics["reused"] == 0
    record = store["scene0001_00/frame_000001"]
    assert set(record) >= {"uv_idx", "valid", "depth", "conf_2d"}
    assert record["uv_idx"].shape == (len(scene_points()), 2)
    assert store.provenance["params"]["layout"] == "shards"


def test_npz_layout_files_are_the_seed_format_and_read_like_the_shards(scannet_root, tmp_path,
                                                                      monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = make_params(scannet_root, tmp_path, max_failures=0.5, layout="npz")
    build_uv_index(params)
    out = tmp_path / "uv"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.npz")) == \
        [f"{k}.npz" for k in GOOD_KEYS]
    assert json.loads((out / "provenance.json").read_text())["layout"] == "npz"
    store = open_features(out)                    # the shards, beside the npz files
    job = UvIndexJob(params)
    for key in GOOD_KEYS:
        [piece] = job.load(key)                   # the seed's record: index_frame's arrays
        with np.load(out / f"{key}.npz") as npz:
            files = {name: npz[name] for name in npz.files}
        shard = store[key]
        assert list(files) == list(piece.arrays) == list(shard)
        for name, want in piece.arrays.items():
            for got in (files[name], shard[name]):
                assert got.dtype == want.dtype and got.shape == want.shape, (key, name)
                np.testing.assert_array_equal(got, want)
    assert files["uv_idx"].dtype == np.float32 and files["valid"].dtype == bool
    assert files["image_size"].dtype == np.int32 and files["reproj_err_px"].shape == ()
    # the layout is a view: switching back reuses every frame and drops the npz files
    again = build_uv_index(dataclasses.replace(params, layout="shards"))
    assert again.computed == 0 and again.reused == again.items == 10
    assert not list(out.rglob("*.npz")) and sorted(open_features(out)) == GOOD_KEYS


def test_adding_a_scene_computes_only_its_frames(scannet_root, tmp_path, monkeypatch):
    scenes = scannet_root / "scenes.txt"
    runs = {}
    for name, lists in (("incremental", ["scene0000_00", "scene0000_00\nscene0001_00"]),
                        ("fresh", ["scene0000_00\nscene0001_00"])):
        work = tmp_path / name
        work.mkdir()
        monkeypatch.chdir(work)
        runs[name] = []
        for text in lists:
            scenes.write_text(text + "\n")
            runs[name].append(build_uv_index(make_params(scannet_root, work, out="uv",
                                                         max_failures=0.5)))
    first, second = runs["incremental"]
    assert first.computed == 7 and first.reused == 0
    assert second.items == 9 and second.computed == 2 and second.reused == 7
    metrics = json.loads((tmp_path / "incremental/metrics/build_uv_index.json").read_text())
    assert metrics["computed"] == 2 and metrics["reused"] == 7 and metrics["frames"] == 6
    assert runs["fresh"][0].computed == 9
    assert tree_bytes(tmp_path / "incremental/uv") == tree_bytes(tmp_path / "fresh/uv")


def test_changed_inputs_recompute_exactly_the_frames_that_read_them(scannet_root, tmp_path,
                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = make_params(scannet_root, tmp_path, max_failures=0.5)
    build_uv_index(params)
    before = open_features(tmp_path / "uv")["scene0000_00/frame_000001"]["uv_idx"]
    scene0 = scannet_root / "scans" / "scene0000_00"
    write_frame(scene0, "1", camera(2))     # one frame's pose (and its depth map, to agree)
    assert build_uv_index(params).computed == 1
    after = open_features(tmp_path / "uv")["scene0000_00/frame_000001"]["uv_idx"]
    assert not np.array_equal(before, after)
    [piece] = UvIndexJob(params).load("scene0000_00/frame_000001")
    np.testing.assert_array_equal(after, piece.arrays["uv_idx"])
    scene1 = scannet_root / "scans" / "scene0001_00"             # a cloud: its scene's frames
    write_ply(scene1 / "scene0001_00_vh_clean_2.ply", scene_points(seed=1), "ascii")
    assert build_uv_index(params).computed == 2
    (scene0 / "intrinsic" / "intrinsic_depth.txt").write_text(            # same bytes: nothing
        (scene0 / "intrinsic" / "intrinsic_depth.txt").read_text())
    assert build_uv_index(params).computed == 0


def test_gzip_compression_stores_the_same_arrays_in_smaller_files(scannet_root, tmp_path,
                                                                 monkeypatch):
    sizes, shard_sizes, arrays = {}, {}, {}
    for comp in ("none", "gzip"):
        work = tmp_path / comp
        work.mkdir()
        monkeypatch.chdir(work)
        build_uv_index(make_params(scannet_root, work, max_failures=0.5, compression=comp,
                                   layout="npz"))
        frame = work / "uv" / "scene0001_00" / "frame_000001.npz"
        sizes[comp] = frame.stat().st_size
        shard_sizes[comp] = sum(p.stat().st_size for p in (work / "uv/shards").glob("*.h5"))
        with np.load(frame) as npz:
            arrays[comp] = {k: npz[k] for k in npz.files}
        stored = open_features(work / "uv")["scene0001_00/frame_000001"]
        for key, value in arrays[comp].items():
            np.testing.assert_array_equal(stored[key], value)
    assert sizes["gzip"] < sizes["none"] and shard_sizes["gzip"] < shard_sizes["none"]
    assert arrays["gzip"].keys() == arrays["none"].keys()
    for key in arrays["none"]:
        np.testing.assert_array_equal(arrays["gzip"][key], arrays["none"][key])


@pytest.mark.parametrize("layout", ["shards", "npz"])
def test_verify_checks_pass_on_both_layouts_and_catch_wrong_data(scannet_root, tmp_path,
                                                                  monkeypatch, layout):
    monkeypatch.chdir(tmp_path)
    build_uv_index(make_params(scannet_root, tmp_path, max_failures=0.5, layout=layout))
    out, metrics = tmp_path / "uv", Path("metrics/build_uv_index.json")
    report = Report()
    check_uv_index(report, out, metrics, 1.0)
    assert not report.failed, report.to_json([])
    assert report.checks["uv_index.coverage"].items == 10
    assert ("uv_index.npz_view" in report.checks) == (layout == "npz")
    picture = uv_picture(out, tmp_path / "no_point_feats")   # colour | depth, points drawn
    assert picture.ndim == 3 and picture.shape[1] == 2 * 2 * COLOR_SIZE[0]
    if layout == "npz":                           # a per-frame file that is not the shards'
        frame = out / "scene0000_00" / "frame_000001.npz"
        with np.load(frame) as npz:
            changed = {k: npz[k] for k in npz.files}
        changed["conf_2d"] = np.ones_like(changed["conf_2d"])
        np.savez(frame, **changed)
        report = Report()
        check_uv_index(report, out, metrics, 1.0)
        assert report.failed == ["uv_index.npz_view"]
    keys, shard, row, names, _ = read_index(out)      # a record with a bad re-projection
    i = keys.index("scene0001_00/frame_000000")
    with h5py.File(out / "shards" / names[shard[i]], "r+") as f:
        f["reproj_err_px"][row[i]] = 1.5
    report = Report()
    check_uv_index(report, out, metrics, 1.0)
    assert "uv_index.reprojection" in report.failed


def test_stage_bad_scannet_path_fails_before_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ParamError, match="build_uv_index.scannet"):
        build_uv_index(make_params(tmp_path / "nowhere", tmp_path))
    assert not (tmp_path / "uv").exists()


def test_stage_on_the_embedded_sample(tmp_path, monkeypatch):
    """The sample generator's ScanNet scenes: exact geometry, one -inf pose, a depth hole."""
    manifest = generate_sample(tmp_path / "sample", seed=0)["scannet"]
    monkeypatch.chdir(tmp_path)
    params = make_params(tmp_path / "sample" / "scannet", tmp_path,
                         scenes="scannetv2_sample.txt", max_failures=0.5)
    result = build_uv_index(params)
    bad = manifest["invalid_pose"]
    assert [(f.item, f.error) for f in result.failures] == [
        (f"{bad['scene']}/frame_{bad['frame']:06d}", "bad_pose")]
    assert result.records == sum(manifest["frames"].values()) - 1
    metrics = json.loads((tmp_path / "metrics" / "build_uv_index.json").read_text())
    assert metrics["reprojection_max_px"] < 1.0
    hole = manifest["missing_depth"]
    scene_dir = tmp_path / "sample" / "scannet" / "scans" / hole["scene"]
    frame = read_frame(scene_dir, str(hole["frame"]), 1000.0)
    record = open_features(tmp_path / "uv")[f"{hole['scene']}/frame_{hole['frame']:06d}"]
    valid, conf = record["valid"], record["conf_2d"]
    points = scannet.read_point_cloud(scene_dir / f"{hole['scene']}_vh_clean_2.ply")
    d_uv = geometry.camera_to_pixels(geometry.world_to_camera(points, frame.pose), frame.k_depth)
    x0, y0, x1, y1 = hole["box_xyxy"]
    in_hole = valid & (np.rint(d_uv[:, 0]) >= x0) & (np.rint(d_uv[:, 0]) < x1) \
        & (np.rint(d_uv[:, 1]) >= y0) & (np.rint(d_uv[:, 1]) < y1)
    assert in_hole.any() and (conf[in_hole] == 0).all()       # unknown depth -> conf 0
    assert conf[valid & ~in_hole].mean() > 0.3
