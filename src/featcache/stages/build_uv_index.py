"""build_uv_index: where each ScanNet point lands in each selected colour frame.

For every selected frame of every scene, the scene's point cloud (world coordinates) is moved
into the camera with the inverse of the frame's camera-to-world pose, kept when
``depth_min < z < depth_max``, projected with the colour intrinsics and kept when inside the
image (see :mod:`featcache.datasets.geometry` for the conventions). With ``occlusion_check`` each kept
point is compared with the frame's depth map (own resolution, own intrinsics, nearest depth
pixel): ``conf_2d = 1`` when ``|z - depth| <= occlusion_tolerance`` **metres**, 0 when occluded
or when the depth pixel is 0 (unknown). One record per frame, key ``<scene>/frame_<idx:06d>``:

- ``uv_idx (N,2) float32``: pixel (x right, y down, pixel centres at integers);
- ``valid (N,) bool``; ``depth (N,) float32`` camera z in metres; ``conf_2d (N,) float32``;
- ``frame`` (str, the colour file stem), ``image_size (2,) int32`` = (W, H) of the colour frame,
  ``reproj_err_px`` (float32 scalar, see :func:`featcache.datasets.geometry.reprojection_error`);
- ``k_color``, ``k_depth (3,3) float64``: the intrinsics used, ``intrinsics_scaled`` (uint8
  scalar: 1 colour, 2 depth, 3 both were scaled from their calibration size, see
  :func:`featcache.datasets.scannet.fit_intrinsics`);
- ``depth_agreement``, ``depth_in_image`` (float32 scalars): the frame checks below;
- ``nonfinite_points`` (int32 scalar): cloud vertices with NaN/inf coordinates, stored as not
  valid with ``uv_idx = -1``, ``depth = 0`` (indices stay those of the cloud).

Frame checks (each can fail, unlike the re-projection round trip through the same pose and
intrinsics): ``depth_agreement`` = of the scene points that land on a known depth pixel, the
fraction within ``occlusion_tolerance`` of it (:func:`featcache.datasets.geometry.depth_agreement`;
near 0 for a world-to-camera pose) must reach ``min_depth_agreement``; ``depth_in_image`` =
the fraction of known depth pixels whose ray lands inside the colour image
(:func:`featcache.datasets.geometry.depth_in_color`; ~1/4 for colour intrinsics of twice the image's
resolution) must reach ``min_depth_in_image``. A frame that fails one is a ``pose_check`` /
``intrinsics_check`` row, never a record. Depth maps are therefore required, also with
``occlusion_check: false``.

Frames with a non-finite pose, a missing file, an all-zero depth map or intrinsics that do not
fit the image become rows of ``failures.tsv``; so does a scene-list entry that is not a folder
name inside ``scans/`` (never opened).

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
from pathlib import Path
from typing import Literal

import numpy as np

from featcache.config import ParamError, require
from featcache.datasets import geometry, scannet
from featcache.datasets.frames import frame_key as _frame_key
from featcache.datasets.frames import frame_number, parse_frame_key
from featcache.datasets.scannet_frames import (
    FrameData,
    frame_stems,
    load_points,
    read_frame,
)
from featcache.engine import WriterOptions, file_signature, finish_stage, run_job
from featcache.engine.types import EngineParams, Failure, Piece, RunResult
from featcache.failures import FailureCode
from featcache.provenance import UvIndexProvenance
from featcache.reader import open_features

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
    principal_point_tolerance: float = 0.05
    min_depth_agreement: float = 0.2
    min_depth_in_image: float = 0.5
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
        require(0 < self.principal_point_tolerance < 0.5, "principal_point_tolerance",
                "must be a fraction of the image side in (0, 0.5), e.g. 0.05")
        for key in ("min_depth_agreement", "min_depth_in_image"):
            require(0 < getattr(self, key) <= 1, key, "must be a fraction in (0, 1]")


def frame_key(scene: str, stem: str) -> str:
    """Output key of a frame (``<scene>/frame_<idx:06d>``) from its file stem, plain or
    zero-padded: :func:`featcache.datasets.frames.frame_key` of the stem's number."""
    number = frame_number(stem)
    if number is None:
        raise ValueError(f"frame stem {stem!r} is not a number")
    return _frame_key(scene, number)


def index_frame(points: np.ndarray, frame: FrameData, params: UvIndexParams,
                ) -> dict[str, np.ndarray]:
    """The uv index of one frame for world points ``(N,3)``: the npz fields (module doc).

    Raises ``pose_check`` / ``intrinsics_check`` (:class:`~featcache.datasets.scannet.ScanNetError`)
    when a frame check fails; non-finite points are stored as not valid, never as NaN.
    """
    finite = np.isfinite(points).all(axis=1)
    pts = points if finite.all() else np.where(finite[:, None], points, 0).astype(points.dtype)
    proj = geometry.project_points(pts, frame.pose, frame.k_color, frame.size,
                                   params.depth_min, params.depth_max)
    valid = proj.valid & finite
    cam = geometry.world_to_camera(pts[finite], frame.pose)
    agreement, _ = geometry.depth_agreement(cam, frame.depth, frame.k_depth,
                                            params.occlusion_tolerance, params.depth_min,
                                            params.depth_max)
    in_image = geometry.depth_in_color(frame.depth, frame.k_depth, frame.k_color, frame.size)
    if in_image < params.min_depth_in_image:
        raise scannet.ScanNetError(FailureCode.INTRINSICS_CHECK, (
            f"frame {frame.stem}: only {in_image:.1%} of the depth pixels land inside the "
            f"{frame.size[0]}x{frame.size[1]} colour image (min_depth_in_image "
            f"{params.min_depth_in_image}): colour and depth intrinsics do not describe this "
            "image and depth map"))
    if agreement < params.min_depth_agreement:
        raise scannet.ScanNetError(FailureCode.POSE_CHECK, (
            f"frame {frame.stem}: only {agreement:.1%} of the scene points on known depth "
            f"pixels agree with the depth map within {params.occlusion_tolerance} m "
            f"(min_depth_agreement {params.min_depth_agreement}): the pose is not this "
            "frame's camera-to-world pose (world-to-camera? another frame's?)"))
    conf = valid
    if params.occlusion_check:
        conf = conf & geometry.depth_consistency(geometry.world_to_camera(pts, frame.pose),
                                                 frame.depth, frame.k_depth,
                                                 params.occlusion_tolerance)
    err = geometry.reprojection_error(frame.depth, frame.k_depth, frame.k_color, frame.pose,
                                      frame.size)
    if not np.isfinite(err):
        raise scannet.ScanNetError(FailureCode.INTRINSICS_CHECK,
                                   f"frame {frame.stem}: no depth pixel "
                                   "lands inside the colour image")
    return {
        "uv_idx": np.where(finite[:, None], proj.uv, np.float32(geometry.UV_BEHIND)),
        "valid": valid, "depth": np.where(finite, proj.depth, np.float32(0)),
        "conf_2d": conf.astype(np.float32), "frame": np.array(frame.stem),
        "image_size": np.array(frame.size, dtype=np.int32),
        "reproj_err_px": np.array(err, dtype=np.float32),
        "k_color": np.asarray(frame.k_color, dtype=np.float64),
        "k_depth": np.asarray(frame.k_depth, dtype=np.float64),
        "intrinsics_scaled": np.array(frame.scaled, dtype=np.uint8),
        "depth_agreement": np.array(agreement, dtype=np.float32),
        "depth_in_image": np.array(in_image, dtype=np.float32),
        "nonfinite_points": np.array(int((~finite).sum()), dtype=np.int32),
    }


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

    def scenes(self) -> list[str]:
        """The scene list's entries, in order, each once (bad names included)."""
        return list(dict.fromkeys(scannet.read_scene_list(self.root / self.params.scenes)))

    def items(self) -> list[str]:
        """Per scene its selected frames' keys; the bare scene id when it has no frames; the
        quoted entry (``'../x'``, never a key) for an entry that is not a scene name."""
        items = []
        for scene in self.scenes():
            if scannet.check_scene_name(scene) is not None:
                items.append(repr(scene))
                continue
            stems = scannet.list_frame_stems(self.scene_dir(scene))
            chosen = scannet.select_frames(stems, self.params.frames_per_scene,
                                           self.params.frame_stride)
            items += [frame_key(scene, s) for s in chosen] if chosen else [scene]
        return list(dict.fromkeys(items))

    def _parse(self, item: str) -> tuple[str, int | None] | str:
        """``(scene, frame number or None for a bare scene)``, or why ``item`` names no scene
        folder (then nothing is opened)."""
        parsed = parse_frame_key(item)
        scene, number = parsed if parsed is not None else (item, None)
        if parsed is None and "/" in item or scannet.check_scene_name(scene) is not None:
            entry = item[1:-1] if item[:1] in "'\"" and item[-1:] == item[:1] else item
            return scannet.check_scene_name(entry) or f"{item!r} is not a frame key"
        return scene, number

    def load(self, item: str) -> list[Piece | Failure]:
        parsed = self._parse(item)
        if isinstance(parsed, str):
            return [Failure(item, FailureCode.BAD_SCENE_NAME, parsed)]
        scene, number = parsed
        scene_dir = self.scene_dir(scene)
        if number is None:
            return [Failure(item, FailureCode.MISSING_SCENE, f"no frames found in {scene_dir}")]
        try:
            stem = self._stem(scene_dir, number)
            data = read_frame(scene_dir, stem, self.params.depth_scale,
                              self.params.principal_point_tolerance)
            cloud = scene_dir / self.params.point_cloud.format(scene=scene)
            arrays = index_frame(load_points(cloud), data, self.params)
        except scannet.ScanNetError as e:
            return [Failure(item, e.code, str(e))]
        return [Piece(key=item, arrays=arrays)]

    def signature(self, item: str) -> str:
        """Content signature of exactly the files :meth:`load` reads for ``item``: the
        frame's colour, depth and pose, both intrinsics, the scene meta and the scene's point
        cloud (a file that is missing signs as missing, so its appearance changes the
        signature)."""

        parsed = self._parse(item)
        if isinstance(parsed, str):
            return file_signature([], extra=f"bad scene name\t{item}")
        scene, number = parsed
        if number is None:
            return file_signature([], extra="no frames")
        scene_dir = self.scene_dir(scene)
        stem = self._stem(scene_dir, number)
        colors = [scene_dir / "color" / f"{stem}{s}" for s in scannet.COLOR_SUFFIXES]
        color = next((p for p in colors if p.is_file()), colors[0])
        intrinsic = scene_dir / "intrinsic"
        return file_signature([color, scene_dir / "depth" / f"{stem}.png",
                               scene_dir / "pose" / f"{stem}.txt",
                               intrinsic / "intrinsic_color.txt",
                               intrinsic / "intrinsic_depth.txt",
                               scene_dir / f"{scene}.txt",
                               scene_dir / self.params.point_cloud.format(scene=scene)],
                              extra=item)

    def calibration(self) -> dict[str, object]:
        """Per scene, how its intrinsics were fitted to its first selected frame (the
        provenance's ``intrinsics`` entry): only scenes whose intrinsics were scaled, or that
        do not fit (``error``)."""
        found: dict[str, object] = {}
        for item in self.items():
            parsed = self._parse(item)
            if isinstance(parsed, str) or parsed[1] is None or parsed[0] in found:
                continue
            scene, number = parsed
            try:
                data = read_frame(self.scene_dir(scene), self._stem(self.scene_dir(scene),
                                                                     number),
                                  self.params.depth_scale, self.params.principal_point_tolerance)
            except scannet.ScanNetError as e:
                if e.code == "intrinsics_mismatch":
                    found[scene] = {"error": str(e)}
                continue
            found[scene] = data.notes
        return {scene: note for scene, note in found.items() if note}

    @staticmethod
    def _stem(scene_dir: Path, index: int) -> str:
        """The file stem of frame ``index`` ("3", or "000003" in zero-padded exports)."""
        return frame_stems(scene_dir).get(index, str(index))


def summarise(out: Path) -> dict[str, float]:
    """Metrics over a written uv index (any layout): frames, worst re-projection error,
    visibility fractions."""

    names = ("reproj_err_px", "valid", "conf_2d", "depth_agreement", "depth_in_image",
             "intrinsics_scaled", "nonfinite_points")
    stores = {name: open_features(out, field=name) for name in names}
    errors, valid, visible, agreement, in_image = [], [], [], [], []
    scaled, nonfinite = 0, {}
    for key in sorted(stores["valid"]):
        ok = stores["valid"][key]
        errors.append(float(stores["reproj_err_px"][key]))
        valid.append(float(ok.mean()) if ok.size else 0.0)
        visible.append(float(stores["conf_2d"][key].sum() / max(ok.sum(), 1)))
        agreement.append(float(stores["depth_agreement"][key]))
        in_image.append(float(stores["depth_in_image"][key]))
        scaled += int(stores["intrinsics_scaled"][key]) != 0
        nonfinite[key.split("/")[0]] = int(stores["nonfinite_points"][key])

    def mean(values: list[float]) -> float | None:   # no frame: no figure, not a 0
        return float(np.mean(values)) if values else None

    return {
        "frames": len(errors),
        "reprojection_max_px": max(errors) if errors else None,
        "valid_fraction_mean": mean(valid),
        "visible_of_valid_mean": mean(visible),
        "depth_agreement_min": min(agreement) if agreement else None,
        "depth_in_image_min": min(in_image) if in_image else None,
        "intrinsics_scaled_frames": scaled,
        "nonfinite_points": sum(nonfinite.values()),
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

    check_inputs(params)
    job = UvIndexJob(params)
    intrinsics = job.calibration()
    for scene, note in intrinsics.items():
        if "error" in note:
            log.error("%s %s: %s", STAGE, scene, note["error"])
        else:
            log.warning("%s %s: intrinsics scaled to the image size: %s", STAGE, scene, note)
    provenance = UvIndexProvenance(params=method_params(params), conventions=geometry.__doc__,
                                   intrinsics=intrinsics)
    result = run_job(job, None, stage=STAGE, out=params.out, writer=params.layout,
                     writer_options=WriterOptions(compression=params.compression),
                     provenance=provenance.to_dict(),
                     fingerprint={"params": fingerprint_params(params)},
                     params=params, item_bytes=ASSUMED_POINTS_PER_SCENE * BYTES_PER_POINT)
    if not result.finalized:   # compute-only run (shard range): no output to summarise yet
        finish_stage(STAGE, params.out, [result], params)
        return result
    metrics = summarise(Path(params.out))
    log.info("%s: %d frames written (%d computed, %d reused), %d failed, max re-projection "
             "error %s px", STAGE, result.records, result.computed, result.reused,
             result.failed, metrics["reprojection_max_px"])
    finish_stage(STAGE, params.out, [result], params, extra=metrics)
    return result
