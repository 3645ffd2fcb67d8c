"""Reading the ScanNet layout (as exported by ScanNet's SensReader).

::

    <root>/<scene list>.txt                  one scene id per line
    <root>/scans/<scene>/color/<i>.jpg       colour frames, any size (e.g. 1296x968)
    <root>/scans/<scene>/depth/<i>.png       uint16 depth in millimetres, its own size
    <root>/scans/<scene>/pose/<i>.txt        4x4 camera-to-world, text (may be all -inf)
    <root>/scans/<scene>/intrinsic/intrinsic_color.txt, intrinsic_depth.txt   4x4, text
    <root>/scans/<scene>/<scene>_vh_clean_2.ply   vertices x y z (red green blue ...), or .npy

Frame ids ``<i>`` are integers and are ordered numerically (``2`` before ``10``).
Readers raise :class:`ScanNetError` (with an error code for ``failures.tsv``) on bad input.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

COLOR_SUFFIXES = (".jpg", ".jpeg", ".png")
_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
    "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}


class ScanNetError(ValueError):
    """Bad or missing ScanNet input; ``code`` is the short error name for ``failures.tsv``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


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
        raise ScanNetError("missing_file", f"scene list not found: {path}")
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def list_frame_stems(scene_dir: Path) -> list[str]:
    """Integer frame ids found in any of ``color/``, ``depth/``, ``pose/``, numerically sorted.

    A frame missing one of its files is still listed (so that it is reported, not ignored).
    """
    stems = set()
    for sub in ("color", "depth", "pose"):
        folder = scene_dir / sub
        if folder.is_dir():
            stems.update(p.stem for p in folder.iterdir() if re.fullmatch(r"\d+", p.stem))
    return sorted(stems, key=int)


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
            raise ScanNetError("missing_file", f"{path.name} missing in {path.parent}")
    return paths


def read_matrix(path: Path, shape: tuple[int, int] = (4, 4)) -> np.ndarray:
    """A whitespace-separated text matrix (pose or intrinsics) as float64 of ``shape``."""
    if not path.is_file():
        raise ScanNetError("missing_file", f"not found: {path}")
    try:
        values = np.array(path.read_text().split(), dtype=np.float64)
    except ValueError as e:
        raise ScanNetError("bad_matrix", f"{path.name}: {e}") from None
    if values.size != shape[0] * shape[1]:
        raise ScanNetError("bad_matrix", f"{path.name}: {values.size} numbers, expected "
                           f"{shape[0]}x{shape[1]}")
    return values.reshape(shape)


def read_pose(path: Path) -> np.ndarray:
    """Camera-to-world ``(4,4)`` float64; raises ``bad_pose`` when not finite (ScanNet's -inf
    poses where tracking was lost) or not a rigid transform (rotation determinant 1 within
    1e-2, last row ``0 0 0 1``: ScanNet writes 6 decimals)."""
    pose = read_matrix(path)
    if not np.isfinite(pose).all():
        raise ScanNetError("bad_pose", f"{path.name}: pose is not finite (tracking lost)")
    rigid = np.allclose(pose[3], [0, 0, 0, 1], atol=1e-6) \
        and abs(np.linalg.det(pose[:3, :3]) - 1) <= 1e-2
    if not rigid:
        raise ScanNetError("bad_pose", f"{path.name}: not a rigid camera-to-world transform")
    return pose


def read_intrinsics(path: Path) -> np.ndarray:
    """Pinhole ``K (3,3)`` float64 from ScanNet's 4x4 (or a plain 3x3) intrinsics file."""
    values = read_matrix(path, (4, 4)) if _count_numbers(path) == 16 else read_matrix(path, (3, 3))
    k = values[:3, :3]
    if not np.isfinite(k).all() or k[0, 0] <= 0 or k[1, 1] <= 0:
        raise ScanNetError("bad_intrinsics", f"{path.name}: focal lengths must be > 0")
    return k


def _count_numbers(path: Path) -> int:
    return len(path.read_text().split()) if path.is_file() else 16


def read_depth(path: Path, scale: float = 1000.0) -> np.ndarray:
    """Depth map ``(h,w)`` float32 metres from a 16-bit PNG (value / ``scale``); 0 = unknown."""
    import cv2

    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None or raw.ndim != 2:
        raise ScanNetError("bad_depth", f"{path.name}: not a single-channel image")
    return raw.astype(np.float32) / np.float32(scale)


def read_image_size(path: Path) -> tuple[int, int]:
    """``(W, H)`` of an image from its header (no decoding)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, UnidentifiedImageError) as e:
        raise ScanNetError("bad_image", f"{path.name}: {e}") from None


def read_point_cloud(path: Path) -> np.ndarray:
    """World points ``(N,3)`` float32 from a PLY (ascii or binary) vertex element or an ``.npy``
    of shape ``(N, >=3)`` (the first three columns are x, y, z)."""
    if not path.is_file():
        raise ScanNetError("missing_file", f"point cloud not found: {path}")
    if path.suffix == ".npy":
        points = np.load(path, allow_pickle=False)
    else:
        points = _read_ply_vertices(path)
    if points.ndim != 2 or points.shape[1] < 3:
        raise ScanNetError("bad_point_cloud", f"{path.name}: shape {points.shape}, want (N,3)")
    return np.ascontiguousarray(points[:, :3], dtype=np.float32)


def _read_ply_vertices(path: Path) -> np.ndarray:
    data = path.read_bytes()
    end = data.find(b"end_header")
    if not data.startswith(b"ply") or end < 0:
        raise ScanNetError("bad_point_cloud", f"{path.name}: not a PLY file")
    body_start = data.index(b"\n", end) + 1
    fmt, elements = _parse_ply_header(data[:end].decode("ascii", "replace"), path)
    before = 0
    for name, count, props in elements:
        if name == "vertex":
            return _ply_xyz(data[body_start:], fmt, before, count, props, path)
        if fmt != "ascii" and any(kind.startswith("list") for _, kind in props):
            raise ScanNetError("bad_point_cloud", f"{path.name}: list element before vertices")
        before += count if fmt == "ascii" else count * _row_bytes(props)
    raise ScanNetError("bad_point_cloud", f"{path.name}: no vertex element")


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
        raise ScanNetError("bad_point_cloud", f"{path.name}: unsupported PLY format {fmt!r}")
    return fmt, elements


def _row_bytes(props: list[tuple[str, str]]) -> int:
    return sum(np.dtype(kind).itemsize for _, kind in props)


def _ply_xyz(body: bytes, fmt: str, skip: int, count: int, props: list, path: Path) -> np.ndarray:
    names = [name for name, _ in props]
    if not {"x", "y", "z"} <= set(names) or any(k in ("list", "?") for _, k in props):
        raise ScanNetError("bad_point_cloud", f"{path.name}: vertex needs scalar x, y, z")
    if fmt == "ascii":
        lines = body.decode("ascii", "replace").splitlines()[skip:skip + count]
        table = np.array([line.split() for line in lines], dtype=np.float64).reshape(-1, len(names))
        cols = [table[:, names.index(axis)] for axis in "xyz"]
    else:
        order = "<" if fmt == "binary_little_endian" else ">"
        dtype = np.dtype([(name, order + kind) for name, kind in props])
        if len(body) < skip + count * dtype.itemsize:
            raise ScanNetError("bad_point_cloud", f"{path.name}: truncated vertex data")
        table = np.frombuffer(body, dtype=dtype, count=count, offset=skip)
        cols = [table[axis] for axis in "xyz"]
    if len(cols[0]) != count:
        raise ScanNetError("bad_point_cloud", f"{path.name}: {len(cols[0])} of {count} vertices")
    return np.stack(cols, axis=1)
