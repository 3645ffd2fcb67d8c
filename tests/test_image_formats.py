"""Image files as users have them: GIF and animated formats, EXIF sizes, what a split folder
holds besides images, 16-bit grayscale with a tRNS key and 12-bit data in 16-bit files."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featcache.stages.extract_clip_grid import STAGE, ClipGridParams, extract_clip_grid
from featcache.config import SharedParams, build_dataclass
from featcache.encoders import TINY_OPENCLIP
from featcache.datasets.images import image_size, list_images, load_image, survey_folder
from featcache.reader import open_features
from featcache.datasets.scannet import read_image_size


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(
        ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png16_gray(path: Path, values: np.ndarray, trns: int | None = None,
                     sbit: int | None = None) -> Path:
    """A 16-bit grayscale PNG written chunk by chunk (PIL cannot write tRNS/sBIT for it)."""
    h, w = values.shape
    raw = b"".join(b"\x00" + values[r].astype(">u2").tobytes() for r in range(h))
    out = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 0, 0, 0, 0))
    if sbit is not None:
        out += _chunk(b"sBIT", bytes([sbit]))
    if trns is not None:
        out += _chunk(b"tRNS", struct.pack(">H", trns))
    path.write_bytes(out + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b""))
    return path


def frames(n: int = 2) -> list[Image.Image]:
    return [Image.fromarray(np.full((12, 16, 3), 40 + 100 * i, np.uint8)) for i in range(n)]


def test_exif_rotated_size_agrees_with_the_decoded_image(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "r.jpg"
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(path, exif=exif)
    assert image_size(path) == read_image_size(path) == load_image(path).size == (30, 40)


@pytest.mark.parametrize("name,kwargs", [
    ("still.gif", {}), ("anim.gif", {"save_all": True, "duration": 50}),
    ("anim.png", {"save_all": True, "duration": 50}),                     # APNG
    ("anim.webp", {"save_all": True, "lossless": True, "duration": 50})])
def test_gif_and_animated_files_are_listed_and_give_their_first_frame(tmp_path, name, kwargs):
    first, *rest = frames()
    first.save(tmp_path / name, append_images=rest if kwargs else [], **kwargs)
    assert [p.name for p in list_images(tmp_path)] == [name]
    image = load_image(tmp_path / name)
    assert image.size == (16, 12)
    np.testing.assert_allclose(image.rgb.astype(int), 40, atol=2)   # frame 0, not frame 1


def test_16bit_gray_png_with_trns_keeps_its_transparency(tmp_path):
    values = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    values[2:5, 2:6] = 7777
    image = load_image(write_png16_gray(tmp_path / "t.png", values, trns=7777))
    assert image.alpha is not None
    np.testing.assert_array_equal(image.alpha == 0, values == 7777)
    assert image.rgb[0, 1, 0] == round(1000 / 257)


def test_12bit_data_uses_the_significant_bits_or_is_flagged(tmp_path):
    values = np.linspace(0, 4095, 64).astype(np.uint16).reshape(8, 8)
    marked = load_image(write_png16_gray(tmp_path / "sbit.png", values, sbit=12))
    assert marked.rgb.max() == 255 and marked.rgb[0, 0, 0] == 0 and not marked.low_range
    np.testing.assert_array_equal(marked.rgb[..., 0],
                                  np.round(values.astype(float) * 255 / 4095).astype(np.uint8))
    shifted = load_image(write_png16_gray(tmp_path / "spec.png", values << 4 | values >> 8,
                                          sbit=12))      # scaled to 16 bits as the spec says
    assert shifted.rgb.max() == 255 and not shifted.low_range
    plain = load_image(write_png16_gray(tmp_path / "plain.png", values))
    assert plain.low_range and plain.rgb.max() == 16             # as stored: nearly black
    tiff = tmp_path / "t.tif"
    Image.fromarray(values).save(tiff, tiffinfo={281: 4095})   # MaxSampleValue
    assert load_image(tiff).rgb.max() == 255
    assert survey_folder(tmp_path)["low_range_16bit"] == 1


def test_grid_stage_metrics_count_what_is_not_an_image(tmp_path, monkeypatch):
    folder = tmp_path / "imgs"
    folder.mkdir()
    frames(1)[0].save(folder / "a.gif")
    Image.fromarray(np.zeros((12, 16, 3), np.uint8)).save(folder / "b.jpg")
    (folder / "notes.txt").write_text("x")
    (folder / ".DS_Store").write_bytes(b"\0")
    (folder / "raw.cr2").write_bytes(b"\0")
    (folder / "sub").mkdir()
    write_png16_gray(folder / "dark.png", np.full((8, 8), 900, np.uint16))
    monkeypatch.chdir(tmp_path)
    params = build_dataclass(ClipGridParams, {
        "root": str(tmp_path), "out": "out", "splits": [{"name": "s", "images": "imgs"}],
        "num_workers": 0}, STAGE)
    extract_clip_grid(SharedParams(model=TINY_OPENCLIP, weights="random", device="cpu",
                                   seed=0), params)
    assert sorted(open_features(tmp_path / "out" / "s")) == ["a", "b", "dark"]
    counts = {"image_files": 3, "non_image_files": 3, "sub_folders": 1, "low_range_16bit": 1}
    metrics = json.loads((tmp_path / "metrics" / f"{STAGE}.json").read_text())
    assert metrics["inputs"] == counts                        # summed over the splits
    detail = json.loads((tmp_path / ".featcache" / "timing" / f"{STAGE}.json").read_text())
    assert detail["inputs"] == {"s": counts}                  # per split
