"""Method-B edge maps: hand-drawn masks, params validation, and full stage runs on tmp folders
(sharded output, the npz layout, reuse, verify's checks and picture)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from PIL import Image
from pycocotools import mask as mask_utils

from featcache.verify.checks import Report
from featcache.verify.npz_checks import check_edges
from featcache.config import ParamError, build_dataclass, load_stage_params
from featcache.stages.edge_maps_methodB import (EdgeParams, compute_image_edges, edge_item_bytes,
                             edge_map_method_b, resize_edge_map, run_edge_maps)
from featcache.engine import TooManyFailures
from featcache.engine.shards import SHARDS_DIR, read_index
from featcache.verify.pictures import edges_picture
from featcache.reader import open_features

SECTION = "edge_maps_methodB"


def rle(mask: np.ndarray) -> dict:
    """Compressed COCO RLE of a ``(H, W)`` 0/1 mask, as SA-1B stores it."""
    enc = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in enc["size"]], "counts": enc["counts"].decode("ascii")}


def write_item(folder: Path, stem: str, masks: list[np.ndarray], shape: tuple[int, int],
               segmentations: list | None = None) -> Path:
    """Write ``<stem>.png`` and ``<stem>.json`` (SA-1B layout) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    image = folder / f"{stem}.png"
    Image.new("RGB", (shape[1], shape[0]), (90, 60, 30)).save(image)
    segs = segmentations if segmentations is not None else [rle(m) for m in masks]
    doc = {"image": {"image_id": 7, "width": shape[1], "height": shape[0],
                     "file_name": image.name},
           "annotations": [{"id": i, "segmentation": s} for i, s in enumerate(segs)]}
    (folder / f"{stem}.json").write_text(json.dumps(doc))
    return image


def square(shape: tuple[int, int], top: int, left: int, bottom: int, right: int) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    mask[top:bottom, left:right] = 1
    return mask


def test_square_edge_is_a_band_around_the_boundary() -> None:
    edge = edge_map_method_b([square((20, 20), 5, 5, 10, 10)], (20, 20), 3)
    expected = np.zeros((20, 20), bool)
    expected[4:11, 4:11] = True   # dilation: one pixel outside the square
    expected[6:9, 6:9] = False    # erosion: the square's interior stays inside
    assert edge.dtype == bool
    np.testing.assert_array_equal(edge, expected)
    assert edge.sum() == 49 - 9


def test_kernel_five_widens_the_band() -> None:
    edge = edge_map_method_b([square((20, 20), 5, 5, 12, 12)], (20, 20), 5)
    expected = np.zeros((20, 20), bool)
    expected[3:14, 3:14] = True
    expected[7:10, 7:10] = False
    np.testing.assert_array_equal(edge, expected)


def test_touching_instances_keep_their_shared_border() -> None:
    left = square((16, 16), 4, 2, 12, 8)
    right = square((16, 16), 4, 8, 12, 14)
    edge = edge_map_method_b([left, right], (16, 16), 3)
    assert edge[4:12, 7:9].all()  # columns 7 and 8 meet: both sides are edge
    union = edge_map_method_b([left | right], (16, 16), 3)
    assert not union[6:10, 7:9].any()  # the union alone has no edge there
    np.testing.assert_array_equal(edge, union | edge_map_method_b([left], (16, 16), 3)
                                  | edge_map_method_b([right], (16, 16), 3))


def test_image_border_is_not_an_edge() -> None:
    edge = edge_map_method_b([square((10, 12), 0, 0, 4, 12)], (10, 12), 3)
    expected = np.zeros((10, 12), bool)
    expected[3:5] = True  # only the inner boundary rows 3 (inside) and 4 (outside)
    np.testing.assert_array_equal(edge, expected)
    assert not edge_map_method_b([np.ones((5, 5), np.uint8)], (5, 5), 3).any()


@pytest.mark.parametrize("kernel_size", [3, 5, 7])
def test_bbox_crop_equals_full_image_gradient(kernel_size: int) -> None:
    rng = np.random.default_rng(kernel_size)
    kernel = np.ones((kernel_size, kernel_size), np.uint8)
    for _ in range(20):
        shape = (int(rng.integers(8, 40)), int(rng.integers(8, 40)))
        masks = []
        for _ in range(3):
            y, x = rng.integers(0, shape[0]), rng.integers(0, shape[1])
            h, w = rng.integers(1, 15, 2)
            masks.append(square(shape, y, x, y + h, x + w) & (rng.random(shape) < 0.9))
        full = np.zeros(shape, bool)
        for m in masks:
            full |= cv2.morphologyEx(m, cv2.MORPH_GRADIENT, kernel) > 0
        np.testing.assert_array_equal(edge_map_method_b(masks, shape, kernel_size), full)
        fortran = [np.asfortranarray(m) for m in masks]  # how pycocotools returns masks
        np.testing.assert_array_equal(edge_map_method_b(fortran, shape, kernel_size), full)


def test_resize_marks_every_cell_touching_an_edge() -> None:
    edge = edge_map_method_b([square((20, 20), 5, 5, 10, 10)], (20, 20), 3)
    small = resize_edge_map(edge, 10)
    assert small.dtype == np.uint8 and small.shape == (10, 10)
    np.testing.assert_array_equal(small, edge.reshape(10, 2, 10, 2).any(axis=(1, 3)))
    single = np.zeros((30, 30), bool)
    single[29, 0] = True  # one pixel still shows up after a non-integer downscale
    resized = resize_edge_map(single, 7)
    assert resized[6, 0] == 1 and resized.sum() == 1


def test_compute_fields_and_empty_annotations(tmp_path: Path) -> None:
    shape = (24, 40)
    image = write_item(tmp_path, "sa_1", [square(shape, 3, 3, 9, 30)], shape)
    empty = write_item(tmp_path, "sa_2", [], shape)
    fields = compute_image_edges(image, 3, (16, 8))
    assert sorted(fields) == ["edge_16x16", "edge_8x8", "edge_flag", "edge_version"]
    assert fields["edge_16x16"].dtype == np.uint8 and fields["edge_16x16"].shape == (16, 16)
    assert set(np.unique(fields["edge_16x16"])) == {0, 1}
    assert fields["edge_flag"] == 1 and str(fields["edge_version"]) == "B_v1"
    zeros = compute_image_edges(empty, 3, (16, 8))
    assert not zeros["edge_16x16"].any() and not zeros["edge_8x8"].any()
    assert zeros["edge_flag"] == 1


def params_for(tmp_path: Path, **overrides: object) -> EdgeParams:
    values = {"sa1b": str(tmp_path / "sa1b"), "out": str(tmp_path / "edges"),
              "sizes": [32, 8], "num_workers": 0, "batch_size": 4, **overrides}
    return build_dataclass(EdgeParams, values, prefix=SECTION)


@pytest.mark.parametrize("key, value", [
    ("kernel_size", 1), ("kernel_size", 4), ("kernel_size", "3"), ("sizes", []),
    ("sizes", [64, 0]), ("sizes", [64, 64]), ("sizes", 64), ("sa1b", ""), ("max_failures", -1),
    ("compression", "lzf"), ("layout", "hdf5"),
])
def test_bad_params_name_the_key(tmp_path: Path, key: str, value: object) -> None:
    with pytest.raises(ParamError, match=rf"^{SECTION}\.{key}"):
        params_for(tmp_path, **{key: value})


def test_repository_params_section_is_valid() -> None:
    """Whatever is committed loads, with its input folder under the top-level ``data``."""
    path = Path(__file__).resolve().parents[1] / "params.yaml"
    _, params = load_stage_params(SECTION, EdgeParams, path)
    raw = yaml.safe_load(path.read_text())
    section = raw[SECTION]
    assert (params.kernel_size, list(params.sizes)) == (section["kernel_size"], section["sizes"])
    assert params.sa1b == (Path(raw.get("data", ".")) / section["sa1b"]).as_posix()


def test_missing_input_folder_fails_before_work(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ParamError, match=rf"{SECTION}\.sa1b"):
        run_edge_maps(params_for(tmp_path))
    assert not (tmp_path / "edges").exists()


def write_dataset(folder: Path) -> None:
    shape = (48, 64)
    a, b = square(shape, 5, 5, 20, 30), square(shape, 20, 5, 40, 30)
    write_item(folder, "sa_1", [a, b], shape)
    write_item(folder, "sa_2", [], shape)
    write_item(folder, "sa_3", [], shape, [{"size": [48, 64], "counts": "garbage"}])
    write_item(folder, "sa_4", [a], shape, [{"size": [48, 64], "counts": [3071, 1]}])
    write_item(folder, "sa_5", [square((48, 60), 1, 1, 9, 9)], (48, 60))
    (folder / "sa_5.png").unlink()
    Image.new("RGB", (64, 48)).save(folder / "sa_5.png")  # JSON says 48x60, image is 48x64
    Image.new("RGB", (64, 48)).save(folder / "sa_6.png")  # no JSON
    Image.new("RGB", (64, 48)).save(folder / "sa_1.webp")  # same stem as sa_1.png


FIELDS = ["edge_32x32", "edge_8x8", "edge_flag", "edge_version"]
SMALL_SHARDS = 0.003   # MiB: about 3 images (1088 bytes each at sizes [32, 8]) a shard


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def failure_rows(out: Path) -> dict[str, str]:
    rows = (out / "failures.tsv").read_text().splitlines()
    return {r.split("\t")[1]: r.split("\t")[2] for r in rows[1:]}


def test_stage_writes_edges_and_failures(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_dataset(tmp_path / "sa1b")
    result = run_edge_maps(params_for(tmp_path, max_failures=4))
    out = tmp_path / "edges"
    assert (result.items, result.records, result.failed) == (7, 3, 4)
    assert sorted(p.name for p in out.iterdir()) == ["failures.tsv", "index.h5", "shards"]
    store = open_features(out)
    assert store.layout == "shards" and sorted(store) == ["sa_1", "sa_2", "sa_4"]
    sa_1 = store["sa_1"]
    assert sorted(sa_1) == FIELDS
    assert sa_1["edge_32x32"].dtype == np.uint8 and sa_1["edge_32x32"].shape == (32, 32)
    assert sa_1["edge_32x32"].any() and sa_1["edge_flag"] == 1
    assert sa_1["edge_flag"].dtype == np.uint8 and str(sa_1["edge_version"]) == "B_v1"
    assert open_features(out, field="edge_32x32")["sa_4"].sum() > 0  # uncompressed counts
    assert not store["sa_2"]["edge_32x32"].any() and store["sa_2"]["edge_flag"] == 1
    assert failure_rows(out) == {"sa_3.png": "bad_rle", "sa_5.png": "size_mismatch",
                                 "sa_6.png": "missing_file", "sa_1.webp": "duplicate_key"}
    assert json.loads((tmp_path / "metrics" / f"{SECTION}.json").read_text())["failed"] == 4
    prov = store.provenance
    assert prov["kernel_size"] == 3 and prov["layout"] == "shards" and prov["sizes"] == [32, 8]


def test_item_bytes_come_from_params(tmp_path: Path) -> None:
    assert edge_item_bytes(params_for(tmp_path)) == 32 * 32 + 8 * 8
    assert edge_item_bytes(params_for(tmp_path, sizes=[256, 64, 32])) == 256**2 + 64**2 + 32**2


def test_failure_budget_raises_after_writing(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_dataset(tmp_path / "sa1b")
    with pytest.raises(TooManyFailures):
        run_edge_maps(params_for(tmp_path, max_failures=1))
    assert "sa_1" in open_features(tmp_path / "edges")
    assert (tmp_path / "edges" / "failures.tsv").is_file()


@pytest.mark.parametrize("layout", ["shards", "npz"])
def test_two_runs_are_byte_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     layout: str) -> None:
    monkeypatch.chdir(tmp_path)
    write_dataset(tmp_path / "sa1b")
    first, second = tmp_path / "run1" / "edges", tmp_path / "run2" / "edges"
    run_edge_maps(params_for(tmp_path, max_failures=4, out=str(first), layout=layout,
                             shard_mb=SMALL_SHARDS))
    run_edge_maps(params_for(tmp_path, max_failures=4, out=str(second), layout=layout,
                             shard_mb=SMALL_SHARDS, num_workers=2, batch_size=1))
    assert len(list((first / SHARDS_DIR).glob("*.h5"))) > 1
    files = tree_bytes(first)
    assert {"index.h5", "failures.tsv"} <= set(files)
    assert ({"provenance.json", "sa_1_edges.npz"} <= set(files)) == (layout == "npz")
    assert files == tree_bytes(second)


def test_npz_layout_writes_the_seed_files_equal_to_the_shards(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_dataset(tmp_path / "sa1b")
    shards, npz = tmp_path / "shards", tmp_path / "npz"
    run_edge_maps(params_for(tmp_path, max_failures=4, out=str(shards)))
    result = run_edge_maps(params_for(tmp_path, max_failures=4, out=str(npz), layout="npz"))
    assert result.records == 3
    assert sorted(p.name for p in npz.glob("*.npz")) == [
        "sa_1_edges.npz", "sa_2_edges.npz", "sa_4_edges.npz"]
    # the layout changes no stored bit: the same shard files
    assert tree_bytes(shards / SHARDS_DIR) == tree_bytes(npz / SHARDS_DIR)
    store = open_features(shards)
    for stem in ("sa_1", "sa_2", "sa_4"):
        with np.load(npz / f"{stem}_edges.npz", allow_pickle=False) as z:
            assert sorted(z.files) == FIELDS   # the seed's keys
            assert z["edge_flag"].dtype == np.uint8 and z["edge_flag"].shape == ()
            assert z["edge_flag"] == 1 and str(z["edge_version"]) == "B_v1"
            assert z["edge_version"].dtype.kind == "U"
            for key in FIELDS:
                assert z[key].dtype == store[stem][key].dtype
                np.testing.assert_array_equal(z[key], store[stem][key])
    prov = json.loads((npz / "provenance.json").read_text())
    assert prov["layout"] == "npz" and prov["suffix"] == "_edges"
    assert open_features(npz).provenance["layout"] == "npz"


def test_an_added_image_is_the_only_work_and_equals_a_fresh_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inc, fresh = tmp_path / "inc", tmp_path / "fresh"
    inc.mkdir(), fresh.mkdir()
    sa1b = tmp_path / "sa1b"
    write_dataset(sa1b)
    aside = tmp_path / "aside"
    aside.mkdir()
    for name in ("sa_2.png", "sa_2.json"):
        (sa1b / name).rename(aside / name)
    monkeypatch.chdir(inc)
    first = run_edge_maps(params_for(tmp_path, max_failures=4, shard_mb=SMALL_SHARDS))
    assert (first.items, first.computed, first.reused) == (6, 6, 0)
    for name in ("sa_2.png", "sa_2.json"):
        (aside / name).rename(sa1b / name)
    added = run_edge_maps(params_for(tmp_path, max_failures=4, shard_mb=SMALL_SHARDS))
    assert (added.items, added.computed, added.reused) == (7, 1, 6)
    metrics = json.loads((inc / "metrics" / f"{SECTION}.json").read_text())
    assert (metrics["computed"], metrics["reused"], metrics["items"]) == (1, 6, 7)
    assert added.shards > 1
    monkeypatch.chdir(fresh)
    run_edge_maps(params_for(tmp_path, max_failures=4, shard_mb=SMALL_SHARDS,
                             out=str(fresh / "edges")))
    assert tree_bytes(tmp_path / "edges") == tree_bytes(fresh / "edges")


def test_a_changed_json_or_duplicate_recomputes_only_that_image(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    sa1b = tmp_path / "sa1b"
    write_dataset(sa1b)
    run_edge_maps(params_for(tmp_path, max_failures=4))
    shape = (48, 64)
    write_item(sa1b, "sa_2", [square(shape, 10, 10, 30, 40)], shape)   # sa_2 gets a mask
    result = run_edge_maps(params_for(tmp_path, max_failures=4))
    assert (result.computed, result.reused) == (1, 6)
    assert open_features(tmp_path / "edges")["sa_2"]["edge_32x32"].any()
    (sa1b / "sa_1.png").unlink()   # sa_1.webp is no longer a duplicate: it is sa_1 now
    result = run_edge_maps(params_for(tmp_path, max_failures=4))
    assert (result.items, result.computed) == (6, 1)
    assert "sa_1.webp" not in failure_rows(tmp_path / "edges")
    assert "sa_1" in open_features(tmp_path / "edges")


def test_compression_changes_size_not_values(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import h5py

    monkeypatch.chdir(tmp_path)
    write_dataset(tmp_path / "sa1b")
    packed, raw = tmp_path / "gzip", tmp_path / "none"
    run_edge_maps(params_for(tmp_path, max_failures=4, out=str(packed), sizes=[256, 64],
                             layout="npz"))
    run_edge_maps(params_for(tmp_path, max_failures=4, out=str(raw), sizes=[256, 64],
                             compression="none", layout="npz"))
    for name in ("sa_1_edges.npz", "sa_2_edges.npz"):
        assert (packed / name).stat().st_size < (raw / name).stat().st_size / 5
        with np.load(packed / name) as a, np.load(raw / name) as b:
            assert a.files == b.files
            for key in a.files:
                np.testing.assert_array_equal(a[key], b[key])

    def stored(folder: Path) -> int:
        (shard,) = (folder / SHARDS_DIR).glob("*.h5")
        with h5py.File(shard) as f:
            return f["edge_256x256"].id.get_storage_size()
    assert stored(packed) < stored(raw) / 5
    a, b = open_features(packed), open_features(raw)
    assert sorted(a) == sorted(b)
    for key in a:
        for field, value in a[key].items():
            np.testing.assert_array_equal(value, b[key][field])


def verify_failed(folder: Path) -> list[str]:
    report = Report()
    check_edges(report, folder)
    assert report.checks["edges.binary"].items > 0
    return report.failed


@pytest.mark.parametrize("layout", ["shards", "npz"])
def test_verify_checks_and_picture_work_on_both_layouts(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        layout: str) -> None:
    import h5py

    monkeypatch.chdir(tmp_path)
    write_dataset(tmp_path / "sa1b")
    out = tmp_path / "edges"
    run_edge_maps(params_for(tmp_path, max_failures=4, layout=layout))
    assert verify_failed(out) == []
    picture = edges_picture(out, 2)
    assert picture is not None and picture.ndim == 3 and picture.shape[2] == 3
    keys, shard, row, names, _ = read_index(out)
    i = keys.index("sa_1")
    with h5py.File(out / SHARDS_DIR / names[int(shard[i])], "r+") as f:
        f["edge_8x8"][int(row[i]), 0, 0] = 2   # a non-binary map in the shards
    assert "edges.binary" in verify_failed(out)


def test_verify_checks_the_npz_files_of_the_npz_layout(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_dataset(tmp_path / "sa1b")
    out = tmp_path / "edges"
    run_edge_maps(params_for(tmp_path, max_failures=4, layout="npz"))
    path = out / "sa_1_edges.npz"
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["edge_8x8"][0, 0] = 2
    np.savez(path, **arrays)
    assert verify_failed(out) == ["edges.binary", "edges.npz_view"]
    path.unlink()
    report = Report()
    check_edges(report, out)
    assert report.failed == ["edges.npz_view"]
    assert "sa_1_edges.npz: missing" in report.checks["edges.npz_view"].first_problems[0]
    np.savez(out / "sa_9_edges.npz", **arrays)   # a file no image made
    report = Report()
    check_edges(report, out)
    assert any("sa_9_edges.npz: a file for a key" in p
               for p in report.checks["edges.npz_view"].first_problems)
