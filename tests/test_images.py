"""featcache.datasets.images: every pixel format decodes to uint8 RGB (+ alpha) with the right values."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from featcache.datasets.images import (DecodedImage, ImageDecodeError, composite_alpha, list_images,
                              load_image, scale_16bit_to_8bit)


def _gradient_rgb(h: int = 24, w: int = 40) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 6, y * 10, (x + y) * 3], axis=2).astype(np.uint8)


def _save(img: Image.Image, path: Path, **kwargs: object) -> Path:
    img.save(path, **kwargs)
    return path


@pytest.mark.parametrize("suffix,kwargs", [(".png", {}), (".bmp", {}), (".tif", {}),
                                           (".tiff", {"compression": "tiff_lzw"}),
                                           (".webp", {"lossless": True})])
def test_lossless_rgb_formats_roundtrip_exactly(tmp_path: Path, suffix: str, kwargs: dict) -> None:
    rgb = _gradient_rgb()
    out = load_image(_save(Image.fromarray(rgb), tmp_path / f"a{suffix}", **kwargs))
    assert isinstance(out, DecodedImage)
    assert out.rgb.dtype == np.uint8 and out.rgb.shape == (24, 40, 3)
    assert out.alpha is None and out.source_mode == "RGB"
    np.testing.assert_array_equal(out.rgb, rgb)
    assert out.size == (40, 24)


def test_jpeg_decodes_close_to_source(tmp_path: Path) -> None:
    rgb = _gradient_rgb()
    out = load_image(_save(Image.fromarray(rgb), tmp_path / "a.JPG", quality=95))
    assert out.rgb.shape == rgb.shape
    assert np.abs(out.rgb.astype(int) - rgb).mean() < 3


def test_rgba_png_keeps_alpha_and_colour(tmp_path: Path) -> None:
    rgb = _gradient_rgb()
    alpha = np.zeros(rgb.shape[:2], np.uint8)
    alpha[:, 20:] = 255
    alpha[5, 3] = 77
    path = _save(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), tmp_path / "a.png")
    out = load_image(path)
    assert out.source_mode == "RGBA"
    np.testing.assert_array_equal(out.alpha, alpha)
    np.testing.assert_array_equal(out.rgb, rgb)


def test_la_png_gives_gray_rgb_and_alpha(tmp_path: Path) -> None:
    gray = np.arange(24 * 40, dtype=np.uint16).reshape(24, 40) % 256
    alpha = np.full_like(gray, 128)
    path = _save(Image.fromarray(np.dstack([gray, alpha]).astype(np.uint8), "LA"),
                 tmp_path / "la.png")
    out = load_image(path)
    assert out.source_mode == "LA"
    np.testing.assert_array_equal(out.rgb[..., 1], gray)
    np.testing.assert_array_equal(out.alpha, alpha)


def test_palette_with_transparency_gives_alpha(tmp_path: Path) -> None:
    img = Image.new("P", (8, 6), 0)
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    img.paste(1, (0, 0, 4, 6))
    path = _save(img, tmp_path / "p.png", transparency=0)
    out = load_image(path)
    assert out.source_mode == "P"
    assert out.alpha is not None
    assert (out.alpha[:, :4] == 255).all() and (out.alpha[:, 4:] == 0).all()
    np.testing.assert_array_equal(out.rgb[0, 0], [200, 100, 50])


def test_palette_without_transparency_has_no_alpha(tmp_path: Path) -> None:
    img = Image.fromarray(_gradient_rgb()).convert("P", palette=Image.Palette.ADAPTIVE)
    out = load_image(_save(img, tmp_path / "p.png"))
    assert out.alpha is None and out.rgb.shape == (24, 40, 3)


def test_grayscale_becomes_three_equal_channels(tmp_path: Path) -> None:
    gray = (np.arange(24 * 40).reshape(24, 40) % 251).astype(np.uint8)
    out = load_image(_save(Image.fromarray(gray, "L"), tmp_path / "g.png"))
    assert out.source_mode == "L" and out.rgb.shape == (24, 40, 3)
    for c in range(3):
        np.testing.assert_array_equal(out.rgb[..., c], gray)


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257, 128, 129], [32896, 65535, 65280, 1000]], np.uint16)
    path = _save(Image.fromarray(values), tmp_path / "d16.png")
    out = load_image(path)
    assert out.source_mode.startswith("I")
    expected = np.array([[0, 1, 0, 1], [128, 255, 254, 4]], np.uint8)
    np.testing.assert_array_equal(out.rgb[..., 0], expected)
    assert out.alpha is None


def test_scale_16bit_rounds_and_clips() -> None:
    got = scale_16bit_to_8bit(np.array([-5, 0, 128, 129, 65535, 70000]))
    np.testing.assert_array_equal(got, [0, 0, 0, 1, 255, 255])


def test_cmyk_jpeg_converts_to_rgb(tmp_path: Path) -> None:
    cmyk = Image.new("CMYK", (16, 8), (0, 255, 255, 0))  # pure red in CMYK
    out = load_image(_save(cmyk, tmp_path / "c.jpg", quality=95))
    assert out.source_mode == "CMYK"
    r, g, b = out.rgb.reshape(-1, 3).mean(axis=0)
    assert r > 230 and g < 25 and b < 25


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    stored = np.zeros((20, 30, 3), np.uint8)
    stored[:5, :5] = (255, 0, 0)  # red in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    path = _save(Image.fromarray(stored), tmp_path / "r.jpg", exif=exif, quality=95)
    out = load_image(path)
    assert out.rgb.shape == (30, 20, 3)
    assert out.rgb[2, -3, 0] > 200 and out.rgb[2, -3, 1] < 60  # now top-right


def test_float_tiff_is_refused(tmp_path: Path) -> None:
    path = _save(Image.fromarray(np.ones((4, 4), np.float32)), tmp_path / "f.tif")
    with pytest.raises(ImageDecodeError, match="mode F"):
        load_image(path)


def _jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_truncated_jpeg_raises_even_if_pil_was_made_lenient(tmp_path: Path) -> None:
    data = _jpeg_bytes()
    path = tmp_path / "t.jpg"
    path.write_bytes(data[: len(data) // 2])
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        with pytest.raises(ImageDecodeError) as info:
            load_image(path)
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored afterwards
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    assert info.value.path == path and "truncated" in info.value.reason


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"x" * 40])
def test_garbage_and_missing_files_raise(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(ImageDecodeError):
        load_image(path)
    with pytest.raises(ImageDecodeError, match="not found"):
        load_image(tmp_path / "missing.png")


def test_composite_alpha_blends_and_rounds() -> None:
    rgb = np.array([[[200, 100, 0], [10, 20, 30], [0, 0, 0]]], np.uint8)
    alpha = np.array([[255, 0, 128]], np.uint8)
    out = composite_alpha(rgb, alpha, background=(0, 255, 100))
    np.testing.assert_array_equal(out, [[[200, 100, 0], [0, 255, 100], [0, 127, 50]]])
    assert composite_alpha(rgb, None) is rgb
    with pytest.raises(ValueError, match="shape"):
        composite_alpha(rgb, alpha[:, :2])


def test_list_images_filters_and_sorts(tmp_path: Path) -> None:
    for name in ["b.JPG", "a.png", "c.TIFF", "d.webp", "e.bmp", "f.jpeg", "g.tif",
                 "notes.txt", ".hidden.jpg", "model.pt"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.jpg").mkdir()
    names = [p.name for p in list_images(tmp_path)]
    assert names == ["a.png", "b.JPG", "c.TIFF", "d.webp", "e.bmp", "f.jpeg", "g.tif"]
    assert list_images(tmp_path / "sub.jpg") == []
    with pytest.raises(NotADirectoryError):
        list_images(tmp_path / "nope")
