"""build_uv_index: where each ScanNet point lands in each selected colour frame.

For every selected frame of every scene, the scene's point cloud (world coordinates) is moved
into the camera with the inverse of the frame's camera-to-world pose, kept when
``depth_min < z < depth_max``, projected with the colour intrinsics and kept when inside the
image (see :mod:`featcache.geometry` for the conventions). With ``occlusion_check`` each kept
point is compared with the frame's depth map (own resolution, own intrinsics, nearest depth
pixel): ``conf_2d = 1`` when ``|z - depth| <= occlusion_tolerance`` **metres**, 0 when occluded
or when the depth pixel is 0 (unknown). One ``<scene>/frame_<idx:06d>.npz`` per frame holds:

- ``uv_idx (N,2) float32``: pixel (x right, y down, pixel centres at integers);
- ``valid (N,) bool``; ``depth (N,) float32`` camera z in metres; ``conf_2d (N,) float32``;
- ``frame`` (str, the colour file stem), ``image_size (2,) int32`` = (W, H) of the colour frame,
  ``reproj_err_px`` (float32 scalar, see :func:`featcache.geometry.reprojection_error`).

Frames with a non-finite pose, a missing file or an all-zero depth map become rows of
``failures.tsv``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np

from featcache import geometry, scannet
from featcache.config import ParamError, require
from featcache.engine.types import EngineParams, Failure, Piece, RunResult

log = logging.getLogger(__name__)

STAGE = "build_uv_index"


@dataclass(frozen=True, kw_only=True)
class UvIndexParams(EngineParams):
    """The ``build_uv_index`` section of params.yaml.

    ``scenes`` is the scene list file (relative to ``scannet``); ``point_cloud`` the cloud file
    per scene, relative to ``scans/<scene>/`` with ``{scene}`` replaced (``.ply`` or ``.npy``).
    ``frames_per_scene = 0`` takes every frame; otherwise every ``frame_stride``-th frame, the
    first ``frames_per_scene`` of them. ``occlusion_tolerance`` is absolute, in metres.
    ``compression: gzip`` deflates the NPZ entries (same arrays, smaller files).
    """

    scannet: str
    scenes: str
    out: str
    point_cloud: str = "{scene}_vh_clean_2.ply"
    frames_per_scene: int = 10
    frame_stride: int = 1
    depth_min: float = 0.1
    depth_max: float = 10.0
    depth_scale: float = 1000.0
    occlusion_check: bool = True
    occlusion_tolerance: float = 0.05
    compression: Literal["none", "gzip"] = "none"

    def validate(self) -> None:
        super().validate()
        require(self.frames_per_scene >= 0, "frames_per_scene", "must be >= 0 (0 = all frames)")
        require(self.frame_stride >= 1, "frame_stride", "must be >= 1")
        require(0 <= self.depth_min < self.depth_max, "depth_min",
                f"need 0 <= depth_min < depth_max, got {self.depth_min}, {self.depth_max}")
        require(self.depth_scale > 0, "depth_scale", "must be > 0 (1000 for millimetres)")
        require(self.occlusion_tolerance > 0, "occlusion_tolerance", "must be > 0 metres")
        require(self.point_cloud.endswith((".ply", ".npy")), "point_cloud",
                "must name a .ply or .npy file, e.g. {scene}_vh_clean_2.ply")


@dataclass(frozen=True)
class FrameData:
    """One frame's inputs: pose ``(4,4)`` camera-to-world, ``K (3,3)`` colour and depth,
    colour ``size (W, H)``, ``depth (h,w) float32`` metres (0 = unknown)."""

    stem: str
    pose: np.ndarray
    k_color: np.ndarray
    k_depth: np.ndarray
    size: tuple[int, int]
    depth: np.ndarray


def frame_key(scene: str, stem: str) -> str:
    """Output key of a frame: ``<scene>/frame_<idx:06d>``."""
    return f"{scene}/frame_{int(stem):06d}"


def index_frame(points: np.ndarray, frame: FrameData, params: UvIndexParams,
                ) -> dict[str, np.ndarray]:
    """The uv index of one frame for world points ``(N,3)``: the npz fields (module doc)."""
    proj = geometry.project_points(points, frame.pose, frame.k_color, frame.size,
                                   params.depth_min, params.depth_max)
    conf = proj.valid
    if params.occlusion_check:
        cam = geometry.world_to_camera(points, frame.pose)
        conf = conf & geometry.depth_consistency(cam, frame.depth, frame.k_depth,
                                                 params.occlusion_tolerance)
    err = geometry.reprojection_error(frame.depth, frame.k_depth, frame.k_color, frame.pose,
                                      frame.size)
    return {
        "uv_idx": proj.uv, "valid": proj.valid, "depth": proj.depth,
        "conf_2d": conf.astype(np.float32), "frame": np.array(frame.stem),
        "image_size": np.array(frame.size, dtype=np.int32),
        "reproj_err_px": np.array(err, dtype=np.float32),
    }


def read_frame(scene_dir: Path, stem: str, depth_scale: float) -> FrameData:
    """Read one frame; raises :class:`~featcache.scannet.ScanNetError` on bad input."""
    paths = scannet.frame_paths(scene_dir, stem)
    pose = scannet.read_pose(paths.pose)
    depth = scannet.read_depth(paths.depth, depth_scale)
    if not (depth > 0).any():
        raise scannet.ScanNetError("empty_depth", f"{paths.depth.name}: depth map is all zero")
    intrinsic = scene_dir / "intrinsic"
    return FrameData(stem=stem, pose=pose,
                     k_color=scannet.read_intrinsics(intrinsic / "intrinsic_color.txt"),
                     k_depth=scannet.read_intrinsics(intrinsic / "intrinsic_depth.txt"),
                     size=scannet.read_image_size(paths.color), depth=depth)


@lru_cache(maxsize=2)
def _cached_points(path: str, mtime_ns: int) -> np.ndarray:
    points = scannet.read_point_cloud(Path(path))
    points.setflags(write=False)
    return points


def load_points(path: Path) -> np.ndarray:
    """A scene's point cloud ``(N,3)`` float32 (read-only), cached per worker process."""
    if not path.is_file():
        raise scannet.ScanNetError("missing_file", f"point cloud not found: {path}")
    return _cached_points(str(path), path.stat().st_mtime_ns)


@dataclass(frozen=True)
class UvIndexJob:
    """Model-free engine job: one item per selected frame (``<scene>/frame_<idx:06d>``), or
    the bare scene id when the scene has no frames (so it is reported as a failure)."""

    params: UvIndexParams

    @property
    def root(self) -> Path:
        return Path(self.params.scannet)

    def scene_dir(self, scene: str) -> Path:
        return self.root / "scans" / scene

    def items(self) -> list[str]:
        items = []
        for scene in dict.fromkeys(scannet.read_scene_list(self.root / self.params.scenes)):
            stems = scannet.list_frame_stems(self.scene_dir(scene))
            chosen = scannet.select_frames(stems, self.params.frames_per_scene,
                                           self.params.frame_stride)
            items += [frame_key(scene, s) for s in chosen] if chosen else [scene]
        return items

    def load(self, item: str) -> list[Piece | Failure]:
        scene, _, frame = item.partition("/")
        scene_dir = self.scene_dir(scene)
        if not frame:
            return [Failure(item, "missing_scene", f"no frames found in {scene_dir}")]
        try:
            stem = self._stem(scene_dir, int(frame.removeprefix("frame_")))
            data = read_frame(scene_dir, stem, self.params.depth_scale)
            cloud = scene_dir / self.params.point_cloud.format(scene=scene)
            arrays = index_frame(load_points(cloud), data, self.params)
        except scannet.ScanNetError as e:
            return [Failure(item, e.code, str(e))]
        return [Piece(key=item, arrays=arrays)]

    def input_files(self, items: list[str]) -> list[Path]:
        """Every file the items read (frame files, intrinsics, point clouds), sorted."""
        files: set[Path] = set()
        for item in items:
            scene, _, frame = item.partition("/")
            scene_dir = self.scene_dir(scene)
            files.add(scene_dir / self.params.point_cloud.format(scene=scene))
            files.update(scene_dir / "intrinsic" / f"intrinsic_{k}.txt" for k in ("color", "depth"))
            if frame:
                stem = str(int(frame.removeprefix("frame_")))
                files.update(scene_dir / sub / f"{stem}{ext}" for sub, ext in
                             (("color", ".jpg"), ("depth", ".png"), ("pose", ".txt")))
        return sorted(files)

    @staticmethod
    def _stem(scene_dir: Path, index: int) -> str:
        """The file stem of frame ``index`` ("3", or "000003" in zero-padded exports)."""
        stems = [s for s in scannet.list_frame_stems(scene_dir) if int(s) == index]
        return stems[0] if stems else str(index)


def summarise(out: Path) -> dict[str, float]:
    """Metrics over a written uv index: worst re-projection error, visibility fractions."""
    errors, valid, visible = [], [], []
    for path in sorted(out.rglob("*.npz")):
        with np.load(path) as npz:
            errors.append(float(npz["reproj_err_px"]))
            valid.append(float(npz["valid"].mean()) if npz["valid"].size else 0.0)
            visible.append(float(npz["conf_2d"].sum() / max(npz["valid"].sum(), 1)))
    return {
        "frames": len(errors),
        "reprojection_max_px": max(errors, default=0.0),
        "valid_fraction_mean": float(np.mean(valid)) if valid else 0.0,
        "visible_of_valid_mean": float(np.mean(visible)) if visible else 0.0,
    }


def check_inputs(params: UvIndexParams) -> None:
    """Fail before any work, naming the key, when an input path is missing."""
    if not Path(params.scannet).is_dir():
        raise ParamError(f"{STAGE}.scannet: folder not found: {params.scannet}")
    if not (Path(params.scannet) / params.scenes).is_file():
        raise ParamError(f"{STAGE}.scenes: scene list not found in {params.scannet}: "
                         f"{params.scenes}")


def method_params(params: UvIndexParams) -> dict[str, object]:
    """The params that determine the result (engine knobs such as ``num_workers`` excluded)."""
    return params.method_params()


def build_uv_index(params: UvIndexParams) -> RunResult:
    """Run the stage: the npz folder ``params.out`` (with ``provenance.json`` and
    ``failures.tsv``) and ``metrics/build_uv_index.json`` (relative to the working directory).

    Raises ``TooManyFailures`` (after writing) when more than ``max_failures`` frames failed.
    """
    from featcache.engine import WriterOptions, file_signature, finish_stage, run_job

    check_inputs(params)
    job = UvIndexJob(params)
    items = job.items()
    provenance = {"params": method_params(params), "conventions": geometry.__doc__}
    fingerprint = {"params": method_params(params),
                   "inputs": file_signature(job.input_files(items))}
    result = run_job(job, None, stage=STAGE, out=params.out, writer="npz",
                     writer_options=WriterOptions(compression=params.compression),
                     provenance=provenance, fingerprint=fingerprint, params=params)
    metrics = summarise(Path(params.out))
    log.info("%s: %d frames written, %d failed, max re-projection error %.2e px", STAGE,
             result.records, result.failed, metrics["reprojection_max_px"])
    finish_stage(STAGE, params.out, [result], params, extra=metrics)
    return result
