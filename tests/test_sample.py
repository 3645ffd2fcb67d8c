"""The embedded sample: layout, well-formedness, exact geometry and determinism."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from featcache.datasets.images import ImageDecodeError, load_image
from featcache.sample import generate_sample, load_manifest

SEED = 3


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("raw") / "sample"
    return out, generate_sample(out, SEED)


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


# ---------------------------------------------------------------- layout and manifest


def test_layout_and_manifest(sample: tuple[Path, dict]) -> None:
    root, manifest = sample
    for rel in ["coco/val2017", "coco/annotations/panoptic_val2017.json",
                "coco/annotations/panoptic_val2017", "sa1b", "scannet/scannetv2_sample.txt",
                "scannet/scans/scene0000_00/intrinsic/intrinsic_color.txt", "images",
                "MANIFEST.json"]:
        assert (root / rel).exists(), rel
    assert load_manifest(root) == manifest
    assert manifest["seed"] == SEED
    on_disk = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                     if p.is_file() and p.name != "MANIFEST.json")
    assert manifest["files"] == on_disk
    assert not list(root.parent.glob(".*partial"))


# ---------------------------------------------------------------- COCO panoptic


def _panoptic_ids(png: Path) -> np.ndarray:
    rgb = _pixels(png).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 ** 2 * rgb[..., 2]


def test_coco_json_schema_and_files(sample: tuple[Path, dict]) -> None:
    root, manifest = sample
    data = json.loads((root / "coco/annotations/panoptic_val2017.json").read_text())
    assert 8 <= len(data["images"]) <= 12
    cats = {c["id"]: c for c in data["categories"]}
    assert all(set(c) >= {"id", "name", "supercategory", "isthing"} for c in cats.values())
    assert {c["isthing"] for c in cats.values()} == {0, 1}
    by_id = {im["id"]: im for im in data["images"]}
    assert len(by_id) == len(data["annotations"]) == manifest["coco"]["images"]
    aspects = set()
    for ann in data["annotations"]:
        im = by_id[ann["image_id"]]
        assert im["file_name"] == f"{im['id']:012d}.jpg"
        assert ann["file_name"] == f"{im['id']:012d}.png"
        with Image.open(root / "coco/val2017" / im["file_name"]) as jpg:
            assert jpg.format == "JPEG" and jpg.size == (im["width"], im["height"])
        assert 140 <= min(im["width"], im["height"]) and max(im["width"], im["height"]) <= 320
        aspects.add(round(im["width"] / im["height"], 2))
        assert 1 <= len(ann["segments_info"]) <= 16
        for seg in ann["segments_info"]:
            assert set(seg) == {"id", "category_id", "area", "bbox", "iscrowd"}
            assert seg["category_id"] in cats
    assert len(aspects) >= 3


def test_coco_png_ids_area_and_bbox_match_json(sample: tuple[Path, dict]) -> None:
    root, manifest = sample
    data = json.loads((root / "coco/annotations/panoptic_val2017.json").read_text())
    absent = manifest["coco"]["absent_segment"]
    seen_absent = crowd = 0
    tiny_areas = []
    for ann in data["annotations"]:
        ids = _panoptic_ids(root / "coco/annotations/panoptic_val2017" / ann["file_name"])
        png_ids = set(np.unique(ids).tolist()) - {0}
        json_ids = {s["id"] for s in ann["segments_info"]}
        assert png_ids <= json_ids
        missing = json_ids - png_ids
        if ann["image_id"] == absent["image_id"]:
            assert missing == {absent["segment_id"]}
            seen_absent += 1
        else:
            assert not missing
        for seg in ann["segments_info"]:
            crowd += seg["iscrowd"]
            if seg["id"] in missing:
                assert seg["area"] == absent["json_area"] > 0
                continue
            mask = ids == seg["id"]
            ys, xs = np.nonzero(mask)
            assert seg["area"] == int(mask.sum())
            assert seg["bbox"] == [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                                   int(ys.max() - ys.min() + 1)]
            tiny_areas.append(seg["area"])
    assert seen_absent == 1 and crowd == 1
    assert min(tiny_areas) == manifest["coco"]["tiny_segment"]["area"] < 10


def test_coco_ids_use_all_three_channels(sample: tuple[Path, dict]) -> None:
    root, _ = sample
    data = json.loads((root / "coco/annotations/panoptic_val2017.json").read_text())
    ids = [s["id"] for a in data["annotations"] for s in a["segments_info"]]
    assert max(ids) >= 256 ** 2 and len(set(ids)) == len(ids)


# ---------------------------------------------------------------- SA-1B


def test_sa1b_json_and_rle_decode_to_area(sample: tuple[Path, dict]) -> None:
    from pycocotools import mask as mask_utils

    root, manifest = sample
    jsons = sorted((root / "sa1b").glob("sa_*.json"))
    assert 4 <= len(jsons) <= 6 and len(jsons) == manifest["sa1b"]["images"]
    empty = 0
    for path in jsons:
        data = json.loads(path.read_text())
        info = data["image"]
        assert set(info) == {"image_id", "width", "height", "file_name"}
        assert info["file_name"] == path.with_suffix(".jpg").name == f"sa_{info['image_id']}.jpg"
        with Image.open(path.with_suffix(".jpg")) as jpg:
            assert jpg.size == (info["width"], info["height"])
        empty += not data["annotations"]
        for ann in data["annotations"]:
            assert set(ann) == {"id", "segmentation", "bbox", "area", "predicted_iou",
                                "stability_score", "point_coords", "crop_box"}
            seg = ann["segmentation"]
            assert seg["size"] == [info["height"], info["width"]]
            assert isinstance(seg["counts"], str)
            mask = mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()})
            assert int(mask.sum()) == ann["area"] > 0
            assert ann["bbox"] == [float(v) for v in mask_utils.toBbox(
                {"size": seg["size"], "counts": seg["counts"].encode()})]
            (x, y), = ann["point_coords"]
            assert mask[int(y), int(x)] == 1
    assert empty == 1


# ---------------------------------------------------------------- ScanNet geometry


def _matrix(path: Path) -> np.ndarray:
    return np.loadtxt(path).reshape(4, 4)


def _scene(root: Path, scene: str) -> dict[str, Any]:
    d = root / "scannet/scans" / scene
    n = len(list((d / "color").glob("*.jpg")))
    return {"dir": d, "n": n, "k_depth": _matrix(d / "intrinsic/intrinsic_depth.txt"),
            "k_color": _matrix(d / "intrinsic/intrinsic_color.txt"),
            "poses": [_matrix(d / f"pose/{i}.txt") for i in range(n)],
            "depth": [_pixels(d / f"depth/{i}.png") for i in range(n)]}


def test_scannet_files_well_formed(sample: tuple[Path, dict]) -> None:
    root, manifest = sample
    scenes = (root / "scannet/scannetv2_sample.txt").read_text().split()
    assert scenes == ["scene0000_00", "scene0001_00"]
    for name in scenes:
        s = _scene(root, name)
        assert 6 <= s["n"] <= 10 and s["n"] == manifest["scannet"]["frames"][name]
        for i in range(s["n"]):
            assert _pixels(s["dir"] / f"color/{i}.jpg").shape == (240, 320, 3)
            assert s["depth"][i].dtype == np.uint16 and s["depth"][i].shape == (120, 160)
        for k, (w, h) in ((s["k_color"], (320, 240)), (s["k_depth"], (160, 120))):
            assert k[0, 0] == k[1, 1] and abs(k[0, 2] - w / 2) < 1 and abs(k[1, 2] - h / 2) < 1
        for ext in ("extrinsic_color.txt", "extrinsic_depth.txt"):
            np.testing.assert_array_equal(_matrix(s["dir"] / "intrinsic" / ext), np.eye(4))
        finite = [np.isfinite(p).all() for p in s["poses"]]
        if name == "scene0000_00":
            bad = manifest["scannet"]["invalid_pose"]["frame"]
            assert finite.count(False) == 1 and not finite[bad]
            assert np.isneginf(s["poses"][bad]).all()
        else:
            assert all(finite)
        for pose in (p for p, ok in zip(s["poses"], finite) if ok):
            np.testing.assert_allclose(pose[:3, :3] @ pose[:3, :3].T, np.eye(3), atol=1e-5)
    info = manifest["scannet"]["missing_depth"]
    x0, y0, x1, y1 = info["box_xyxy"]
    assert (_scene(root, info["scene"])["depth"][info["frame"]][y0:y1, x0:x1] == 0).all()


def _backproject(k: np.ndarray, pose: np.ndarray, u: np.ndarray, v: np.ndarray,
                 z: np.ndarray) -> np.ndarray:
    """Pixel (u, v) at camera depth z (metres) -> world points (N, 3)."""
    cam = np.stack([(u - k[0, 2]) / k[0, 0] * z, (v - k[1, 2]) / k[1, 1] * z, z], axis=1)
    return cam @ pose[:3, :3].T + pose[:3, 3]


def _project(points: np.ndarray, k: np.ndarray, pose: np.ndarray) -> tuple[np.ndarray, ...]:
    cam = (points - pose[:3, 3]) @ np.linalg.inv(pose[:3, :3]).T
    z = cam[:, 2]
    return k[0, 0] * cam[:, 0] / z + k[0, 2], k[1, 1] * cam[:, 1] / z + k[1, 2], z


def _inverse_depth_at(depth_m: np.ndarray, u: np.ndarray, v: np.ndarray,
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear inverse depth at sub-pixel (u, v) (exact on a plane); ok = one surface."""
    h, w = depth_m.shape
    u0, v0 = np.floor(u).astype(int), np.floor(v).astype(int)
    ok = (u0 >= 0) & (v0 >= 0) & (u0 < w - 1) & (v0 < h - 1)
    u0, v0 = np.clip(u0, 0, w - 2), np.clip(v0, 0, h - 2)
    quad = np.stack([depth_m[v0, u0], depth_m[v0, u0 + 1], depth_m[v0 + 1, u0],
                     depth_m[v0 + 1, u0 + 1]], axis=1)
    ok &= (quad.min(axis=1) > 0) & (quad.max(axis=1) < quad.min(axis=1) * 1.01)
    inv = 1.0 / np.where(quad > 0, quad, 1.0)
    fu, fv = u - u0, v - v0
    top = inv[:, 0] * (1 - fu) + inv[:, 1] * fu
    bottom = inv[:, 2] * (1 - fu) + inv[:, 3] * fu
    return 1.0 / (top * (1 - fv) + bottom * fv), ok


@pytest.mark.parametrize("scene", ["scene0000_00", "scene0001_00"])
def test_depth_reprojects_across_frames_within_one_pixel(sample: tuple[Path, dict],
                                                         scene: str) -> None:
    """Depth pixel of frame a -> world -> frame b (its own depth) -> world -> frame a."""
    s = _scene(sample[0], scene)
    k = s["k_depth"]
    valid = [i for i in range(s["n"]) if np.isfinite(s["poses"][i]).all()]
    errors = []
    for a, b in zip(valid, valid[1:]):
        d_a = s["depth"][a].astype(np.float64) / 1000.0
        v, u = np.nonzero(d_a > 0)
        world = _backproject(k, s["poses"][a], u.astype(float), v.astype(float), d_a[v, u])
        ub, vb, zb = _project(world, k, s["poses"][b])
        z_obs, ok = _inverse_depth_at(s["depth"][b].astype(np.float64) / 1000.0, ub, vb)
        ok &= np.abs(z_obs - zb) < 0.01  # visible in b, not occluded
        assert ok.mean() > 0.3
        back = _backproject(k, s["poses"][b], ub[ok], vb[ok], z_obs[ok])
        ua, va, _ = _project(back, k, s["poses"][a])
        errors.append(np.hypot(ua - u[ok], va - v[ok]))
    err = np.concatenate(errors)
    assert np.median(err) < 0.1 and err.max() < 1.0, np.quantile(err, [0.5, 0.99, 1.0])


def _read_ply(path: Path) -> np.ndarray:
    """A generic binary-little-endian PLY vertex reader (header-driven)."""
    data = path.read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    header = data[:end].decode("ascii").splitlines()
    assert header[0] == "ply" and header[1] == "format binary_little_endian 1.0"
    types = {"float": "<f4", "uchar": "u1", "int": "<i4", "double": "<f8"}
    fields, count, in_vertex = [], 0, False
    for line in header:
        parts = line.split()
        if parts[0] == "element":
            in_vertex = parts[1] == "vertex"
            count = int(parts[2]) if in_vertex else count
        elif parts[0] == "property" and in_vertex:
            fields.append((parts[2], types[parts[1]]))
    return np.frombuffer(data, np.dtype(fields), count=count, offset=end)


@pytest.mark.parametrize("scene", ["scene0000_00", "scene0001_00"])
def test_point_cloud_lies_on_the_depth_surfaces(sample: tuple[Path, dict], scene: str) -> None:
    root, manifest = sample
    s = _scene(root, scene)
    ply = _read_ply(s["dir"] / f"{scene}_vh_clean_2.ply")
    assert len(ply) == manifest["scannet"]["points"][scene] > 2000
    assert {"x", "y", "z", "red", "green", "blue"} <= set(ply.dtype.names)
    pts = np.stack([ply["x"], ply["y"], ply["z"]], axis=1).astype(np.float64)
    agree = seen = 0
    for i in (i for i in range(s["n"]) if np.isfinite(s["poses"][i]).all()):
        depth = s["depth"][i].astype(np.float64) / 1000.0
        u, v, z = _project(pts, s["k_depth"], s["poses"][i])
        ui, vi = np.round(u).astype(int), np.round(v).astype(int)
        inside = (z > 0.1) & (ui >= 1) & (vi >= 1) & (ui < 159) & (vi < 119)
        ui, vi, z = ui[inside], vi[inside], z[inside]
        near = np.stack([depth[vi + dv, ui + du] for dv in (-1, 0, 1) for du in (-1, 0, 1)])
        near = np.where(near > 0, near, np.inf).min(axis=0)  # 0 = no depth measured
        measured = np.isfinite(near)
        assert not (z < near - 0.01)[measured].any()  # no point floats in front of surfaces
        agree += int((np.abs(z - depth[vi, ui]) < 0.01).sum())
        seen += int(inside.sum())
    assert agree > 0.3 * seen > 0


# ---------------------------------------------------------------- image folder


def test_image_folder_decodes_as_described(sample: tuple[Path, dict]) -> None:
    root, manifest = sample
    info = manifest["images"]
    folder = root / "images"
    stems = [p.stem for p in folder.iterdir()]
    assert len(stems) == len(set(stems)) == len(info["files"])
    suffixes = {p.suffix for p in folder.iterdir()}
    assert {".jpg", ".png", ".webp", ".bmp", ".tiff"} <= suffixes
    decoded = {}
    for name in info["files"]:
        if name in info["corrupt"]:
            with pytest.raises(ImageDecodeError):
                load_image(folder / name)
            continue
        decoded[name] = load_image(folder / name)
    modes = {img.source_mode for img in decoded.values()}
    assert {"RGB", "RGBA", "L", "I;16", "P", "CMYK"} <= modes
    for name in info["alpha"]:
        alpha = decoded[name].alpha
        assert alpha is not None and alpha.min() == 0 and alpha.max() == 255
    gray16 = decoded[info["sixteen_bit"]]
    assert gray16.rgb.max() == 255 and len(np.unique(gray16.rgb)) > 100
    rot = info["exif_rotated"]
    with Image.open(folder / rot["file"]) as raw:
        assert raw.getexif()[0x0112] == rot["orientation"] != 1
        assert list(raw.size) == rot["stored_size"]
    img = decoded[rot["file"]]
    assert list(img.size) == rot["displayed_size"]
    r, g, b = img.rgb[:12, :12].reshape(-1, 3).mean(axis=0)
    assert r > 180 and g < 70 and b < 70


# ---------------------------------------------------------------- determinism


def _decoded_arrays(root: Path) -> dict[str, np.ndarray]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix in {".jpg", ".png", ".webp", ".bmp", ".tiff"}:
            try:
                out[p.relative_to(root).as_posix()] = load_image(p).rgb
            except ImageDecodeError:
                out[p.relative_to(root).as_posix()] = np.frombuffer(p.read_bytes(), np.uint8)
        elif p.is_file():
            out[p.relative_to(root).as_posix()] = np.frombuffer(p.read_bytes(), np.uint8)
    return out


def test_same_seed_identical_other_seed_different(sample: tuple[Path, dict],
                                                  tmp_path: Path) -> None:
    root, manifest = sample
    again = generate_sample(tmp_path / "again", SEED)
    assert again == manifest
    first, second = _decoded_arrays(root), _decoded_arrays(tmp_path / "again")
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)
        assert (root / key).read_bytes() == (tmp_path / "again" / key).read_bytes(), key
    other = generate_sample(tmp_path / "other", SEED + 1)
    assert other["coco"] != manifest["coco"]


def test_refuses_to_replace_a_folder_that_is_not_a_sample(tmp_path: Path) -> None:
    precious = tmp_path / "data"
    precious.mkdir()
    (precious / "thesis.tex").write_text("x")
    with pytest.raises(FileExistsError, match="refusing"):
        generate_sample(precious, 0)
    assert (precious / "thesis.tex").exists()
