"""build_uv_index: where each ScanNet point lands in each selected colour frame.

For every selected frame of every scene, the scene's point cloud (world coordinates) is moved
into the camera with the inverse of the frame's camera-to-world pose, kept when
``depth_min < z < depth_max``, projected with the colour intrinsics and kept when inside the
image (see :mod:`featcache.geometry` for the conventions). With ``occlusion_check`` each kept
point is compared with the frame's depth map (own resolution, own intrinsics, nearest depth
pixel): ``conf_2d = 1`` when ``|z - depth| <= occlusion_tolerance`` **metres**, 0 when occluded
or when the depth pixel is 0 (unknown). One record per frame, key ``<scene>/frame_<idx:06d>``:

- ``uv_idx (N,2) float32``: pixel (x right, y down, pixel centres at integers);
- ``valid (N,) bool``; ``depth (N,) float32`` camera z in metres; ``conf_2d (N,) float32``;
- ``frame`` (str, the colour file stem), ``image_size (2,) int32`` = (W, H) of the colour frame,
  ``reproj_err_px`` (float32 scalar, see :func:`featcache.geometry.reprojection_error`).

Frames with a non-finite pose, a missing file or an all-zero depth map become rows of
``failures.tsv``.

Layouts: ``shards`` (default) is the sharded folder ``<out>/index.h5`` + ``<out>/shards/``
(read it with ``featcache.open_features(out)[key]``, a dict of the fields above); ``npz`` also
writes the seed's ``<out>/<scene>/frame_<idx:06d>.npz`` files (same arrays) and
``provenance.json`` into the same folder.

Reuse: each frame's signature covers exactly the files it reads (colour, depth, pose, both
intrinsics, the scene's point cloud), so adding a scene or a frame computes only the new
frames, and changing one frame's files recomputes only that frame.
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
# The shard size comes from params, never from the data: assume a ScanNet-sized cloud
# (vh_clean_2 meshes have ~50k-300k vertices) and the bytes one point stores per frame:
# uv_idx 2 x float32 + valid bool + depth float32 + conf_2d float32 = 17 bytes.
ASSUMED_POINTS_PER_SCENE = 150_000
BYTES_PER_POINT = 2 * 4 + 1 + 4 + 4
# Params that choose which items exist or where they go, not what a frame's record holds:
# left out of the fingerprint, so that e.g. a longer scene list or a layout switch reuses
# every frame already computed (they stay in the provenance).
SELECTION_PARAMS = ("out", "layout", "scenes", "frames_per_scene", "frame_stride")


@dataclass(frozen=True, kw_only=True)
class UvIndexParams(EngineParams):
    """The ``build_uv_index`` section of params.yaml.

    ``scenes`` is the scene list file (relative to ``scannet``); ``point_cloud`` the cloud file
    per scene, relative to ``scans/<scene>/`` with ``{scene}`` replaced (``.ply`` or ``.npy``).
    ``frames_per_scene = 0`` takes every frame; otherwise every ``frame_stride``-th frame, the
    first ``frames_per_scene`` of them. ``occlusion_tolerance`` is absolute, in metres.
    ``compression: gzip`` deflates the stored arrays (shards and NPZ entries: same arrays,
    smaller files). ``layout``: ``shards`` (default) or ``npz`` (also the seed's per-frame
    ``<scene>/frame_<idx>.npz`` files, in the same folder).
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
    layout: Literal["shards", "npz"] = "shards"

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
    for stem in sorted(scannet.list_frame_stems(Path(scene_dir)), key=lambda s: (int(s), s)):
        stems.setdefault(int(stem), stem)
    return stems


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

    def signature(self, item: str) -> str:
        """Content signature of exactly the files :meth:`load` reads for ``item``: the
        frame's colour, depth and pose, both intrinsics and the scene's point cloud (a file
        that is missing signs as missing, so its appearance changes the signature)."""
        from featcache.engine import file_signature

        scene, _, frame = item.partition("/")
        if not frame:
            return file_signature([], extra="no frames")
        scene_dir = self.scene_dir(scene)
        stem = self._stem(scene_dir, int(frame.removeprefix("frame_")))
        colors = [scene_dir / "color" / f"{stem}{s}" for s in scannet.COLOR_SUFFIXES]
        color = next((p for p in colors if p.is_file()), colors[0])
        intrinsic = scene_dir / "intrinsic"
        return file_signature([color, scene_dir / "depth" / f"{stem}.png",
                               scene_dir / "pose" / f"{stem}.txt",
                               intrinsic / "intrinsic_color.txt",
                               intrinsic / "intrinsic_depth.txt",
                               scene_dir / self.params.point_cloud.format(scene=scene)],
                              extra=item)

    @staticmethod
    def _stem(scene_dir: Path, index: int) -> str:
        """The file stem of frame ``index`` ("3", or "000003" in zero-padded exports)."""
        return frame_stems(scene_dir).get(index, str(index))


def summarise(out: Path) -> dict[str, float]:
    """Metrics over a written uv index (any layout): frames, worst re-projection error,
    visibility fractions."""
    from featcache.reader import open_features

    stores = {name: open_features(out, field=name) for name in ("reproj_err_px", "valid",
                                                                 "conf_2d")}
    errors, valid, visible = [], [], []
    for key in sorted(stores["valid"]):
        ok = stores["valid"][key]
        errors.append(float(stores["reproj_err_px"][key]))
        valid.append(float(ok.mean()) if ok.size else 0.0)
        visible.append(float(stores["conf_2d"][key].sum() / max(ok.sum(), 1)))
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
    """The params recorded in the provenance (engine knobs such as ``num_workers`` excluded)."""
    return params.method_params()


def fingerprint_params(params: UvIndexParams) -> dict[str, object]:
    """The params that determine a frame's record: :func:`method_params` less
    :data:`SELECTION_PARAMS` (the frame's own inputs come from its signature)."""
    return {k: v for k, v in method_params(params).items() if k not in SELECTION_PARAMS}


def build_uv_index(params: UvIndexParams) -> RunResult:
    """Run the stage: the output folder ``params.out`` in ``params.layout`` (with
    ``failures.tsv``) and the metrics JSON (``params.metrics``, default
    ``metrics/build_uv_index.json``), relative to the working directory.

    Raises ``TooManyFailures`` (after writing) when more than ``max_failures`` frames failed.
    """
    from featcache.engine import WriterOptions, finish_stage, run_job

    check_inputs(params)
    job = UvIndexJob(params)
    provenance = {"params": method_params(params), "conventions": geometry.__doc__}
    result = run_job(job, None, stage=STAGE, out=params.out, writer=params.layout,
                     writer_options=WriterOptions(compression=params.compression),
                     provenance=provenance, fingerprint={"params": fingerprint_params(params)},
                     params=params, item_bytes=ASSUMED_POINTS_PER_SCENE * BYTES_PER_POINT)
    if not result.finalized:   # compute-only run (shard range): no output to summarise yet
        finish_stage(STAGE, params.out, [result], params)
        return result
    metrics = summarise(Path(params.out))
    log.info("%s: %d frames written (%d computed, %d reused), %d failed, max re-projection "
             "error %.2e px", STAGE, result.records, result.computed, result.reused,
             result.failed, metrics["reprojection_max_px"])
    finish_stage(STAGE, params.out, [result], params, extra=metrics)
    return result
