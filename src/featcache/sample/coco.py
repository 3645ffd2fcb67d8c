"""A small COCO-panoptic split: JPEGs, RGB-encoded panoptic PNGs and the panoptic JSON.

Layout under ``<root>`` (``<id>`` is the image id zero-padded to 12 digits)::

    val2017/<id>.jpg
    annotations/panoptic_val2017.json
    annotations/panoptic_val2017/<id>.png     segment id = R + 256 G + 256^2 B, 0 = void

Segments are painted in order (stuff first, then things), so later shapes occlude earlier ones;
``area`` and ``bbox`` ``[x, y, w, h]`` in the JSON are counted from the PNG. Special cases, all
recorded in the returned manifest: a tiny segment (6 px), a segment listed in the JSON but
absent from the PNG (fully occluded; its JSON area/bbox are those of the shape before occlusion,
as a stale annotation would have), and one ``iscrowd: 1`` segment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featcache.sample.paint import (
    bbox_xywh,
    ellipse_mask,
    random_shape,
    rect_mask,
    save_jpeg,
    save_png,
    shade_regions,
    write_json,
)

SPLIT = "val2017"

# (id, name, supercategory, colour): real COCO panoptic ids and names.
THINGS = [(1, "person", "person", (200, 150, 120)), (2, "bicycle", "vehicle", (60, 60, 160)),
          (3, "car", "vehicle", (180, 30, 40)), (17, "cat", "animal", (150, 120, 80)),
          (18, "dog", "animal", (110, 80, 50)), (44, "bottle", "kitchen", (40, 140, 90)),
          (62, "chair", "furniture", (140, 90, 160)),
          (64, "potted plant", "furniture", (50, 160, 60))]
STUFF = [(149, "road", "ground", (90, 90, 95)), (184, "tree-merged", "plant", (40, 110, 40)),
         (187, "sky-other-merged", "sky", (120, 170, 230)),
         (190, "floor-other-merged", "floor", (170, 140, 110)),
         (193, "grass-merged", "plant", (80, 170, 60)),
         (199, "wall-other-merged", "wall", (200, 195, 180))]


@dataclass
class _Canvas:
    """The label map being painted and the segments listed for it."""

    labels: np.ndarray  # int64 (H, W): segment id, 0 = void
    segments: list[dict[str, Any]] = field(default_factory=list)
    colours: dict[int, tuple[int, int, int]] = field(default_factory=dict)


def categories_json() -> list[dict[str, Any]]:
    """The ``categories`` list of the panoptic JSON."""
    return [{"id": cid, "name": name, "supercategory": sup, "isthing": int(isthing),
             "color": list(colour)}
            for isthing, table in ((1, THINGS), (0, STUFF)) for cid, name, sup, colour in table]


def write_coco(root: Path, rng: np.random.Generator) -> dict[str, Any]:
    """Write the COCO-panoptic sample under ``root``; return its manifest entry."""
    n_images = int(rng.integers(8, 13))
    image_ids = sorted(int(i) + 1 for i in rng.choice(600_000, n_images, replace=False))
    seg_ids = iter(int(s) + 1 for s in rng.choice(256 ** 3 - 1, 20 * n_images, replace=False))
    images, annotations, special = [], [], {}
    for index, image_id in enumerate(image_ids):
        h, w = _image_size(rng)
        canvas = _Canvas(labels=np.zeros((h, w), np.int64))
        _paint_stuff(rng, canvas, seg_ids)
        _paint_things(rng, canvas, seg_ids)
        special.update(_paint_special(rng, canvas, seg_ids, index, image_id))
        segments = _finalise_segments(canvas)
        name = f"{image_id:012d}"
        save_jpeg(shade_regions(rng, canvas.labels, canvas.colours), root / SPLIT / f"{name}.jpg")
        save_png(encode_panoptic(canvas.labels), root / "annotations" / f"panoptic_{SPLIT}" /
                 f"{name}.png")
        images.append({"id": image_id, "file_name": f"{name}.jpg", "width": w, "height": h})
        annotations.append({"image_id": image_id, "file_name": f"{name}.png",
                            "segments_info": segments})
    write_json({"info": {"description": "featcache embedded sample (synthetic)"},
                "licenses": [], "images": images, "annotations": annotations,
                "categories": categories_json()},
               root / "annotations" / f"panoptic_{SPLIT}.json")
    return {"split": SPLIT, "images": len(images),
            "segments": sum(len(a["segments_info"]) for a in annotations), **special}


def encode_panoptic(labels: np.ndarray) -> np.ndarray:
    """Segment ids ``(H, W)`` -> ``uint8 (H, W, 3)`` with ``id = R + 256 G + 256^2 B``."""
    return np.stack([labels % 256, (labels // 256) % 256, labels // 65536], axis=2).astype(np.uint8)


def _image_size(rng: np.random.Generator) -> tuple[int, int]:
    aspect_w, aspect_h = [(4, 3), (3, 4), (16, 9), (1, 1), (9, 16), (3, 2)][int(rng.integers(0, 6))]
    long_side = int(rng.integers(256, 321))
    if aspect_w >= aspect_h:
        return long_side * aspect_h // aspect_w, long_side
    return long_side, long_side * aspect_w // aspect_h


def _add(canvas: _Canvas, mask: np.ndarray, seg_id: int, category: tuple, rng: np.random.Generator,
         iscrowd: int = 0) -> dict[str, Any]:
    canvas.labels[mask] = seg_id
    jitter = rng.integers(-25, 26, size=3)
    canvas.colours[seg_id] = tuple(int(c) for c in np.clip(np.array(category[3]) + jitter, 0, 255))
    seg = {"id": seg_id, "category_id": category[0], "iscrowd": iscrowd,
           "area": int(mask.sum()), "bbox": bbox_xywh(mask)}
    canvas.segments.append(seg)
    return seg


def _paint_stuff(rng: np.random.Generator, canvas: _Canvas, seg_ids: Any) -> None:
    """Upper band (sky or wall), lower band (grass, road or floor), sometimes a tree blob."""
    h, w = canvas.labels.shape
    horizon = int(rng.integers(h // 3, 2 * h // 3))
    upper, lower = [STUFF[i] for i in (2, 5)], [STUFF[i] for i in (0, 3, 4)]
    _add(canvas, rect_mask(h, w, 0, 0, w, horizon), next(seg_ids),
         upper[int(rng.integers(0, 2))], rng)
    _add(canvas, rect_mask(h, w, 0, horizon, w, h), next(seg_ids),
         lower[int(rng.integers(0, 3))], rng)
    if rng.random() < 0.5:
        blob = ellipse_mask(h, w, float(rng.integers(0, w)), float(horizon), w / 5, h / 4)
        _add(canvas, blob, next(seg_ids), STUFF[1], rng)
    if rng.random() < 0.5:  # an unlabelled region, as COCO has between segments
        canvas.labels[ellipse_mask(h, w, float(rng.integers(0, w)), float(rng.integers(0, h)),
                                   w / 12, h / 14)] = 0


def _paint_things(rng: np.random.Generator, canvas: _Canvas, seg_ids: Any) -> None:
    h, w = canvas.labels.shape
    for _ in range(int(rng.integers(2, 11))):
        category = THINGS[int(rng.integers(0, len(THINGS)))]
        mask = random_shape(rng, h, w, scale=float(rng.uniform(0.12, 0.4)))
        _add(canvas, mask, next(seg_ids), category, rng)


def _paint_special(rng: np.random.Generator, canvas: _Canvas, seg_ids: Any, index: int,
                   image_id: int) -> dict[str, Any]:
    """Image 0 gets a 3x2 px segment, image 1 a segment that is then fully painted over,
    image 2 a crowd of people painted last."""
    h, w = canvas.labels.shape
    if index == 0:
        seg = _add(canvas, rect_mask(h, w, w // 2, h // 2, w // 2 + 3, h // 2 + 2),
                   next(seg_ids), THINGS[5], rng)
        return {"tiny_segment": {"image_id": image_id, "segment_id": seg["id"],
                                 "area": seg["area"]}}
    if index == 1:
        hidden = _add(canvas, ellipse_mask(h, w, w / 2, h / 2, w / 10, h / 10),
                      next(seg_ids), THINGS[3], rng)
        hidden["absent_from_png"] = True
        _add(canvas, rect_mask(h, w, w // 4, h // 4, 3 * w // 4, 3 * h // 4),
             next(seg_ids), THINGS[6], rng)
        return {"absent_segment": {"image_id": image_id, "segment_id": hidden["id"],
                                   "json_area": hidden["area"], "png_area": 0}}
    if index == 2:
        crowd = _add(canvas, ellipse_mask(h, w, w / 3, 2 * h / 3, w / 6, h / 8),
                     next(seg_ids), THINGS[0], rng, iscrowd=1)
        return {"crowd_segment": {"image_id": image_id, "segment_id": crowd["id"]}}
    return {}


def _finalise_segments(canvas: _Canvas) -> list[dict[str, Any]]:
    """Recount area and bbox from the final label map; drop fully occluded segments.

    The deliberately absent segment is kept with its pre-occlusion area and bbox.
    """
    kept = []
    for seg in canvas.segments:
        if seg.pop("absent_from_png", False):
            kept.append(seg)
            continue
        mask = canvas.labels == seg["id"]
        area = int(mask.sum())
        if area:
            kept.append({**seg, "area": area, "bbox": bbox_xywh(mask)})
    return kept
