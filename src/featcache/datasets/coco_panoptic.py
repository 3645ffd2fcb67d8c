"""Reading a COCO panoptic split: the JSON, the RGB-encoded PNGs, the images.

Official layout under a COCO root (``<split>`` e.g. ``val2017``)::

    annotations/panoptic_<split>.json
    annotations/panoptic_<split>/<name>.png    (or panoptic_<split>/<name>.png beside the root)
    <split>/<file_name>                        the images named in the JSON's ``images``

A panoptic PNG is ``uint8 (H, W, 3)`` RGB; pixel ``(y, x)`` belongs to the segment whose id is
``R + 256 G + 256^2 B`` (0 = void, unlabelled). Rows are ``y`` (down), columns ``x`` (right).

Reading the JSON never fails on one bad annotation: :func:`read_panoptic_split` returns one
:class:`PanopticEntry` per annotation, each holding either a :class:`PanopticImage` or a
:class:`PanopticError` (code + message) that the caller reports as a failure row. Items are
named by the image id zero-padded to 12 digits (``000000397133``); a second annotation of the
same image id becomes ``000000397133~1`` and an error, so item names stay unique.

Every file name the JSON gives (an image's and its PNG's ``file_name``) must stay inside its
folder: an absolute name, a ``..`` component, a NUL byte or an empty name makes the image an
``unsafe_path`` error, and the file is never opened (nor hashed). Every field is checked for
its type: a wrong type (a ``bbox`` of strings, ``null`` or nested lists, a string id, a NaN
size) is a ``bad_annotation`` error of that image or a ``bad_segment`` error of that segment,
never an exception; only a file that is not JSON at all (or not a panoptic file) is one
``bad_json`` error naming it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from featcache.datasets.images import ImageDecodeError, load_image
from featcache.failures import CodedError, FailureCode

# PIL modes whose pixels are the id colours themselves (grey or 16-bit PNGs are not panoptic).
_ID_COLOUR_MODES = ("RGB", "RGBA", "P", "PA")


class PanopticError(CodedError):
    """One annotation, image or segment that cannot be used; ``code`` is the failure kind
    (a :class:`~featcache.failures.FailureCode`: ``bad_annotation``, ``duplicate_key``, ...)."""


@dataclass(frozen=True)
class PanopticSegment:
    """One entry of an annotation's ``segments_info``. ``bbox`` is the JSON's ``[x, y, w, h]``
    (informational: masks and crops are always computed from the PNG)."""

    id: int
    category_id: int
    iscrowd: bool
    area: int
    bbox: tuple[float, ...]


@dataclass(frozen=True)
class PanopticImage:
    """An image and its segments: ``image_file`` relative to ``<split>/``, ``png_file``
    relative to the PNG folder; ``width``/``height`` as the JSON says (pixels, 0 if absent).
    ``bad_segments`` pairs a failure item name with the error of each unusable
    ``segments_info`` entry (malformed, or a repeated id: only the first one is used)."""

    image_id: int
    image_file: str
    png_file: str
    width: int
    height: int
    segments: tuple[PanopticSegment, ...]
    bad_segments: tuple[tuple[str, PanopticError], ...] = ()


@dataclass(frozen=True)
class PanopticEntry:
    """One annotation: ``item`` names it; exactly one of ``image`` / ``error`` is set."""

    item: str
    image: PanopticImage | None = None
    error: PanopticError | None = None


@dataclass(frozen=True)
class PanopticSplit:
    """A split on disk: where its parts are and one entry per annotation (JSON order)."""

    json_path: Path
    image_dir: Path
    png_dir: Path
    entries: tuple[PanopticEntry, ...]


def image_key(image_id: int) -> str:
    """The image id zero-padded to 12 digits, as COCO file names (``000000397133``)."""
    return f"{image_id:012d}"


def segment_key(image_id: int, segment_id: int) -> str:
    """``<image_id:012d>_<segment_id>``, the seed's name of one segment's feature."""
    return f"{image_key(image_id)}_{segment_id}"


def json_path_for(root: str | Path, split: str) -> Path:
    """``<root>/annotations/panoptic_<split>.json``."""
    return Path(root) / "annotations" / f"panoptic_{split}.json"


def png_dir_candidates(root: str | Path, split: str) -> list[Path]:
    """Where the PNGs may be, in order of preference."""
    root = Path(root)
    return [root / "annotations" / f"panoptic_{split}", root / f"panoptic_{split}"]


def locate_png_dir(root: str | Path, split: str) -> Path:
    """The first existing PNG folder; raises ``FileNotFoundError`` naming every place tried."""
    candidates = png_dir_candidates(root, split)
    for folder in candidates:
        if folder.is_dir():
            return folder
    raise FileNotFoundError("no panoptic PNG folder; looked for "
                            + " and ".join(str(c) for c in candidates))


def read_panoptic_split(root: str | Path, split: str) -> PanopticSplit:
    """Read the split's JSON and locate its folders.

    Raises ``FileNotFoundError`` for a missing JSON or PNG folder and :class:`PanopticError`
    (code ``bad_json``) when the JSON is not a panoptic annotation file at all; a bad
    annotation inside it becomes an entry with an error instead.
    """
    path = json_path_for(root, split)
    if not path.is_file():
        raise FileNotFoundError(f"panoptic annotation file not found: {path}")
    png_dir = locate_png_dir(root, split)
    data = read_panoptic_json(path)
    entries = parse_annotations(data["annotations"], data.get("images", []))
    return PanopticSplit(path, Path(root) / split, png_dir, tuple(entries))


def read_panoptic_json(path: Path) -> dict[str, Any]:
    """The parsed JSON; raises :class:`PanopticError` (``bad_json``) if it is unusable."""
    try:
        with path.open(encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:   # UnicodeDecodeError and JSONDecodeError included
        raise PanopticError(FailureCode.BAD_JSON, f"{path}: not readable JSON ({e})") from None
    except RecursionError:
        raise PanopticError(FailureCode.BAD_JSON,
                            f"{path}: not readable JSON (nested too deeply)") from None
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise PanopticError(FailureCode.BAD_JSON,
                            f"{path}: no 'annotations' list; not a COCO panoptic file")
    if not isinstance(data.get("images", []), list):
        raise PanopticError(FailureCode.BAD_JSON, f"{path}: 'images' is not a list")
    return data


def parse_annotations(annotations: list[Any], images: Iterable[Any]) -> list[PanopticEntry]:
    """One entry per annotation, joined with ``images`` by id; duplicates and malformed
    annotations become error entries."""
    by_id = {im["id"]: im for im in images if isinstance(im, dict) and _is_int(im.get("id"))}
    seen: dict[int, int] = {}
    entries = []
    for index, ann in enumerate(annotations):
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        if not _is_int(image_id) or image_id < 0:
            entries.append(PanopticEntry(f"annotation[{index}]", error=PanopticError(
                FailureCode.BAD_ANNOTATION, f"annotation {index} has no integer image_id")))
            continue
        count = seen.get(image_id, 0)
        seen[image_id] = count + 1
        item = image_key(image_id) + (f"~{count}" if count else "")
        if count:
            entries.append(PanopticEntry(item, error=PanopticError(
                FailureCode.DUPLICATE_KEY, f"image {image_id} is annotated {count + 1} times; "
                                           "only the first annotation is used")))
            continue
        try:
            entries.append(PanopticEntry(item, image=_parse_image(ann, by_id.get(image_id))))
        except PanopticError as e:
            entries.append(PanopticEntry(item, error=e))
    return entries


def _parse_image(ann: dict[str, Any], image: dict[str, Any] | None) -> PanopticImage:
    image_id = ann["image_id"]
    if image is None:
        raise PanopticError(FailureCode.MISSING_IMAGE_ENTRY, f"image {image_id} is not in 'images'")
    png_file, image_file = ann.get("file_name"), image.get("file_name")
    if not isinstance(png_file, str) or not isinstance(image_file, str):
        raise PanopticError(FailureCode.BAD_ANNOTATION, f"image {image_id}: missing file_name")
    contained_name(image_file, f"image {image_id}: images[].file_name")
    contained_name(png_file, f"image {image_id}: annotations[].file_name")
    segments = ann.get("segments_info")
    if not isinstance(segments, list):
        raise PanopticError(FailureCode.BAD_ANNOTATION, f"image {image_id}: no segments_info list")
    size = {}
    for key in ("width", "height"):
        value = image.get(key, 0)
        if not (_is_int(value) and value >= 0):
            raise PanopticError(FailureCode.BAD_ANNOTATION,
                                f"image {image_id}: {key} is {value!r}; "
                                "expected a non-negative integer")
        size[key] = value
    good, bad = parse_segments(segments, image_id)
    return PanopticImage(image_id=image_id, image_file=image_file, png_file=png_file,
                         width=size["width"], height=size["height"],
                         segments=good, bad_segments=bad)


def contained_name(name: str, what: str) -> str:
    """``name`` if it is a relative path that stays inside its folder (no absolute path, drive
    letter, ``..`` component or NUL byte; ``\\`` counts as a separator), else
    :class:`PanopticError` ``unsafe_path`` (the file is then never opened)."""
    posix = name.replace("\\", "/")
    parts = [p for p in posix.split("/") if p not in ("", ".")]
    if "\x00" in name or not parts:
        raise PanopticError(FailureCode.UNSAFE_PATH,
                            f"{what} {name!r} is empty or holds a NUL byte")
    if posix.startswith("/") or (len(posix) >= 2 and posix[1] == ":"):
        raise PanopticError(FailureCode.UNSAFE_PATH,
                            f"{what} {name!r} is an absolute path; names must "
                            "be relative to their folder")
    if ".." in parts:
        raise PanopticError(FailureCode.UNSAFE_PATH,
                            f"{what} {name!r} has a '..' component: it would "
                            "leave its folder")
    return name


def parse_segments(entries: list[Any], image_id: int,
                   ) -> tuple[tuple[PanopticSegment, ...], tuple[tuple[str, PanopticError], ...]]:
    """Valid segments of one image (JSON order) and ``(item, error)`` for the others.

    The item of a bad entry is its segment key, or ``<image_id:012d>_segments_info[<i>]``
    when it has no usable id; a repeated id keeps the first entry.
    """
    good: list[PanopticSegment] = []
    bad: list[tuple[str, PanopticError]] = []
    seen: set[int] = set()
    for index, entry in enumerate(entries):
        try:
            seg = parse_segment(entry, image_id)
        except PanopticError as e:
            sid = entry.get("id") if isinstance(entry, dict) else None
            name = segment_key(image_id, sid) if _is_int(sid) and sid >= 0 else \
                f"{image_key(image_id)}_segments_info[{index}]"
            bad.append((name, e))
            continue
        if seg.id in seen:
            bad.append((f"{segment_key(image_id, seg.id)}~{index}", PanopticError(
                FailureCode.DUPLICATE_KEY,
                f"image {image_id}: segment id {seg.id} is listed twice; "
                "only the first entry is used")))
            continue
        seen.add(seg.id)
        good.append(seg)
    return tuple(good), tuple(bad)


def parse_segment(seg: Any, image_id: int) -> PanopticSegment:
    """One ``segments_info`` entry; raises :class:`PanopticError` (``bad_segment``) when its
    id is not a positive integer below ``256^3`` or ``iscrowd`` is not 0/1."""
    sid = seg.get("id") if isinstance(seg, dict) else None
    if not _is_int(sid) or not 0 < sid < 256 ** 3:
        raise PanopticError(FailureCode.BAD_SEGMENT,
                            f"image {image_id}: segment id {sid!r} is not an "
                            "integer in 1..16777215")
    crowd = seg.get("iscrowd", 0)
    if not isinstance(crowd, int) or crowd not in (0, 1):   # 0/1 (or false/true)
        raise PanopticError(FailureCode.BAD_SEGMENT, f"image {image_id}: segment {sid} has "
                                                     f"iscrowd={crowd!r}; expected 0 or 1")
    category, area = seg.get("category_id", -1), seg.get("area", 0)
    if not _is_int(category):
        raise PanopticError(FailureCode.BAD_SEGMENT, f"image {image_id}: segment {sid} has "
                            f"category_id={category!r}; expected an integer")
    if not (_is_number(area) and area >= 0):
        raise PanopticError(FailureCode.BAD_SEGMENT, f"image {image_id}: segment {sid} has "
                                                     f"area={area!r}; expected a number >= 0")
    bbox = seg.get("bbox", [])
    if not (isinstance(bbox, list) and len(bbox) in (0, 4) and all(_is_number(v) for v in bbox)):
        raise PanopticError(FailureCode.BAD_SEGMENT, f"image {image_id}: segment {sid} has "
                            f"bbox={_short(bbox)}; expected [x, y, w, h] numbers")
    return PanopticSegment(id=sid, category_id=category, iscrowd=bool(crowd), area=int(area),
                           bbox=tuple(float(v) for v in bbox))


def decode_panoptic_png(path: str | Path) -> np.ndarray:
    """Segment ids of a panoptic PNG: ``int64 (H, W)``, ``R + 256 G + 256^2 B``.

    Raises :class:`PanopticError`: ``missing_file`` if the file does not exist, ``bad_png`` if
    it is truncated/corrupt or not an RGB-coloured image (grey or 16-bit PNGs carry no ids).
    """

    path = Path(path)
    if not path.is_file():
        raise PanopticError(FailureCode.MISSING_FILE, f"panoptic PNG not found: {path}")
    try:
        decoded = load_image(path)
    except ImageDecodeError as e:
        raise PanopticError(FailureCode.BAD_PNG, str(e)) from None
    if decoded.source_mode not in _ID_COLOUR_MODES:
        raise PanopticError(FailureCode.BAD_PNG, f"{path}: mode {decoded.source_mode} is not an "
                                                 "RGB-encoded panoptic PNG")
    return rgb_to_ids(decoded.rgb)


def read_ids_and_image(split: PanopticSplit, image: PanopticImage,
                       ) -> tuple[np.ndarray, np.ndarray]:
    """An image's segment ids ``int64 (H, W)`` and pixels ``uint8 (H, W, 3)``, pixel-aligned.

    The image is decoded by :func:`featcache.datasets.images.load_image` (EXIF orientation applied,
    grayscale and CMYK converted to RGB, alpha ignored). Raises :class:`PanopticError`:
    ``missing_file``/``bad_png`` (see :func:`decode_panoptic_png`), ``bad_image`` (missing or
    undecodable image), ``size_mismatch`` (PNG and image differ in size: masks would be
    misaligned, e.g. an EXIF rotation the PNG does not have).
    """

    ids = decode_panoptic_png(split.png_dir / image.png_file)
    try:
        rgb = load_image(split.image_dir / image.image_file).rgb
    except ImageDecodeError as e:
        raise PanopticError(FailureCode.BAD_IMAGE, str(e)) from None
    if rgb.shape[:2] != ids.shape:
        raise PanopticError(FailureCode.SIZE_MISMATCH, f"{image.image_file} is {rgb.shape[1]}x"
                                                       f"{rgb.shape[0]} but {image.png_file} is "
                                                       f"{ids.shape[1]}x{ids.shape[0]} (WxH)")
    return ids, rgb


def rgb_to_ids(rgb: np.ndarray) -> np.ndarray:
    """``uint8 (H, W, 3)`` -> ``int64 (H, W)`` ids ``R + 256 G + 256^2 B``."""
    c = rgb.astype(np.int64)
    return c[..., 0] + 256 * c[..., 1] + 65536 * c[..., 2]


def ids_to_rgb(ids: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_ids`: ``int (H, W)`` in ``0..256^3-1`` -> ``uint8 (H, W, 3)``."""
    ids = np.asarray(ids, dtype=np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A finite JSON number (not a bool; NaN and Infinity, which Python's json accepts, are
    not numbers here)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
