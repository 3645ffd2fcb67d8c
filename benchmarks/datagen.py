"""Generated benchmark inputs of realistic size (deterministic, seconds to make).

- COCO-like: 640x480 JPEGs (quality 90, textured like photos: shaded regions + noise) with an
  RGB-encoded panoptic PNG of ~10 segments each and the panoptic JSON (the sample's painter);
- SA-1B-like: 2250x1500 JPEGs (SA-1B's typical 1500 px short side);
- ScanNet-like frames: 1296x968 colour JPEGs (the ScanNet colour size).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from featcache.sample import coco as sample_coco
from featcache.sample.paint import save_png, shade_regions, write_json

COCO_SIZE = (480, 640)      # (h, w)
SA1B_SIZE = (1500, 2250)
SCANNET_SIZE = (968, 1296)


def photo(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """``uint8 (h, w, 3)``: smooth shading, edges and sensor-like noise (JPEG cost as photos)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    f1, f2 = rng.uniform(15, 60, 2)
    base = np.stack([np.sin(xx / f1) * 60 + 128, np.cos(yy / f2) * 60 + 128,
                     np.sin((xx + yy) / (f1 + f2)) * 60 + 128], -1)
    for _ in range(8):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.05, 0.3) * min(h, w)
        base[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
    base += rng.normal(0, 8, base.shape)
    return base.clip(0, 255).astype(np.uint8)


def write_jpegs(folder: Path, n: int, size: tuple[int, int], prefix: str = "",
                seed: int = 0) -> list[Path]:
    """``n`` JPEGs of ``size = (h, w)`` named ``<prefix><i:012d>.jpg`` (few distinct pictures,
    renamed copies: the decode cost is the same and generation stays fast)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    distinct = [photo(rng, *size) for _ in range(min(n, 4))]
    paths = []
    for i in range(n):
        path = folder / f"{prefix}{i:012d}.jpg"
        if i < len(distinct):
            Image.fromarray(distinct[i]).save(path, "JPEG", quality=90)
        else:
            path.write_bytes(paths[i % len(distinct)].read_bytes())
        paths.append(path)
    return paths


def write_coco_like(root: Path, n: int, seed: int = 0, split: str = "val2017") -> int:
    """``n`` 640x480 images with panoptic PNGs and JSON under ``root`` (COCO layout); returns
    the number of segments."""
    rng = np.random.default_rng(seed)
    h, w = COCO_SIZE
    seg_ids = iter(range(1, 1 << 24))
    images, annotations, distinct = [], [], []
    for i in range(n):
        image_id = i + 1
        name = f"{image_id:012d}"
        if len(distinct) < 4:
            canvas = sample_coco._Canvas(labels=np.zeros((h, w), np.int64))
            sample_coco._paint_stuff(rng, canvas, seg_ids)
            while len(canvas.segments) < 10:
                sample_coco._paint_things(rng, canvas, seg_ids)
            segments = sample_coco._finalise_segments(canvas)
            rgb = shade_regions(rng, canvas.labels, canvas.colours)
            rgb = np.clip(rgb.astype(np.int16) + rng.integers(-8, 9, rgb.shape), 0, 255)
            distinct.append((rgb.astype(np.uint8), sample_coco.encode_panoptic(canvas.labels),
                             segments))
        rgb, png, segments = distinct[i % len(distinct)]
        (root / split).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(root / split / f"{name}.jpg", "JPEG", quality=90)
        save_png(png, root / "annotations" / f"panoptic_{split}" / f"{name}.png")
        images.append({"id": image_id, "file_name": f"{name}.jpg", "width": w, "height": h})
        annotations.append({"image_id": image_id, "file_name": f"{name}.png",
                            "segments_info": segments})
    write_json({"info": {}, "licenses": [], "images": images, "annotations": annotations,
                "categories": sample_coco.categories_json()},
               root / "annotations" / f"panoptic_{split}.json")
    return sum(len(a["segments_info"]) for a in annotations)
