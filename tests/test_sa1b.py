"""SA-1B folder reading: listing, JSON parsing, image sizes and RLE decoding (generated data)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from featcache.datasets.images import find_duplicate_keys
from featcache.datasets.sa1b import (Sa1bError, decode_rle, iter_instance_masks,
                            json_path_for, list_sa1b_images, read_image_size, read_sa1b_json,
                            rle_counts_from_string)


def fortran_runs(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO run lengths of ``mask`` (column-major, first run counts zeros)."""
    flat = mask.flatten(order="F")
    bounds = np.concatenate(([0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]))
    runs = [int(r) for r in np.diff(bounds)]
    return [0, *runs] if flat[0] == 1 else runs


def compressed(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def write_item(folder: Path, stem: str, height: int, width: int, segmentations: list) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    image = folder / f"{stem}.png"
    Image.new("RGB", (width, height), (40, 80, 120)).save(image)
    anns = [{"id": i, "segmentation": s, "bbox": [0, 0, 1, 1], "area": 1} for i, s in
            enumerate(segmentations)]
    doc = {"image": {"image_id": 1, "width": width, "height": height, "file_name": image.name},
           "annotations": anns}
    json_path_for(image).write_text(json.dumps(doc))
    return image


def test_compressed_string_parser_matches_pycocotools_runs() -> None:
    rng = np.random.default_rng(0)
    for _ in range(100):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        mask = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        runs = rle_counts_from_string(compressed(mask)["counts"])
        assert runs.tolist() == fortran_runs(mask)
    big = np.zeros((900, 1300), np.uint8)
    big[100:700, 50:1200] = 1  # runs > 2**15 need multi-character values and deltas
    assert rle_counts_from_string(compressed(big)["counts"]).tolist() == fortran_runs(big)


def test_decode_both_count_kinds_row_major() -> None:
    mask = np.zeros((7, 11), np.uint8)
    mask[1:4, 2:9] = 1
    mask[6, 0] = 1  # asymmetric, so a transposed decode would differ
    from_string = decode_rle(compressed(mask), 7, 11)
    from_list = decode_rle({"size": [7, 11], "counts": fortran_runs(mask)}, 7, 11)
    for decoded in (from_string, from_list):
        assert decoded.shape == (7, 11) and decoded.dtype == np.uint8
        np.testing.assert_array_equal(decoded, mask)


@pytest.mark.parametrize("segmentation, code", [
    ({"size": [5, 6], "counts": "5"}, "bad_rle"),                # runs cover 5 of 30 pixels
    ({"size": [5, 6], "counts": "7Y"}, "bad_rle"),               # truncated value
    ({"size": [5, 6], "counts": "~~~"}, "bad_rle"),              # outside the alphabet
    ({"size": [5, 6], "counts": [10, 30]}, "bad_rle"),           # 40 pixels
    ({"size": [5, 6], "counts": [40, -10]}, "bad_rle"),          # negative run
    ({"size": [5, 6], "counts": [10.5, 19.5]}, "bad_rle"),
    ({"size": [5, 6], "counts": None}, "bad_rle"),
    ({"size": [5], "counts": [30]}, "bad_rle"),
    ([[0, 0, 3, 0, 3, 3]], "bad_rle"),                           # a polygon, not an RLE
    ({"size": [6, 5], "counts": [30]}, "size_mismatch"),
])
def test_decode_rejects_bad_rle(segmentation: object, code: str) -> None:
    with pytest.raises(Sa1bError) as info:
        decode_rle(segmentation, 5, 6)
    assert info.value.code == code


def test_list_images_sorted_flat_and_duplicates(tmp_path: Path) -> None:
    for name in ["sa_2.jpg", "sa_10.PNG", "sa_1.jpg", "sa_1.png", "sa_1.json", "notes.txt",
                 "._sa_4.jpg"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "sa_3.jpg").write_bytes(b"x")
    paths = list_sa1b_images(tmp_path)
    assert [p.name for p in paths] == ["sa_1.jpg", "sa_1.png", "sa_10.PNG", "sa_2.jpg"]
    assert find_duplicate_keys([p.name for p in paths]) == {"sa_1.png": "sa_1.jpg"}
    with pytest.raises(NotADirectoryError, match="nowhere"):
        list_sa1b_images(tmp_path / "nowhere")


def test_read_json_and_iterate_masks(tmp_path: Path) -> None:
    a = np.zeros((6, 8), np.uint8)
    a[1:3, 1:4] = 1
    b = np.zeros((6, 8), np.uint8)
    b[4:, 5:] = 1
    image = write_item(tmp_path, "sa_1", 6, 8, [compressed(a),
                                               {"size": [6, 8], "counts": fortran_runs(b)}])
    record = read_sa1b_json(json_path_for(image))
    assert (record.height, record.width, record.image_id) == (6, 8, 1)
    masks = list(iter_instance_masks(record))
    assert len(masks) == 2
    np.testing.assert_array_equal(masks[0], a)
    np.testing.assert_array_equal(masks[1], b)


def test_bad_mask_names_the_annotation(tmp_path: Path) -> None:
    image = write_item(tmp_path, "sa_1", 6, 8, [{"size": [6, 8], "counts": [1, 2]}])
    with pytest.raises(Sa1bError, match="annotation 0") as info:
        list(iter_instance_masks(read_sa1b_json(json_path_for(image))))
    assert info.value.code == "bad_rle"


@pytest.mark.parametrize("text, code", [
    (None, "missing_file"),
    ("{not json", "bad_json"),
    ("[1, 2]", "bad_json"),
    ('{"image": {"width": 4}, "annotations": []}', "bad_json"),
    ('{"image": {"width": 4, "height": 0}, "annotations": []}', "bad_json"),
    ('{"image": {"width": 4, "height": 3}, "annotations": {}}', "bad_json"),
    ('{"image": {"width": 4, "height": 3}, "annotations": [5]}', "bad_json"),
])
def test_read_json_failures(tmp_path: Path, text: str | None, code: str) -> None:
    path = tmp_path / "sa_1.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(Sa1bError) as info:
        read_sa1b_json(path)
    assert info.value.code == code


def test_read_image_size_applies_exif_rotation(tmp_path: Path) -> None:
    plain, rotated = tmp_path / "plain.jpg", tmp_path / "rotated.jpg"
    Image.new("RGB", (30, 20)).save(plain)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed: upright size is 30 x 20 (HxW)
    Image.new("RGB", (30, 20)).save(rotated, exif=exif)
    assert read_image_size(plain) == (20, 30)
    assert read_image_size(rotated) == (30, 20)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(Sa1bError) as info:
        read_image_size(broken)
    assert info.value.code == "bad_image"
