"""The failure codes: the ``error`` column of every stage's ``failures.tsv``, listed once.

A bad input is one row ``output  item  error  message`` (``featcache.engine.Failure``), never a
crash and never a silently wrong feature; ``error`` is one of :class:`FailureCode` (building a
``Failure`` with any other code raises), the message says which file and what is wrong. The
same event has the same code in every stage: an image that does not decode is ``bad_image``
whether a grid stage, SAM2, SigLIP or the UV index met it. :data:`FAILURES` gives each code its
meaning and the stages that emit it; the README's failure table is :func:`failure_table`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

ANY_STAGE = "any stage"


class FailureCode(StrEnum):
    """One kind of failure (the value is what ``failures.tsv`` holds)."""

    # images and files, every dataset
    BAD_IMAGE = "bad_image"
    DUPLICATE_KEY = "duplicate_key"
    MISSING_FILE = "missing_file"
    SIZE_MISMATCH = "size_mismatch"
    # annotations (SA-1B JSON, COCO panoptic JSON and PNG)
    BAD_JSON = "bad_json"
    BAD_RLE = "bad_rle"
    BAD_ANNOTATION = "bad_annotation"
    MISSING_IMAGE_ENTRY = "missing_image_entry"
    UNSAFE_PATH = "unsafe_path"
    BAD_SEGMENT = "bad_segment"
    BAD_PNG = "bad_png"
    EMPTY_MASK = "empty_mask"
    # ScanNet scenes and frames
    BAD_SCENE_NAME = "bad_scene_name"
    MISSING_SCENE = "missing_scene"
    BAD_MATRIX = "bad_matrix"
    BAD_POSE = "bad_pose"
    BAD_INTRINSICS = "bad_intrinsics"
    INTRINSICS_MISMATCH = "intrinsics_mismatch"
    BAD_DEPTH = "bad_depth"
    EMPTY_DEPTH = "empty_depth"
    BAD_POINT_CLOUD = "bad_point_cloud"
    INTRINSICS_CHECK = "intrinsics_check"
    POSE_CHECK = "pose_check"
    # an upstream output (sample_point_feats reads the CLIP grids)
    MISSING_GRID = "missing_grid"
    BAD_GRID = "bad_grid"
    BAD_PROVENANCE = "bad_provenance"
    # output names (per-item file layouts: npy, npz)
    BAD_NAME = "bad_name"
    NAME_TOO_LONG = "name_too_long"
    NAME_COLLISION = "name_collision"
    # the engine
    ITEM_TIMEOUT = "item_timeout"
    UNEXPECTED_ERROR = "unexpected_error"
    COMPUTE_ERROR = "compute_error"


class CodedError(Exception):
    """An error that is one ``failures.tsv`` row: ``code`` (a :class:`FailureCode`) and the
    message. The readers' and writers' errors subclass it (``PanopticError``, ``ScanNetError``,
    ``Sa1bError``, ``ItemNameError``, ``GridError``; the engine's ``ItemTimeout``), beside
    ``ValueError`` where theirs was one, so callers that catch ``ValueError`` still do."""

    def __init__(self, code: FailureCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class FailureInfo:
    """What a code means (one line) and which stages emit it."""

    meaning: str
    stages: tuple[str, ...]


_IMAGE_STAGES = ("extract_clip_grid", "extract_dinov2", "extract_sam2", "extract_siglip",
                 "edge_maps_methodB", "build_uv_index")
_SA1B = ("edge_maps_methodB",)
_COCO = ("extract_siglip",)
_SCANNET = ("build_uv_index",)
_UV = ("build_uv_index",)
_POINTS = ("sample_point_feats",)

FAILURES: dict[FailureCode, FailureInfo] = {
    FailureCode.BAD_IMAGE: FailureInfo(
        "an image file does not decode completely (truncated, corrupt, unsupported format)",
        _IMAGE_STAGES),
    FailureCode.DUPLICATE_KEY: FailureInfo(
        "a second input claims an output key already taken (two files with one stem or image "
        "id, an image annotated twice, a segment id listed twice); the first one is written",
        ("extract_clip_grid", "extract_dinov2", "extract_sam2", "extract_siglip",
         "edge_maps_methodB")),
    FailureCode.MISSING_FILE: FailureInfo(
        "a file the item needs is not there (SA-1B JSON, panoptic PNG, ScanNet pose, depth, "
        "intrinsics or point cloud)", ("extract_siglip", "edge_maps_methodB", *_SCANNET)),
    FailureCode.SIZE_MISMATCH: FailureInfo(
        "an annotation's size (JSON, mask, panoptic PNG) differs from its image's",
        ("extract_siglip", "edge_maps_methodB")),
    FailureCode.BAD_JSON: FailureInfo(
        "an annotation JSON is unreadable or not an SA-1B / COCO panoptic file",
        ("extract_siglip", "edge_maps_methodB")),
    FailureCode.BAD_RLE: FailureInfo(
        "an SA-1B mask is not a valid RLE of the image's size", _SA1B),
    FailureCode.BAD_ANNOTATION: FailureInfo(
        "a COCO panoptic annotation lacks an integer image_id, a file_name, segments_info or "
        "a valid width/height", _COCO),
    FailureCode.MISSING_IMAGE_ENTRY: FailureInfo(
        "a COCO panoptic annotation names an image id that 'images' does not list", _COCO),
    FailureCode.UNSAFE_PATH: FailureInfo(
        "a file name in the JSON is empty, absolute or leaves its folder (never opened)", _COCO),
    FailureCode.BAD_SEGMENT: FailureInfo(
        "a segments_info entry has an invalid id, iscrowd, category_id, area or bbox", _COCO),
    FailureCode.BAD_PNG: FailureInfo(
        "a panoptic PNG does not decode or is not an RGB id map", _COCO),
    FailureCode.EMPTY_MASK: FailureInfo(
        "a segment listed in the JSON has no pixel in the panoptic PNG", _COCO),
    FailureCode.BAD_SCENE_NAME: FailureInfo(
        "a scene id is not a plain folder name", _UV),
    FailureCode.MISSING_SCENE: FailureInfo(
        "a listed scene has no frames", _UV),
    FailureCode.BAD_MATRIX: FailureInfo(
        "a pose or intrinsics file is not a 4x4 matrix of numbers", _SCANNET),
    FailureCode.BAD_POSE: FailureInfo(
        "a camera pose is not finite (tracking lost) or not a rigid transform", _SCANNET),
    FailureCode.BAD_INTRINSICS: FailureInfo(
        "intrinsics are not finite or have a focal length <= 0", _SCANNET),
    FailureCode.INTRINSICS_MISMATCH: FailureInfo(
        "the intrinsics do not fit the frame's colour image size", _SCANNET),
    FailureCode.BAD_DEPTH: FailureInfo(
        "a depth map does not decode or is not single-channel", _SCANNET),
    FailureCode.EMPTY_DEPTH: FailureInfo(
        "a depth map is all zero", _UV),
    FailureCode.BAD_POINT_CLOUD: FailureInfo(
        "a scene's PLY point cloud cannot be read as x, y, z vertices", _SCANNET),
    FailureCode.INTRINSICS_CHECK: FailureInfo(
        "too few depth pixels land inside the colour image: the intrinsics do not describe "
        "this frame", _UV),
    FailureCode.POSE_CHECK: FailureInfo(
        "too few scene points agree with the depth map: the pose is not this frame's "
        "camera-to-world pose", _UV),
    FailureCode.MISSING_GRID: FailureInfo(
        "the CLIP grid output has no grid under the frame's key (the two outputs' keys "
        "disagree; verify fails on it)", _POINTS),
    FailureCode.BAD_GRID: FailureInfo(
        "a CLIP grid is unreadable or not a square (g*g, C) grid", _POINTS),
    FailureCode.BAD_PROVENANCE: FailureInfo(
        "the CLIP grid output's provenance lacks its preprocessing", _POINTS),
    FailureCode.BAD_NAME: FailureInfo(
        "npy/npz layouts: a key cannot be a file name (NUL, control character, '..', "
        "reserved name)", (ANY_STAGE,)),
    FailureCode.NAME_TOO_LONG: FailureInfo(
        "npy/npz layouts: a key's file name would exceed the file system's 255 bytes",
        (ANY_STAGE,)),
    FailureCode.NAME_COLLISION: FailureInfo(
        "npy/npz layouts: two keys would write the same file (or one the other's folder)",
        (ANY_STAGE,)),
    FailureCode.ITEM_TIMEOUT: FailureInfo(
        "loading the item took longer than $FEATCACHE_ITEM_TIMEOUT_S (a hung read)",
        (ANY_STAGE,)),
    FailureCode.UNEXPECTED_ERROR: FailureInfo(
        "loading the item raised an error no reader names (the message starts with its type)",
        (ANY_STAGE,)),
    FailureCode.COMPUTE_ERROR: FailureInfo(
        "the model or method failed on this item alone, retried on its own (the message "
        "starts with the error's type)", (ANY_STAGE,)),
}


def unexpected_message(error: BaseException) -> str:
    """``<Type>: <message>`` of an error that has no code of its own."""
    return f"{type(error).__name__}: {str(error) or repr(error)}"


def code_of(error: BaseException) -> tuple[FailureCode, str]:
    """``(code, message)`` of an error a job did not turn into a row itself: its own ``code``
    when it carries a :class:`FailureCode` (a :class:`CodedError`, or the engine's item
    timeout, whose code is a class attribute), else ``unexpected_error`` with the error's type
    in the message."""
    code = getattr(error, "code", None)
    if isinstance(code, FailureCode):
        return code, str(error) or repr(error)
    return FailureCode.UNEXPECTED_ERROR, unexpected_message(error)


def failure_table() -> str:
    """The README's table of failure codes (markdown, one row per code, in code order)."""
    rows = ["| code | meaning | emitted by |", "|---|---|---|"]
    rows += [f"| `{code}` | {info.meaning} | {', '.join(info.stages)} |"
             for code, info in FAILURES.items()]
    return "\n".join(rows) + "\n"
