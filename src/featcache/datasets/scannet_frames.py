"""One ScanNet frame as build_uv_index reads it: pose, both intrinsics fitted to their images,
colour size and depth map (:class:`FrameData`, :func:`read_frame`), the frame stems of a scene
and its point cloud, both cached per worker process and version of the files.

Conventions as in :mod:`featcache.datasets.scannet` (camera-to-world poses, depth in metres,
0 = unknown).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from featcache.datasets import scannet
from featcache.datasets.frames import frame_number
from featcache.failures import FailureCode


@dataclass(frozen=True)
class FrameData:
    """One frame's inputs: pose ``(4,4)`` camera-to-world, ``K (3,3)`` colour and depth as
    fitted to their images (:func:`featcache.datasets.scannet.fit_intrinsics`; ``scaled`` bit 1 colour,
    bit 2 depth), colour ``size (W, H)``, ``depth (h,w) float32`` metres (0 = unknown);
    ``notes``: the provenance notes of scaled intrinsics."""

    stem: str
    pose: np.ndarray
    k_color: np.ndarray
    k_depth: np.ndarray
    size: tuple[int, int]
    depth: np.ndarray
    scaled: int = 0
    notes: dict[str, object] | None = None


def read_frame(scene_dir: Path, stem: str, depth_scale: float,
               principal_point_tolerance: float = 0.05) -> FrameData:
    """Read one frame, with both intrinsics fitted to their images (colour: the colour file's
    display size; depth: the depth map's size; calibration sizes from ``<scene>.txt`` when it
    has them); raises :class:`~featcache.datasets.scannet.ScanNetError` on bad input."""
    paths = scannet.frame_paths(scene_dir, stem)
    pose = scannet.read_pose(paths.pose)
    depth = scannet.read_depth(paths.depth, depth_scale)
    if not (depth > 0).any():
        raise scannet.ScanNetError(FailureCode.EMPTY_DEPTH,
                                   f"{paths.depth.name}: depth map is all zero")
    intrinsic = scene_dir / "intrinsic"
    meta = scannet.read_scene_meta(scene_dir / f"{scene_dir.name}.txt")
    size = scannet.read_image_size(paths.color)
    depth_size = (int(depth.shape[1]), int(depth.shape[0]))
    color = scannet.fit_intrinsics(scannet.read_intrinsics(intrinsic / "intrinsic_color.txt"),
                                   size, "intrinsic_color.txt", principal_point_tolerance,
                                   scannet.calibration_size(meta, "color"))
    deep = scannet.fit_intrinsics(scannet.read_intrinsics(intrinsic / "intrinsic_depth.txt"),
                                  depth_size, "intrinsic_depth.txt", principal_point_tolerance,
                                  scannet.calibration_size(meta, "depth"))
    notes = {name: note for name, note in (("color", color.note(size)),
                                           ("depth", deep.note(depth_size))) if note}
    scaled = (color.scaled_from is not None) + 2 * (deep.scaled_from is not None)
    return FrameData(stem=stem, pose=pose, k_color=color.k, k_depth=deep.k, size=size,
                     depth=depth, scaled=scaled, notes=notes or None)


def frame_stems(scene_dir: Path) -> dict[int, str]:
    """``frame index -> file stem`` ("3", or "000003" in zero-padded exports) of a scene,
    listed once per change of its folders (the smallest stem wins if two spell one index)."""
    stamp = tuple(_mtime_ns(scene_dir / sub) for sub in ("color", "depth", "pose"))
    return _cached_stems(str(scene_dir), stamp)


def _mtime_ns(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return -1


@lru_cache(maxsize=64)
def _cached_stems(scene_dir: str, stamp: tuple[int, ...]) -> dict[int, str]:
    stems: dict[int, str] = {}
    for stem in scannet.list_frame_stems(Path(scene_dir)):   # numeric order, "3" before "003"
        stems.setdefault(frame_number(stem), stem)
    return stems


@lru_cache(maxsize=2)
def _cached_points(path: str, mtime_ns: int) -> np.ndarray:
    points = scannet.read_point_cloud(Path(path))
    points.setflags(write=False)
    return points


def load_points(path: Path) -> np.ndarray:
    """A scene's point cloud ``(N,3)`` float32 (read-only), cached per worker process."""
    if not path.is_file():
        raise scannet.ScanNetError(FailureCode.MISSING_FILE, f"point cloud not found: {path}")
    return _cached_points(str(path), path.stat().st_mtime_ns)
