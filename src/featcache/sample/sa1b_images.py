"""SA-1B-style images with one JSON per image holding COCO-RLE instance masks.

Layout under ``<root>``: ``sa_<n>.jpg`` and ``sa_<n>.json`` with::

    {"image": {"image_id", "width", "height", "file_name"},
     "annotations": [{"id", "segmentation": {"size": [h, w], "counts": <compressed RLE str>},
                      "bbox": [x, y, w, h], "area", "predicted_iou", "stability_score",
                      "point_coords": [[x, y]], "crop_box": [x, y, w, h]}]}

As in SA-1B, masks overlap freely (parts inside wholes), ``bbox``/``crop_box`` are floats in
pixels, ``point_coords`` is the prompt point (x right, y down, inside the mask) and ``area`` is
the mask's pixel count. One image has an empty ``annotations`` list.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from featcache.sample.paint import (
    bbox_xywh,
    ellipse_mask,
    random_shape,
    save_jpeg,
    shade_regions,
    write_json,
)


def write_sa1b(root: Path, rng: np.random.Generator) -> dict[str, Any]:
    """Write 4-6 SA-1B-style images and JSONs under ``root``; return the manifest entry."""
    n_images = int(rng.integers(4, 7))
    numbers = sorted(int(i) + 1 for i in rng.choice(11_000_000, n_images, replace=False))
    empty = numbers[int(rng.integers(0, n_images))]
    ann_ids = iter(int(i) + 1 for i in rng.choice(2 ** 31 - 1, 20 * n_images, replace=False))
    counts = {}
    for number in numbers:
        h, w = (int(rng.integers(180, 301)), int(rng.integers(200, 321)))
        masks = [] if number == empty else _instance_masks(rng, h, w)
        name = f"sa_{number}"
        save_jpeg(_render(rng, h, w, masks), root / f"{name}.jpg")
        anns = [_annotation(rng, next(ann_ids), m) for m in masks]
        write_json({"image": {"image_id": number, "width": w, "height": h,
                              "file_name": f"{name}.jpg"}, "annotations": anns},
                   root / f"{name}.json")
        counts[name] = len(anns)
    return {"images": len(numbers), "annotations": counts, "empty_image": f"sa_{empty}"}


def _instance_masks(rng: np.random.Generator, h: int, w: int) -> list[np.ndarray]:
    """3-12 non-empty masks: whole objects, parts inside them, one touching the border."""
    masks: list[np.ndarray] = []
    for _ in range(int(rng.integers(3, 13))):
        if masks and rng.random() < 0.3:  # a part of an earlier object
            parent = masks[int(rng.integers(0, len(masks)))]
            mask = parent & random_shape(rng, h, w, scale=float(rng.uniform(0.1, 0.3)))
        else:
            mask = random_shape(rng, h, w, scale=float(rng.uniform(0.15, 0.5)))
        if mask.sum() >= 10:
            masks.append(mask)
    masks.append(ellipse_mask(h, w, 0.0, h / 2, w / 6, h / 5))  # cut by the left border
    return masks


def _render(rng: np.random.Generator, h: int, w: int, masks: list[np.ndarray]) -> np.ndarray:
    """Colour the image by the mask painted last at each pixel (big ones first)."""
    labels = np.zeros((h, w), np.int64)
    order = sorted(range(len(masks)), key=lambda i: -int(masks[i].sum()))
    for i in order:
        labels[masks[i]] = i + 1
    palette = rng.integers(30, 226, size=(len(masks) + 1, 3))
    colours = {i: tuple(int(c) for c in palette[i]) for i in range(len(masks) + 1)}
    return shade_regions(rng, labels, colours)


def _annotation(rng: np.random.Generator, ann_id: int, mask: np.ndarray) -> dict[str, Any]:

    h, w = mask.shape
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    ys, xs = np.nonzero(mask)
    pick = int(rng.integers(0, xs.size))
    return {"id": ann_id,
            "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
            "bbox": [float(v) for v in bbox_xywh(mask)],
            "area": int(mask.sum()),
            "predicted_iou": round(float(rng.uniform(0.8, 1.0)), 6),
            "stability_score": round(float(rng.uniform(0.85, 1.0)), 6),
            "point_coords": [[float(xs[pick]) + 0.5, float(ys[pick]) + 0.5]],
            "crop_box": [0.0, 0.0, float(w), float(h)]}
