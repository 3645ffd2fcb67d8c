"""Reading the ScanNet layout (as exported by ScanNet's SensReader).

::

    <root>/<scene list>.txt                  one scene id per line
    <root>/scans/<scene>/color/<i>.jpg       colour frames, any size (e.g. 1296x968)
    <root>/scans/<scene>/depth/<i>.png       uint16 depth in millimetres, its own size
    <root>/scans/<scene>/pose/<i>.txt        4x4 camera-to-world, text (may be all -inf)
    <root>/scans/<scene>/intrinsic/intrinsic_color.txt, intrinsic_depth.txt   4x4, text
    <root>/scans/<scene>/<scene>_vh_clean_2.ply   vertices x y z (red green blue ...), or .npy
    <root>/scans/<scene>/<scene>.txt             optional meta: colorWidth/colorHeight, ...

Frame ids ``<i>`` are integers, written plain (``11``, SensReader) or zero-padded (``000011``,
the 25k-frames release), and are ordered numerically (``2`` before ``10``); a frame's identity is
its number (:mod:`featcache.datasets.frames`). Scene ids come from a list file and must be plain folder
names of ``scans/`` (:func:`check_scene_name`). Intrinsics are checked against the image they
are used with (:func:`fit_intrinsics`): the 25k-frames release pairs 640x480 colour with the
1296x968 calibration.
Readers raise :class:`ScanNetError` (with an error code for ``failures.tsv``) on bad input.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from featcache.datasets.frames import frame_number
from featcache.datasets.images import ImageDecodeError, image_size
from featcache.failures import CodedError, FailureCode

COLOR_SUFFIXES = (".jpg", ".jpeg", ".png")
#: Largest relative difference of aspect ratios (W/H) for which intrinsics calibrated at one
#: size are scaled to an image of another (1296x968 -> 640x480 differs by 0.41%).
ASPECT_TOLERANCE = 0.02
_SCENE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
    "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}


class ScanNetError(CodedError, ValueError):
    """Bad or missing ScanNet input; ``code`` is the short error name for ``failures.tsv``."""


@dataclass(frozen=True)
class FramePaths:
    """The files of one frame; ``stem`` is the frame id as written in the file names."""

    stem: str
    color: Path
    depth: Path
    pose: Path


def read_scene_list(path: Path) -> list[str]:
    """Scene ids of a scene list file, in file order, blank lines and ``#`` comments skipped."""
    if not path.is_file():
        raise ScanNetError(FailureCode.MISSING_FILE, f"scene list not found: {path}")
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def check_scene_name(entry: str) -> str | None:
    """Why a scene-list entry is not a scene id (a plain folder name inside ``scans/``: no
    ``/``, no ``..``, no leading dot), else ``None``."""
    if _SCENE_NAME.fullmatch(entry) and ".." not in entry:
        return None
    return (f"scene list entry {entry!r} is not a folder name inside scans/ (letters, digits, "
            "'.', '_', '-'; no '/', no '..')")


def list_frame_stems(scene_dir: Path) -> list[str]:
    """Integer frame ids found in any of ``color/``, ``depth/``, ``pose/``, numerically sorted
    (stems as written: ``"11"`` or ``"000011"``; see :func:`featcache.datasets.frames.frame_number`).

    A frame missing one of its files is still listed (so that it is reported, not ignored).
    """
    stems = set()
    for sub in ("color", "depth", "pose"):
        folder = scene_dir / sub
        if folder.is_dir():
            stems.update(p.stem for p in folder.iterdir() if frame_number(p.stem) is not None)
    return sorted(stems, key=lambda s: (frame_number(s), s))


def select_frames(stems: list[str], frames_per_scene: int, frame_stride: int) -> list[str]:
    """Every ``frame_stride``-th frame, then the first ``frames_per_scene`` (0 = all)."""
    chosen = stems[::frame_stride]
    return chosen[:frames_per_scene] if frames_per_scene > 0 else chosen


def frame_paths(scene_dir: Path, stem: str) -> FramePaths:
    """Locate one frame's files; raises ``missing_file`` when one is absent."""
    colors = [scene_dir / "color" / f"{stem}{s}" for s in COLOR_SUFFIXES]
    color = next((p for p in colors if p.is_file()), colors[0])
    paths = FramePaths(stem, color, scene_dir / "depth" / f"{stem}.png",
                       scene_dir / "pose" / f"{stem}.txt")
    for path in (paths.color, paths.depth, paths.pose):
        if not path.is_file():
            raise ScanNetError(FailureCode.MISSING_FILE, f"{path.name} missing in {path.parent}")
    return paths


def read_matrix(path: Path, shape: tuple[int, int] = (4, 4)) -> np.ndarray:
    """A whitespace-separated text matrix (pose or intrinsics) as float64 of ``shape``."""
    if not path.is_file():
        raise ScanNetError(FailureCode.MISSING_FILE, f"not found: {path}")
    try:
        values = np.array(path.read_text().split(), dtype=np.float64)
    except ValueError as e:
        raise ScanNetError(FailureCode.BAD_MATRIX, f"{path.name}: {e}") from None
    if values.size != shape[0] * shape[1]:
        raise ScanNetError(FailureCode.BAD_MATRIX, f"{path.name}: {values.size} numbers, expected "
                                                   f"{shape[0]}x{shape[1]}")
    return values.reshape(shape)


def read_pose(path: Path) -> np.ndarray:
    """Camera-to-world ``(4,4)`` float64; raises ``bad_pose`` when not finite (ScanNet's -inf
    poses where tracking was lost) or not a rigid transform (rotation determinant 1 within
    1e-2, last row ``0 0 0 1``: ScanNet writes 6 decimals)."""
    pose = read_matrix(path)
    if not np.isfinite(pose).all():
        raise ScanNetError(FailureCode.BAD_POSE, f"{path.name}: pose is not finite (tracking lost)")
    rigid = np.allclose(pose[3], [0, 0, 0, 1], atol=1e-6) \
        and abs(np.linalg.det(pose[:3, :3]) - 1) <= 1e-2
    if not rigid:
        raise ScanNetError(FailureCode.BAD_POSE,
                           f"{path.name}: not a rigid camera-to-world transform")
    return pose


def read_intrinsics(path: Path) -> np.ndarray:
    """Pinhole ``K (3,3)`` float64 from ScanNet's 4x4 (or a plain 3x3) intrinsics file."""
    values = read_matrix(path, (4, 4)) if _count_numbers(path) == 16 else read_matrix(path, (3, 3))
    k = values[:3, :3]
    if not np.isfinite(k).all():
        raise ScanNetError(FailureCode.BAD_INTRINSICS, f"{path.name}: intrinsics are not finite")
    if k[0, 0] <= 0 or k[1, 1] <= 0:
        raise ScanNetError(FailureCode.BAD_INTRINSICS, f"{path.name}: focal lengths must be > 0")
    return k


def read_scene_meta(path: Path) -> dict[str, str]:
    """ScanNet's ``<scene>.txt`` (``key = value`` lines) as a dict; empty when absent."""
    if not path.is_file():
        return {}
    meta = {}
    for line in path.read_text(errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            meta[key.strip()] = value.strip()
    return meta


def calibration_size(meta: dict[str, str], camera: str) -> tuple[int, int] | None:
    """``(W, H)`` the ``camera`` (``color`` or ``depth``) intrinsics were calibrated at, from
    the scene meta (``colorWidth``/``colorHeight``), or ``None`` when it does not say."""
    try:
        size = (int(float(meta[f"{camera}Width"])), int(float(meta[f"{camera}Height"])))
    except (KeyError, ValueError):
        return None
    return size if size[0] > 0 and size[1] > 0 else None


def principal_point_offset(k: np.ndarray, size: tuple[int, int]) -> float:
    """Distance of the principal point from the image centre ``((W-1)/2, (H-1)/2)`` as a
    fraction of the image side (the larger of x and y)."""
    width, height = size
    return max(abs(k[0, 2] - (width - 1) / 2) / width, abs(k[1, 2] - (height - 1) / 2) / height)


def scale_intrinsics(k: np.ndarray, sx: float, sy: float) -> np.ndarray:
    """``K`` for the image resized by ``(sx, sy)``: pixel centres at integers, so
    ``u' = (u + 0.5)·sx − 0.5`` (focal lengths scale, principal points move accordingly)."""
    out = np.array(k, dtype=np.float64)
    out[0, 0], out[0, 1], out[1, 1] = k[0, 0] * sx, k[0, 1] * sx, k[1, 1] * sy
    out[0, 2], out[1, 2] = (k[0, 2] + 0.5) * sx - 0.5, (k[1, 2] + 0.5) * sy - 0.5
    return out


@dataclass(frozen=True)
class FittedIntrinsics:
    """Intrinsics for one image: ``k`` as used; ``scaled_from`` the calibration size when
    ``k`` was scaled from it (else ``None``), ``how`` where that size came from."""

    k: np.ndarray
    scaled_from: tuple[int, int] | None = None
    how: str = ""

    def note(self, size: tuple[int, int]) -> dict[str, object] | None:
        """Provenance entry of a scaled fit, else ``None``."""
        if self.scaled_from is None:
            return None
        return {"calibrated_at": list(self.scaled_from), "image": list(size),
                "scale": [size[0] / self.scaled_from[0], size[1] / self.scaled_from[1]],
                "calibration_size_from": self.how}


def fit_intrinsics(k: np.ndarray, size: tuple[int, int], what: str, tolerance: float,
                   calibrated: tuple[int, int] | None = None) -> FittedIntrinsics:
    """Check ``K`` against the image of ``size = (W, H)`` it projects into, scaling it when it
    was calibrated at another size of the same aspect ratio.

    In order: when the scene meta names a calibration size ``calibrated`` other than ``size``
    and ``K`` scaled from it (:func:`scale_intrinsics`) fits the image, the scaled ``K``;
    else ``K`` itself when its principal point is within ``tolerance`` (a fraction of the image
    side) of the image centre; else ``K`` scaled from the size whose centre is its principal
    point (``2·c + 1``) when that fits. Scaling needs aspect ratios within
    :data:`ASPECT_TOLERANCE`. Anything else raises ``intrinsics_mismatch`` naming ``what``.
    """
    width, height = size
    k = np.asarray(k, dtype=np.float64)
    inferred = (int(round(2 * k[0, 2] + 1)), int(round(2 * k[1, 2] + 1)))
    tried = []
    for source, how in ((calibrated, "scene meta"), (None, ""), (inferred, "principal point")):
        if source is None:
            if principal_point_offset(k, size) <= tolerance:
                return FittedIntrinsics(k)
            continue
        if tuple(source) == tuple(size) or min(source) <= 0:
            continue
        ratio = (source[0] / source[1]) / (width / height)
        tried.append(f"calibrated at {source[0]}x{source[1]} ({how}; aspect ratios differ by "
                     f"{abs(ratio - 1):.1%})")
        if abs(ratio - 1) <= ASPECT_TOLERANCE:
            scaled = scale_intrinsics(k, width / source[0], height / source[1])
            if principal_point_offset(scaled, size) <= tolerance:
                return FittedIntrinsics(scaled, tuple(source), how)
    raise ScanNetError(FailureCode.INTRINSICS_MISMATCH, (
        f"{what}: principal point ({k[0, 2]:.1f}, {k[1, 2]:.1f}) does not fit the "
        f"{width}x{height} image it is used with, nor scaled from "
        f"{' or '.join(tried) or 'another size'}; at most {ASPECT_TOLERANCE:.0%} aspect "
        "difference is scaled: give the intrinsics of this image size"))


def _count_numbers(path: Path) -> int:
    return len(path.read_text().split()) if path.is_file() else 16


def read_depth(path: Path, scale: float = 1000.0) -> np.ndarray:
    """Depth map ``(h,w)`` float32 metres from a 16-bit PNG (value / ``scale``); 0 = unknown."""

    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None or raw.ndim != 2:
        raise ScanNetError(FailureCode.BAD_DEPTH, f"{path.name}: not a single-channel image")
    depth = raw.astype(np.float32) / np.float32(scale)
    depth[~np.isfinite(depth) | (depth < 0)] = 0   # float depth files: NaN/inf/negative = unknown
    return depth


def read_image_size(path: Path) -> tuple[int, int]:
    """``(W, H)`` of an image in display orientation (EXIF applied, as every stage decodes it:
    :func:`featcache.datasets.images.image_size`), from its header (no decoding)."""

    try:
        return image_size(path)
    except ImageDecodeError as e:
        raise ScanNetError(FailureCode.BAD_IMAGE, f"{path.name}: {e.reason}") from None


def read_point_cloud(path: Path) -> np.ndarray:
    """World points ``(N,3)`` float32 from a PLY (ascii or binary) vertex element or an ``.npy``
    of shape ``(N, >=3)`` (the first three columns are x, y, z)."""
    if not path.is_file():
        raise ScanNetError(FailureCode.MISSING_FILE, f"point cloud not found: {path}")
    if path.suffix == ".npy":
        points = np.load(path, allow_pickle=False)
    else:
        points = _read_ply_vertices(path)
    if points.ndim != 2 or points.shape[1] < 3:
        raise ScanNetError(FailureCode.BAD_POINT_CLOUD,
                           f"{path.name}: shape {points.shape}, want (N,3)")
    return np.ascontiguousarray(points[:, :3], dtype=np.float32)   # may hold NaN/inf rows


def _read_ply_vertices(path: Path) -> np.ndarray:
    data = path.read_bytes()
    end = data.find(b"end_header")
    if not data.startswith(b"ply") or end < 0:
        raise ScanNetError(FailureCode.BAD_POINT_CLOUD, f"{path.name}: not a PLY file")
    body_start = data.index(b"\n", end) + 1
    fmt, elements = _parse_ply_header(data[:end].decode("ascii", "replace"), path)
    before = 0
    for name, count, props in elements:
        if name == "vertex":
            return _ply_xyz(data[body_start:], fmt, before, count, props, path)
        if fmt != "ascii" and any(kind.startswith("list") for _, kind in props):
            raise ScanNetError(FailureCode.BAD_POINT_CLOUD,
                               f"{path.name}: list element before vertices")
        before += count if fmt == "ascii" else count * _row_bytes(props)
    raise ScanNetError(FailureCode.BAD_POINT_CLOUD, f"{path.name}: no vertex element")


def _parse_ply_header(header: str, path: Path) -> tuple[str, list[tuple[str, int, list]]]:
    fmt, elements = "", []
    for line in header.splitlines():
        words = line.split()
        if words[:1] == ["format"]:
            fmt = words[1]
        elif words[:1] == ["element"]:
            elements.append((words[1], int(words[2]), []))
        elif words[:1] == ["property"] and elements:
            kind = "list" if words[1] == "list" else _PLY_TYPES.get(words[1], "?")
            elements[-1][2].append((words[-1], kind))
    if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
        raise ScanNetError(FailureCode.BAD_POINT_CLOUD,
                           f"{path.name}: unsupported PLY format {fmt!r}")
    return fmt, elements


def _row_bytes(props: list[tuple[str, str]]) -> int:
    return sum(np.dtype(kind).itemsize for _, kind in props)


def _ply_xyz(body: bytes, fmt: str, skip: int, count: int, props: list, path: Path) -> np.ndarray:
    names = [name for name, _ in props]
    if not {"x", "y", "z"} <= set(names) or any(k in ("list", "?") for _, k in props):
        raise ScanNetError(FailureCode.BAD_POINT_CLOUD, f"{path.name}: vertex needs scalar x, y, z")
    if fmt == "ascii":
        lines = body.decode("ascii", "replace").splitlines()[skip:skip + count]
        table = np.array([line.split() for line in lines], dtype=np.float64).reshape(-1, len(names))
        cols = [table[:, names.index(axis)] for axis in "xyz"]
    else:
        order = "<" if fmt == "binary_little_endian" else ">"
        dtype = np.dtype([(name, order + kind) for name, kind in props])
        if len(body) < skip + count * dtype.itemsize:
            raise ScanNetError(FailureCode.BAD_POINT_CLOUD, f"{path.name}: truncated vertex data")
        table = np.frombuffer(body, dtype=dtype, count=count, offset=skip)
        cols = [table[axis] for axis in "xyz"]
    if len(cols[0]) != count:
        raise ScanNetError(FailureCode.BAD_POINT_CLOUD,
                           f"{path.name}: {len(cols[0])} of {count} vertices")
    return np.stack(cols, axis=1)
