"""An image folder with every pixel format and oddity :mod:`featcache.datasets.images` must handle.

File stems are unique, so per-image outputs keyed by stem never collide. The returned manifest
entry describes each file and what a correct decoder yields for it.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from featcache.sample.paint import (
    ellipse_mask,
    random_shape,
    save_jpeg,
    save_png,
    shade_regions,
    smooth_field,
)

CORRUPT = "corrupt_truncated.jpg"
EXIF_ROTATED = "exif_rotated.jpg"
EXIF_ORIENTATION = 6  # display = stored image rotated 90 degrees clockwise


def write_image_folder(root: Path, rng: np.random.Generator) -> dict[str, Any]:
    """Write the image folder under ``root``; return the manifest entry."""
    root.mkdir(parents=True, exist_ok=True)
    photo = _photo(rng, 180, 240)
    files: dict[str, str] = {}
    save_jpeg(photo, root / "rgb_photo.jpg")
    files["rgb_photo.jpg"] = "RGB JPEG"
    files.update(_write_alpha_files(root, rng))
    files.update(_write_gray_files(root, rng))
    Image.fromarray(photo).save(root / "webp_photo.webp", "WEBP", lossless=True)
    Image.fromarray(photo[::-1]).save(root / "bmp_photo.bmp", "BMP")
    Image.fromarray(photo[:, ::-1]).save(root / "tiff_photo.tiff", "TIFF")
    Image.fromarray(photo).convert("CMYK").save(root / "cmyk_photo.jpg", "JPEG", quality=90)
    files.update({"webp_photo.webp": "lossless WEBP", "bmp_photo.bmp": "24-bit BMP",
                  "tiff_photo.tiff": "uncompressed RGB TIFF",
                  "cmyk_photo.jpg": "CMYK JPEG (decodes to RGB)"})
    exif = _write_exif_rotated(root / EXIF_ROTATED, rng)
    files[EXIF_ROTATED] = f"JPEG with EXIF orientation {EXIF_ORIENTATION}"
    _write_truncated_jpeg(root / CORRUPT, photo)
    files[CORRUPT] = "JPEG cut after 40% of its bytes: must fail to decode"
    return {"files": files, "corrupt": [CORRUPT], "exif_rotated": exif,
            "alpha": ["rgba_cutout.png", "palette_transparent.png"], "sixteen_bit": "gray16.png"}


def _photo(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    labels = np.zeros((h, w), np.int64)
    for k in range(1, 6):
        labels[random_shape(rng, h, w, scale=float(rng.uniform(0.2, 0.5)))] = k
    colours = {k: tuple(int(c) for c in rng.integers(30, 226, size=3)) for k in range(6)}
    return shade_regions(rng, labels, colours)


def _write_alpha_files(root: Path, rng: np.random.Generator) -> dict[str, str]:
    """RGBA with a soft-edged cut-out, and a palette PNG with one transparent index."""
    h, w = 160, 200
    rgb = _photo(rng, h, w)
    inner = ellipse_mask(h, w, w / 2, h / 2, w / 3, h / 3)
    outer = ellipse_mask(h, w, w / 2, h / 2, w / 3 + 6, h / 3 + 6)
    alpha = np.where(inner, 255, np.where(outer, 128, 0)).astype(np.uint8)
    save_png(np.dstack([rgb, alpha]), root / "rgba_cutout.png")
    quantized = Image.fromarray(_photo(rng, 120, 120)).quantize(colors=15)
    index = np.asarray(quantized).astype(np.uint8) + 1  # index 0 is kept for transparency
    index[:30, :30] = 0
    pal = Image.frombytes("P", (120, 120), index.tobytes())
    pal.putpalette([255, 0, 255] + quantized.getpalette()[:45])
    pal.save(root / "palette_transparent.png", transparency=0)
    return {"rgba_cutout.png": "RGBA PNG, alpha 0/128/255 (cut-out with a soft rim)",
            "palette_transparent.png": "palette PNG, index 0 transparent"}


def _write_gray_files(root: Path, rng: np.random.Generator) -> dict[str, str]:
    """8-bit grayscale and a 16-bit grayscale spanning the whole 0..65535 range."""
    h, w = 150, 200
    gray = np.floor(smooth_field(rng, h, w) * 255 + 0.5).astype(np.uint8)
    save_png(gray, root / "gray.png")
    ramp = np.floor(np.arange(w) * (65535 / (w - 1)) + 0.5)
    wide = (ramp[None, :] * (0.5 + 0.5 * smooth_field(rng, h, w)))
    wide[:, -1] = 65535
    save_png(np.floor(wide + 0.5).astype(np.uint16), root / "gray16.png")
    return {"gray.png": "8-bit grayscale PNG (L)",
            "gray16.png": "16-bit grayscale PNG (I;16), values up to 65535"}


def _write_exif_rotated(path: Path, rng: np.random.Generator) -> dict[str, Any]:
    """Stored 240x160 (w x h); displayed 160x240 with a red square at the displayed top-left."""
    stored = _photo(rng, 160, 240)
    stored[-24:, :24] = (230, 20, 20)  # stored bottom-left = displayed top-left
    exif = Image.Exif()
    exif[0x0112] = EXIF_ORIENTATION
    Image.fromarray(stored).save(path, "JPEG", quality=90, exif=exif)
    return {"file": path.name, "orientation": EXIF_ORIENTATION, "stored_size": [240, 160],
            "displayed_size": [160, 240], "marker": "red 24x24 square at the displayed top-left"}


def _write_truncated_jpeg(path: Path, rgb: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    path.write_bytes(data[: int(len(data) * 0.4)])
