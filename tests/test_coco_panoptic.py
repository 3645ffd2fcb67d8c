"""Reading COCO panoptic splits: id decoding, folder layouts, malformed JSON entries.

``SplitBuilder`` (also used by test_siglip.py) writes small COCO-panoptic splits in the
official layout from label maps, with every kind of defect the readers must survive.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from featcache.datasets.coco_panoptic import (PanopticError, decode_panoptic_png, ids_to_rgb,
                                     image_key, parse_annotations, read_ids_and_image,
                                     read_panoptic_split, rgb_to_ids, segment_key)

SPLIT = "val2017"


def paint_image(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """A textured ``uint8 (H, W, 3)`` image with one base colour per label."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(30, 226, size=(int(labels.max()) % 997 + 2, 3))
    base = colours[labels % 997 % len(colours)].astype(np.int64)
    noise = rng.integers(-20, 21, size=labels.shape + (3,))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


class SplitBuilder:
    """Writes ``<root>/<split>/<id>.jpg``, ``<root>/<png_parent>/panoptic_<split>/<id>.png``
    and ``<root>/annotations/panoptic_<split>.json`` (written by :meth:`write`)."""

    def __init__(self, root: Path, split: str = SPLIT, png_parent: str = "annotations") -> None:
        self.root, self.split = root, split
        self.png_dir = root / png_parent / f"panoptic_{split}" if png_parent else \
            root / f"panoptic_{split}"
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []

    def add(self, image_id: int, labels: np.ndarray, *, segments: list[dict] | None = None,
            mode: str = "RGB", png: bool = True, png_labels: np.ndarray | None = None,
            crowd: tuple[int, ...] = ()) -> dict[str, Any]:
        """Add one image; ``segments`` defaults to one entry per non-zero label."""
        name = image_key(image_id)
        rgb = paint_image(labels, image_id)
        (self.root / self.split).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).convert(mode).save(self.root / self.split / f"{name}.jpg",
                                                quality=95)
        if png:
            self.png_dir.mkdir(parents=True, exist_ok=True)
            png_ids = labels if png_labels is None else png_labels
            Image.fromarray(ids_to_rgb(png_ids)).save(self.png_dir / f"{name}.png")
        if segments is None:
            segments = [{"id": int(s), "category_id": 1, "iscrowd": int(s in crowd),
                         "area": int((labels == s).sum())}
                        for s in np.unique(labels) if s != 0]
        h, w = labels.shape
        self.images.append({"id": image_id, "file_name": f"{name}.jpg", "width": w, "height": h})
        ann = {"image_id": image_id, "file_name": f"{name}.png", "segments_info": segments}
        self.annotations.append(ann)
        return ann

    def write(self) -> Path:
        path = self.root / "annotations" / f"panoptic_{self.split}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"images": self.images, "annotations": self.annotations,
                                    "categories": [{"id": 1, "name": "thing", "isthing": 1}]}))
        return path


def blocks(h: int = 48, w: int = 64, ids: tuple[int, ...] = (7, 300)) -> np.ndarray:
    """Left half ``ids[0]``, right half ``ids[1]`` (int64)."""
    labels = np.full((h, w), ids[0], np.int64)
    labels[:, w // 2:] = ids[1]
    return labels


def test_id_colour_round_trip_covers_all_three_channels():
    ids = np.array([[0, 1, 255, 256], [65535, 65536, 256 ** 3 - 1, 397133]], np.int64)
    rgb = ids_to_rgb(ids)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 4, 3)
    assert tuple(rgb[1, 2]) == (255, 255, 255) and tuple(rgb[0, 3]) == (0, 1, 0)
    assert tuple(rgb[1, 1]) == (0, 0, 1)
    np.testing.assert_array_equal(rgb_to_ids(rgb), ids)


def test_decode_png_gives_the_ids_that_were_painted(tmp_path):
    labels = blocks(ids=(5, 2 ** 20 + 3))
    labels[0, 0] = 0
    Image.fromarray(ids_to_rgb(labels)).save(tmp_path / "a.png")
    ids = decode_panoptic_png(tmp_path / "a.png")
    assert ids.dtype == np.int64
    np.testing.assert_array_equal(ids, labels)


@pytest.mark.parametrize("defect, code", [("missing", "missing_file"), ("grey", "bad_png"),
                                          ("truncated", "bad_png"), ("sixteen", "bad_png")])
def test_bad_pngs_raise_a_coded_error(tmp_path, defect, code):
    path = tmp_path / "x.png"
    if defect == "grey":
        Image.fromarray(np.full((8, 8), 7, np.uint8), mode="L").save(path)
    elif defect == "sixteen":
        Image.fromarray(np.full((8, 8), 700, np.uint16)).save(path)
    elif defect == "truncated":
        noisy = np.random.default_rng(0).integers(1, 256 ** 3, size=(64, 64))
        Image.fromarray(ids_to_rgb(noisy)).save(path)
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    with pytest.raises(PanopticError) as err:
        decode_panoptic_png(path)
    assert err.value.code == code and "x.png" in str(err.value)


@pytest.mark.parametrize("parent", ["annotations", ""])
def test_split_finds_pngs_in_either_official_place(tmp_path, parent):
    b = SplitBuilder(tmp_path, png_parent=parent)
    b.add(139, blocks())
    b.write()
    split = read_panoptic_split(tmp_path, SPLIT)
    assert split.png_dir == b.png_dir and split.image_dir == tmp_path / SPLIT
    (entry,) = split.entries
    assert entry.item == "000000000139" and entry.error is None
    assert entry.image.png_file == "000000000139.png"
    assert [s.id for s in entry.image.segments] == [7, 300]


def test_annotations_folder_wins_when_both_exist(tmp_path):
    SplitBuilder(tmp_path).write()
    (tmp_path / "annotations" / f"panoptic_{SPLIT}").mkdir()
    (tmp_path / f"panoptic_{SPLIT}").mkdir()
    assert read_panoptic_split(tmp_path, SPLIT).png_dir == \
        tmp_path / "annotations" / f"panoptic_{SPLIT}"


def test_missing_json_or_png_folder_names_what_was_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match="panoptic_val2017.json"):
        read_panoptic_split(tmp_path, SPLIT)
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "panoptic_val2017.json").write_text('{"annotations": []}')
    with pytest.raises(FileNotFoundError) as err:
        read_panoptic_split(tmp_path, SPLIT)
    assert "annotations/panoptic_val2017 and" in str(err.value)
    assert str(tmp_path / "panoptic_val2017") in str(err.value)


@pytest.mark.parametrize("text", ["{not json", '{"images": []}', "[1, 2]"])
def test_unusable_json_is_bad_json(tmp_path, text):
    SplitBuilder(tmp_path).add(1, blocks())
    (tmp_path / "annotations" / "panoptic_val2017.json").write_text(text)
    with pytest.raises(PanopticError) as err:
        read_panoptic_split(tmp_path, SPLIT)
    assert err.value.code == "bad_json"


def test_malformed_annotations_become_error_entries_with_unique_items():
    images = [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}]
    good = {"image_id": 1, "file_name": "a.png", "segments_info": [{"id": 3, "iscrowd": 1}]}
    anns = [good, dict(good), {"image_id": "x"}, {"image_id": 5, "file_name": "e.png",
                                                  "segments_info": []},
            {"image_id": 2, "file_name": "b.png"}]
    entries = parse_annotations(anns, images)
    items = [e.item for e in entries]
    assert items == ["000000000001", "000000000001~1", "annotation[2]", "000000000005",
                     "000000000002"]
    codes = [e.error.code if e.error else None for e in entries]
    assert codes == [None, "duplicate_key", "bad_annotation", "missing_image_entry",
                     "bad_annotation"]
    assert entries[0].image.segments[0].iscrowd is True


def test_bad_segment_entries_fail_alone_and_repeated_ids_keep_the_first():
    segs = [{"id": 4}, {"id": 0}, {"id": 256 ** 3}, {"id": 9, "iscrowd": 2}, "junk",
            {"id": 4, "iscrowd": 1}, {"id": 11, "iscrowd": 1}]
    (entry,) = parse_annotations([{"image_id": 8, "file_name": "h.png", "segments_info": segs}],
                                 [{"id": 8, "file_name": "h.jpg", "width": 3, "height": 2}])
    image = entry.image
    assert [(s.id, s.iscrowd) for s in image.segments] == [(4, False), (11, True)]
    assert (image.width, image.height) == (3, 2)
    bad = {name: e.code for name, e in image.bad_segments}
    assert bad == {"000000000008_0": "bad_segment", "000000000008_16777216": "bad_segment",
                   "000000000008_9": "bad_segment",
                   "000000000008_segments_info[4]": "bad_segment",
                   "000000000008_4~5": "duplicate_key"}


def test_keys_are_zero_padded_to_twelve_digits():
    assert image_key(397133) == "000000397133"
    assert segment_key(397133, 15466) == "000000397133_15466"


def test_ids_and_image_are_pixel_aligned_or_refused(tmp_path):
    b = SplitBuilder(tmp_path)
    b.add(1, blocks(), mode="L")
    b.add(2, blocks(), png_labels=blocks(48, 60))
    b.add(3, blocks())
    b.write()
    # image 3 is stored 64x48 but tagged "rotate 90 degrees": it displays as 48x64
    jpg = tmp_path / SPLIT / "000000000003.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(jpg).save(jpg, exif=exif.tobytes())
    split = read_panoptic_split(tmp_path, SPLIT)
    ids, rgb = read_ids_and_image(split, split.entries[0].image)
    assert rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(ids, blocks())
    assert (rgb[..., 0] == rgb[..., 2]).all()  # grey replicated to RGB
    for entry in split.entries[1:]:
        with pytest.raises(PanopticError) as err:
            read_ids_and_image(split, entry.image)
        assert err.value.code == "size_mismatch" and "(WxH)" in str(err.value)
    (tmp_path / SPLIT / "000000000001.jpg").unlink()
    with pytest.raises(PanopticError) as err:
        read_ids_and_image(split, split.entries[0].image)
    assert err.value.code == "bad_image"
