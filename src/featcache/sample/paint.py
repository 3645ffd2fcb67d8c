"""Drawing helpers shared by the sample generators: random streams, masks, textures, writers.

Arrays use image conventions: ``(H, W)`` or ``(H, W, 3)``, row = y (down), column = x (right),
pixel ``(x, y)`` covers ``[x, x + 1) x [y, y + 1)`` so its centre is at ``(x + 0.5, y + 0.5)``.

Only correctly rounded IEEE operations (+, -, *, /, sqrt, floor) and integer rasterisation by PIL
are used, never BLAS or transcendental functions, so that the arrays depend on the seed and the
NumPy random streams only, not on the CPU's SIMD or math library.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

JPEG_QUALITY = 90


def sub_rng(seed: int, part: str) -> np.random.Generator:
    """An independent random stream per ``part``, so one generator never shifts another's."""
    key = int.from_bytes(hashlib.sha256(part.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, key])


def smooth_field(rng: np.random.Generator, h: int, w: int, cells: int = 4) -> np.ndarray:
    """Smooth random values in ``[0, 1]``: ``float64 (h, w)``, bilinear over a coarse grid."""
    grid = rng.random((cells + 1, cells + 1))
    ys = (np.arange(h) + 0.5) * (cells / h)
    xs = (np.arange(w) + 0.5) * (cells / w)
    iy = np.minimum(np.floor(ys).astype(int), cells - 1)
    ix = np.minimum(np.floor(xs).astype(int), cells - 1)
    fy = (ys - iy)[:, None]
    fx = (xs - ix)[None, :]
    top = grid[iy][:, ix] * (1 - fx) + grid[iy][:, ix + 1] * fx
    bottom = grid[iy + 1][:, ix] * (1 - fx) + grid[iy + 1][:, ix + 1] * fx
    return top * (1 - fy) + bottom * fy


def rect_mask(h: int, w: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """``bool (h, w)``, True on columns ``x0..x1-1`` and rows ``y0..y1-1`` (clipped)."""
    mask = np.zeros((h, w), bool)
    mask[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = True
    return mask


def ellipse_mask(h: int, w: int, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    """``bool (h, w)``, True where the pixel centre lies inside the axis-aligned ellipse."""
    y = (np.arange(h) + 0.5 - cy) / ry
    x = (np.arange(w) + 0.5 - cx) / rx
    return (x[None, :] * x[None, :] + y[:, None] * y[:, None]) <= 1.0


def polygon_mask(h: int, w: int, points: list[tuple[int, int]]) -> np.ndarray:
    """``bool (h, w)`` of a filled polygon with integer vertices ``(x, y)`` (PIL rasteriser)."""
    canvas = Image.new("L", (w, h), 0)
    ImageDraw.Draw(canvas).polygon(points, fill=1)
    return np.asarray(canvas, dtype=bool)


def random_shape(rng: np.random.Generator, h: int, w: int, scale: float) -> np.ndarray:
    """A random rectangle, ellipse or polygon whose size is about ``scale`` of the image."""
    kind = int(rng.integers(0, 3))
    sx, sy = max(int(w * scale), 3), max(int(h * scale), 3)
    cx, cy = int(rng.integers(0, w)), int(rng.integers(0, h))
    if kind == 0:
        return rect_mask(h, w, cx - sx // 2, cy - sy // 2, cx + sx // 2 + 1, cy + sy // 2 + 1)
    if kind == 1:
        return ellipse_mask(h, w, cx + 0.5, cy + 0.5, sx / 2 + 0.5, sy / 2 + 0.5)
    n = int(rng.integers(3, 7))
    pts = [(cx + int(rng.integers(-sx // 2, sx // 2 + 1)),
            cy + int(rng.integers(-sy // 2, sy // 2 + 1))) for _ in range(n)]
    return polygon_mask(h, w, pts)


def bbox_xywh(mask: np.ndarray) -> list[int]:
    """``[x, y, w, h]`` of the True pixels (COCO convention, inclusive extent); zeros if empty."""
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    if rows.size == 0:
        return [0, 0, 0, 0]
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def shade_regions(rng: np.random.Generator, labels: np.ndarray,
                  colours: dict[int, tuple[int, int, int]]) -> np.ndarray:
    """Render a label map as a natural-looking ``uint8 (H, W, 3)`` picture.

    Each label gets its colour, modulated by a smooth light field, a vertical gradient and fine
    noise; label 0 (void) and labels missing from ``colours`` get a neutral grey-brown.
    """
    h, w = labels.shape
    present, index = np.unique(labels, return_inverse=True)
    lut = np.array([colours.get(int(label), (110, 100, 90)) for label in present], np.float64)
    base = lut[index.reshape(h, w)]
    light = 0.7 + 0.5 * smooth_field(rng, h, w, cells=3)
    grad = 0.9 + 0.2 * (np.arange(h) / h)[:, None]
    noise = rng.integers(-10, 11, size=(h, w, 3))
    out = base * (light * grad)[:, :, None] + noise
    return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)


def save_jpeg(rgb: np.ndarray, path: Path, quality: int = JPEG_QUALITY) -> None:
    """Baseline JPEG, fixed quality, no metadata (bytes depend on the libjpeg build only)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, "JPEG", quality=quality)


def save_png(array: np.ndarray, path: Path) -> None:
    """Lossless PNG of ``uint8 (H, W)``, ``uint8 (H, W, 3|4)`` or ``uint16 (H, W)`` (16-bit)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, "PNG")


def write_json(data: Any, path: Path) -> None:
    """JSON with sorted keys and a trailing newline (byte-stable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
