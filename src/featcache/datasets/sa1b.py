"""Reading SA-1B-style folders: images, their per-image JSON, and RLE instance masks.

An SA-1B folder is flat: ``sa_<n>.jpg`` next to ``sa_<n>.json``. The JSON holds
``{"image": {image_id, width, height, file_name}, "annotations": [{id, segmentation:
{size: [h, w], counts}, bbox, area, predicted_iou, stability_score, point_coords, crop_box}]}``.
``counts`` is either COCO's compressed string or an uncompressed list of run lengths
(column-major runs, starting with a run of zeros).

Every problem with the input raises :class:`Sa1bError` whose ``code`` is the ``error`` column of
the stage's ``failures.tsv``: ``missing_file``, ``bad_json``, ``bad_image``, ``bad_rle`` or
``size_mismatch``. RLE counts are checked here before pycocotools sees them, because
pycocotools decodes counts that do not add up to ``h*w`` into out-of-bounds memory instead of
raising.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils

from featcache.datasets.images import list_images
from featcache.failures import CodedError, FailureCode

log = logging.getLogger(__name__)

_EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})  # EXIF orientations that swap width/height


class Sa1bError(CodedError, ValueError):
    """Bad SA-1B input. ``code`` is a short failure code for ``failures.tsv``."""


@dataclass(frozen=True)
class Sa1bRecord:
    """One image's SA-1B JSON: image size (pixels) and the raw annotation dicts."""

    image_id: int | str | None
    height: int
    width: int
    annotations: tuple[dict[str, Any], ...]


def list_sa1b_images(folder: str | Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by file name (:func:`images.list_images`:
    case-insensitive suffixes, hidden files and sub-folders skipped; JSON files ignored).

    Raises ``NotADirectoryError`` when ``folder`` is not a directory.
    """
    return list_images(folder)


def json_path_for(image_path: Path) -> Path:
    """The annotation file of an image: same folder, same stem, ``.json``."""
    return image_path.with_suffix(".json")


def read_sa1b_json(path: Path) -> Sa1bRecord:
    """Parse one SA-1B JSON file; raises :class:`Sa1bError` (``missing_file``, ``bad_json``)."""
    if not path.is_file():
        raise Sa1bError(FailureCode.MISSING_FILE, f"annotation file not found: {path.name}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Sa1bError(FailureCode.BAD_JSON, f"{path.name}: {e}") from None
    except RecursionError:
        raise Sa1bError(FailureCode.BAD_JSON,
                        f"{path.name}: nested too deeply to be an SA-1B file") from None
    image = data.get("image") if isinstance(data, dict) else None
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(image, dict) or not isinstance(annotations, list):
        raise Sa1bError(FailureCode.BAD_JSON, f"{path.name}: expected an 'image' mapping and an "
                                              "'annotations' list")
    height, width = image.get("height"), image.get("width")
    if not (_positive_int(height) and _positive_int(width)):
        raise Sa1bError(FailureCode.BAD_JSON, f"{path.name}: image height/width must be positive "
                                              f"integers, got {height!r}/{width!r}")
    if not all(isinstance(a, dict) for a in annotations):
        raise Sa1bError(FailureCode.BAD_JSON, f"{path.name}: every annotation must be a mapping")
    return Sa1bRecord(image.get("image_id"), height, width, tuple(annotations))


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def read_image_size(path: Path) -> tuple[int, int]:
    """``(height, width)`` of an image as decoded upright (EXIF orientation applied).

    Reads the header only. Raises :class:`Sa1bError` (``bad_image``) if it cannot be opened.
    """

    try:
        with Image.open(path) as img:
            width, height = img.size
            orientation = img.getexif().get(_EXIF_ORIENTATION)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise Sa1bError(FailureCode.BAD_IMAGE, f"{path.name}: {e}") from None
    if orientation in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    return height, width


def iter_instance_masks(record: Sa1bRecord) -> Iterator[np.ndarray]:
    """Decode every annotation of ``record`` to a ``(H, W)`` uint8 0/1 mask, in file order."""
    for index, ann in enumerate(record.annotations):
        try:
            yield decode_rle(ann.get("segmentation"), record.height, record.width)
        except Sa1bError as e:
            raise Sa1bError(e.code, f"annotation {index} (id {ann.get('id')}): {e}") from None


def decode_rle(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Decode an RLE ``{size: [h, w], counts}`` to a ``(h, w)`` uint8 0/1 mask ``[row, col]``.

    ``counts`` may be COCO's compressed string or an uncompressed list of run lengths. Raises
    :class:`Sa1bError`: ``size_mismatch`` if ``size`` is not ``[height, width]``, ``bad_rle`` if
    the RLE is malformed or its runs do not cover exactly ``h*w`` pixels. The array's memory is
    Fortran-ordered (``np.ascontiguousarray`` it for code that needs C order).
    """

    if not isinstance(segmentation, dict) or "counts" not in segmentation:
        raise Sa1bError(FailureCode.BAD_RLE,
                        "segmentation must be an RLE mapping with size and counts")
    size = segmentation.get("size")
    if not (isinstance(size, list) and len(size) == 2 and all(_positive_int(s) for s in size)):
        raise Sa1bError(FailureCode.BAD_RLE, f"RLE size must be [height, width], got {size!r}")
    if tuple(size) != (height, width):
        raise Sa1bError(FailureCode.SIZE_MISMATCH,
                        f"mask size {size} != image size [{height}, {width}]")
    counts = segmentation["counts"]
    if isinstance(counts, list):
        runs = _int_runs(counts)
        if any(not 0 <= c <= height * width for c in runs):
            raise Sa1bError(FailureCode.BAD_RLE,
                            f"an RLE run length is outside 0..{height * width}")
        _check_runs(np.asarray(runs, dtype=np.int64), height * width)
        rle = mask_utils.frPyObjects({"size": list(size), "counts": counts}, height, width)
    elif isinstance(counts, (str, bytes)):
        _check_runs(rle_counts_from_string(counts), height * width)
        text = counts.encode("ascii") if isinstance(counts, str) else counts
        rle = {"size": list(size), "counts": text}
    else:
        raise Sa1bError(FailureCode.BAD_RLE, f"RLE counts must be a string or a list, got "
                                             f"{type(counts).__name__}")
    # Column-major like the RLE itself: a C-order copy would cost more than the decode.
    return mask_utils.decode(rle)


def _int_runs(counts: list[Any]) -> list[int]:
    if not all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
        raise Sa1bError(FailureCode.BAD_RLE, "uncompressed RLE counts must be integers")
    return counts


def _check_runs(runs: np.ndarray, pixels: int) -> None:
    if (runs < 0).any():
        raise Sa1bError(FailureCode.BAD_RLE, "RLE has a negative run length")
    total = int(runs.sum())
    if total != pixels:
        raise Sa1bError(FailureCode.BAD_RLE,
                        f"RLE runs cover {total} pixels, the mask has {pixels}")


def rle_counts_from_string(text: str | bytes) -> np.ndarray:
    """Run lengths ``(M,)`` int64 of COCO's compressed RLE string (pycocotools' ``rleFrString``).

    Each value is a little-endian base-32 number in characters ``48 + v`` (6 bits: 5 of value,
    ``0x20`` = more characters follow, ``0x10`` in the last = negative); from the fourth value
    on, each is stored as the difference to the value two places before it.
    """
    try:
        raw = text.encode("ascii") if isinstance(text, str) else bytes(text)
    except UnicodeEncodeError:
        raise Sa1bError(FailureCode.BAD_RLE, "compressed RLE has non-ASCII characters") from None
    codes = np.frombuffer(raw, dtype=np.uint8).astype(np.int64) - 48
    if codes.size == 0:
        return codes
    if ((codes < 0) | (codes > 63)).any():
        raise Sa1bError(FailureCode.BAD_RLE, "compressed RLE has characters outside '0'..'o'")
    more = (codes & 0x20) != 0
    if more[-1]:
        raise Sa1bError(FailureCode.BAD_RLE, "compressed RLE is truncated")
    ends = np.flatnonzero(~more)
    starts = np.concatenate(([0], ends[:-1] + 1))
    group = np.repeat(np.arange(ends.size), ends - starts + 1)
    digit = np.arange(codes.size) - starts[group]
    if digit.max() > 11:  # more than 60 bits: not a run length of any real image
        raise Sa1bError(FailureCode.BAD_RLE, "compressed RLE has an oversized value")
    values = np.zeros(ends.size, dtype=np.int64)
    np.add.at(values, group, (codes & 0x1F) << (5 * digit))
    negative = (codes[ends] & 0x10) != 0
    values[negative] -= np.left_shift(1, 5 * (digit[ends][negative] + 1))
    runs = values.copy()
    runs[1::2] = np.cumsum(values[1::2])
    runs[2::2] = np.cumsum(values[2::2])
    return runs
