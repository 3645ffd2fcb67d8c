"""Decoding of every image kind the stages read, into one predictable array form.

Every extraction stage reads images through :func:`load_image`, so all of them agree on what an
image *is*: ``rgb`` is ``uint8 (H, W, 3)`` in display orientation (the EXIF orientation tag is
applied), ``alpha`` is ``uint8 (H, W)`` when the file carries transparency, else ``None``. Rows
are ``y`` (down), columns are ``x`` (right).

Conversions (``source_mode`` keeps the PIL mode the file was opened with):

- ``L`` / ``1`` grayscale: replicated to three channels;
- ``I;16*`` / ``I`` (16-bit grayscale): scaled to 8 bit with ``round(v / 257)`` so that 65535 maps
  to 255 and the full range is kept (clipping to 255 would saturate almost every pixel);
  ``I`` values outside 0..65535 are clipped first. Files that say how many bits are
  significant (PNG ``sBIT``, TIFF ``MaxSampleValue``) and hold values below ``2**b`` (12-bit
  camera data in 16-bit samples) are scaled by ``round(v · 255 / (2**b − 1))`` instead; a file
  without that information whose values all stay below 4096 (1/16 of the range, near-black
  under ``v / 257``) is decoded as stored and flagged (``low_range``; logged, and counted per
  split in the grid stages' metrics, see :func:`survey_folder`). A 16-bit grayscale PNG with a
  ``tRNS`` key gets its alpha (0 where the value equals the key);
- ``RGBA`` / ``LA`` / ``PA`` / palette or RGB/L with a ``tRNS`` transparency key: colour plus
  alpha; colour values under transparent pixels are returned as stored (not premultiplied);
- ``CMYK`` (including Adobe's inverted CMYK JPEGs) and ``YCbCr``: converted by PIL to RGB;
  embedded ICC profiles are not applied;
- floating point (``F``) and anything PIL cannot convert: :class:`ImageDecodeError`.

A truncated or corrupt file raises :class:`ImageDecodeError` instead of returning a partially
grey image: decoding runs with ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` forced to ``False``.
Multi-frame files yield their first frame: TIFF pages, animated GIF, WEBP and APNG.
"""

from __future__ import annotations

import contextlib
import logging
import struct
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
#: 16-bit data whose values all stay below this (12 bits) is flagged as ``low_range``.
LOW_RANGE_LIMIT = 1 << 12
_SIXTEEN_BIT_SUFFIXES = (".png", ".tif", ".tiff")

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = {"RGBA": "RGBA", "RGBa": "RGBA", "LA": "LA", "La": "LA", "PA": "RGBA"}


class _UnsupportedImage(Exception):
    """The file decoded but its pixel format has no faithful 8-bit RGB form."""


class ImageDecodeError(Exception):
    """An image file could not be decoded completely; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


@dataclass(frozen=True)
class DecodedImage:
    """A decoded image in display orientation.

    ``rgb``: ``uint8 (H, W, 3)``; ``alpha``: ``uint8 (H, W)`` (255 = opaque) or ``None`` when the
    file has no transparency; ``source_mode``: the PIL mode of the file (e.g. ``"I;16"``, ``"P"``).
    """

    rgb: np.ndarray
    alpha: np.ndarray | None
    source_mode: str
    low_range: bool = False   # 16-bit data in < 12 bits with no significant-bits information
    #: ``(width, height)`` of the file (display orientation) when ``load_image(draft=...)``
    #: decoded it DCT-downscaled; ``None`` for a full-size decode
    draft_from: tuple[int, int] | None = None

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` in pixels."""
        return int(self.rgb.shape[1]), int(self.rgb.shape[0])


#: ``(width, height)`` of an image in display orientation -> the smallest ``(width, height)``
#: (display orientation) that a DCT-domain downscaled decode may return, or ``None``: full size.
DraftRule = Callable[[int, int], "tuple[int, int] | None"]


def load_image(path: str | Path, draft: DraftRule | None = None) -> DecodedImage:
    """Decode ``path`` completely into a :class:`DecodedImage`.

    ``draft`` (the fast preprocessing path only; ``None``, the default, decodes at full size):
    a JPEG for which ``draft(width, height)`` gives a size is decoded DCT-domain downscaled
    by libjpeg (PIL ``Image.draft``, a factor of 2, 4 or 8) to at least that size, in display
    orientation. Other formats are decoded at full size.

    Raises :class:`ImageDecodeError` for a missing, truncated, corrupt or unsupported file;
    never returns a partially decoded image.
    """
    path = Path(path)
    try:
        with _strict_decoding(), Image.open(path) as img:
            full = _apply_draft(img, draft) if draft is not None and img.format == "JPEG" \
                else None
            img.load()
            source_mode = img.mode
            bits = significant_bits(img, path) if img.mode in _SIXTEEN_BIT_MODES else None
            img = ImageOps.exif_transpose(img)
            rgb, alpha, low = _to_arrays(img, source_mode, bits)
    except FileNotFoundError:
        raise ImageDecodeError(path, "file not found") from None
    except _UnsupportedImage as e:
        raise ImageDecodeError(path, str(e)) from None
    except UnidentifiedImageError:
        raise ImageDecodeError(path, "not an image file PIL can identify") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad input, not a crash
        raise ImageDecodeError(path, f"{type(e).__name__}: {e}") from None
    if low:
        log.warning("%s: 16-bit image whose values all stay below %d and that does not say how "
                    "many bits are significant: decoded as v/257, nearly black", path,
                    LOW_RANGE_LIMIT)
    if full is not None and (rgb.shape[1], rgb.shape[0]) == full:
        full = None   # libjpeg declined to reduce
    return DecodedImage(rgb=rgb, alpha=alpha, source_mode=source_mode, low_range=low,
                        draft_from=full)


def _apply_draft(img: Image.Image, draft: DraftRule) -> tuple[int, int] | None:
    """Ask libjpeg for a reduced decode of ``img`` (not loaded yet) per ``draft``; the size asked
    for is turned into the file's stored orientation (EXIF 5-8 swap width and height).
    Returns the full display size when a reduction was asked for, else ``None``."""
    width, height = img.size
    transposed = img.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    display = (height, width) if transposed else (width, height)
    want = draft(*display)
    if want is None:
        return None
    img.draft(img.mode, (want[1], want[0]) if transposed else want)
    return display


@dataclass(frozen=True)
class JpegBytes:
    """A JPEG file's bytes, for decoding elsewhere (``torchvision.io.decode_jpeg``, nvjpeg on
    CUDA): ``data`` ``uint8 (n,)``; ``width``/``height`` in display orientation;
    ``orientation`` the EXIF orientation tag (1-8) the decoder's output still needs."""

    data: np.ndarray
    width: int
    height: int
    orientation: int


def read_jpeg(path: str | Path) -> JpegBytes | None:
    """The bytes of a plain JPEG (baseline or progressive, YCbCr or grayscale, ending in its
    EOI marker, within PIL's decompression-bomb limit), from its header only; ``None`` for
    anything else (another format, CMYK, a truncated file, an unreadable header), which the
    caller decodes with :func:`load_image` instead, so it gets that function's exact result
    or its :class:`ImageDecodeError`."""
    path = Path(path)
    try:
        data = path.read_bytes()
        with _strict_decoding(), Image.open(path) as img:
            if img.format != "JPEG" or img.mode not in ("RGB", "L"):
                return None
            width, height = img.size
            orientation = int(img.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - load_image reports the reason
        return None
    if not data.rstrip(b"\0").endswith(b"\xff\xd9") or orientation not in range(1, 9):
        return None   # truncated (no EOI) or an orientation tag PIL would not apply
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    return JpegBytes(np.frombuffer(data, np.uint8), int(width), int(height), orientation)


def image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` of an image in display orientation (the EXIF orientation applied, as
    :func:`load_image` does), from its header only. :class:`ImageDecodeError` when unreadable."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            width, height = img.size
            if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):   # orientations that transpose
                width, height = height, width
    except FileNotFoundError:
        raise ImageDecodeError(path, "file not found") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(path, "not an image file PIL can identify") from None
    except Exception as e:  # noqa: BLE001 - any header failure is a bad input, not a crash
        raise ImageDecodeError(path, f"{type(e).__name__}: {e}") from None
    return int(width), int(height)


def significant_bits(img: Image.Image, path: Path) -> int | None:
    """Significant bits per sample a 16-bit file declares: PNG ``sBIT`` (grayscale byte), TIFF
    ``MaxSampleValue`` (its bit length); ``None`` when the file does not say."""
    if img.format == "PNG":
        return _png_sbit(path)
    if img.format == "TIFF":
        value = getattr(img, "tag_v2", {}).get(281)   # MaxSampleValue
        value = value[0] if isinstance(value, tuple) else value
        return int(value).bit_length() if isinstance(value, int) and 0 < value < 65535 else None
    return None


def _png_sbit(path: Path) -> int | None:
    """The first byte of a PNG's ``sBIT`` chunk (before the image data), else ``None``."""
    with open(path, "rb") as f:
        if f.read(8) != b"\x89PNG\r\n\x1a\n":
            return None
        while True:
            head = f.read(8)
            if len(head) < 8:
                return None
            length, kind = struct.unpack(">I", head[:4])[0], head[4:]
            if kind in (b"IDAT", b"IEND"):
                return None
            data = f.read(length)
            f.seek(4, 1)   # CRC
            if kind == b"sBIT" and data:
                return int(data[0]) if 0 < data[0] < 16 else None


@contextlib.contextmanager
def _strict_decoding() -> Iterator[None]:
    """Refuse truncated files even if another library switched PIL to tolerate them.

    Oversized images (decompression bombs) are turned into errors as well.
    """
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _to_arrays(img: Image.Image, source_mode: str, bits: int | None = None,
               ) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """Convert a loaded PIL image to ``(rgb uint8 HxWx3, alpha uint8 HxW | None, low_range)``;
    ``bits``: the significant bits of 16-bit data (:func:`significant_bits`)."""
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(img)
        gray = scale_16bit_to_8bit(values, bits)
        low = bits is None and 0 < int(values.max(initial=0)) < LOW_RANGE_LIMIT
        key = img.info.get("transparency")
        alpha = None
        if isinstance(key, int) and not isinstance(key, bool):
            alpha = np.where(values == key, 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2), alpha, low
    if mode == "F":
        raise _UnsupportedImage("floating-point images (mode F) are not supported; "
                                "convert them to 8 or 16 bit")
    has_key = "transparency" in img.info and mode in ("P", "L", "RGB")
    if mode in _ALPHA_MODES or has_key:
        target = "LA" if mode in ("LA", "La", "L") else "RGBA"
        arr = np.asarray(img.convert(target))
        color, alpha = arr[..., :-1], np.ascontiguousarray(arr[..., -1])
        if target == "LA":
            color = np.repeat(color, 3, axis=2)
        return np.ascontiguousarray(color), alpha, False
    rgb = np.asarray(img.convert("RGB"))
    return np.ascontiguousarray(rgb), None, False


def scale_16bit_to_8bit(values: np.ndarray, bits: int | None = None) -> np.ndarray:
    """Map 16-bit intensities to ``uint8`` with ``round(v / 257)`` (0 -> 0, 65535 -> 255).

    ``values``: any integer array; values outside 0..65535 are clipped first. With ``bits``
    (the file's significant bits, < 16) and every value below ``2**bits`` (data not shifted
    up to 16 bits), ``round(v · 255 / (2**bits − 1))`` instead, so the data's own full scale
    maps to 255.
    """
    v = np.clip(values.astype(np.int64), 0, 65535)
    if bits is not None and 0 < bits < 16 and int(v.max(initial=0)) < 1 << bits:
        top = (1 << bits) - 1
        return ((v * 510 + top) // (2 * top)).astype(np.uint8)
    return ((v + 128) // 257).astype(np.uint8)


def composite_alpha(rgb: np.ndarray, alpha: np.ndarray | None,
                    background: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """Blend an image over a solid colour: ``out = (rgb * a + bg * (255 - a)) / 255``, rounded.

    ``rgb``: ``uint8 (H, W, 3)``; ``alpha``: ``uint8 (H, W)`` with 255 = opaque, or ``None``
    (then ``rgb`` is returned unchanged); ``background``: ``(r, g, b)`` in 0..255, white by
    default. Returns a new ``uint8 (H, W, 3)`` array. Colours are not premultiplied.
    """
    if alpha is None:
        return rgb
    if alpha.shape != rgb.shape[:2]:
        raise ValueError(f"alpha shape {alpha.shape} does not match image {rgb.shape[:2]}")
    a = alpha.astype(np.uint32)[:, :, None]
    bg = np.asarray(background, dtype=np.uint32).reshape(1, 1, 3)
    out = (rgb.astype(np.uint32) * a + bg * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name.

    Recognised extensions (case-insensitive): ``.jpg .jpeg .png .webp .bmp .tif .tiff .gif``
    (:data:`IMAGE_EXTENSIONS`). Hidden files (names starting with ``.``, e.g. macOS
    ``._x.jpg`` resource forks) and sub-folders are skipped; :func:`survey_folder` counts the
    skipped files. Raises ``NotADirectoryError`` when ``folder`` is not a directory.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder}: not a directory of images")
    found = [p for p in folder.iterdir()
             if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
             and p.is_file()]
    return sorted(found, key=lambda p: p.name)


def find_duplicate_keys(names: Sequence[str], key: Callable[[str], str] = lambda n: Path(n).stem,
                        ) -> dict[str, str]:
    """``{name: earlier name}`` for every file whose output key (default: its stem) an earlier
    file in ``names`` already has. Outputs are named by key, so ``sa_1.jpg`` and ``sa_1.png``
    cannot both be written: stages keep the first and report the others as failures."""
    first: dict[str, str] = {}
    dupes: dict[str, str] = {}
    for name in names:
        k = key(name)
        if k in first:
            dupes[name] = first[k]
        else:
            first[k] = name
    return dupes


def survey_folder(folder: str | Path, images: Sequence[Path] | None = None) -> dict[str, int]:
    """What a split folder holds besides the images :func:`list_images` returns, so that nothing
    disappears without a trace: ``non_image_files`` (files skipped: other extensions, hidden
    files), ``sub_folders``, and ``low_range_16bit`` (16-bit PNG/TIFF files flagged
    ``low_range`` by :func:`load_image`; only those files are decoded here, the others'
    headers are read)."""
    folder = Path(folder)
    images = list_images(folder) if images is None else list(images)
    listed = {p.name for p in images}
    entries = list(folder.iterdir())
    counts = {"non_image_files": sum(1 for p in entries if p.name not in listed and p.is_file()),
              "sub_folders": sum(1 for p in entries if p.is_dir()), "low_range_16bit": 0}
    for path in images:
        if path.suffix.lower() not in _SIXTEEN_BIT_SUFFIXES:
            continue
        try:
            with Image.open(path) as img:
                sixteen = img.mode in _SIXTEEN_BIT_MODES
            if sixteen and load_image(path).low_range:
                counts["low_range_16bit"] += 1
        except (OSError, ImageDecodeError, UnidentifiedImageError, ValueError):
            continue   # the stage reports it as a bad_image row
    return counts
