"""Pinhole projection of world points into camera frames (numpy, plus a batched torch form).

Conventions used everywhere in featcache:

- Camera frame as in OpenCV / ScanNet: x right, y down, z forward (depth), metres.
- Poses are **camera-to-world** ``(4,4)`` matrices (``p_world = T @ p_cam``), as stored in
  ScanNet's ``pose/<i>.txt``; projection uses their inverse (world-to-camera).
- Pixel coordinates ``(u, v)``: ``u`` = x to the right (column), ``v`` = y down (row), **pixel
  centres at integers**: pixel ``(0, 0)`` covers ``[-0.5, 0.5) x [-0.5, 0.5)`` and its centre is
  ``(0.0, 0.0)``. This is the convention of ScanNet's / OpenCV's intrinsics, so ``u = fx·x/z + cx``
  needs no half-pixel shift. A point is inside the image when ``0 <= u <= W-1`` and
  ``0 <= v <= H-1``. (To sample a map with ``grid_sample(align_corners=False)`` use
  ``(u + 0.5) / W * 2 - 1``.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch  # only this batched form needs torch; verify and the uv index use numpy

#: uv value written for points behind the camera (z <= 0), where the projection is undefined.
UV_BEHIND = -1.0


@dataclass(frozen=True)
class Projection:
    """Projection of N points into one frame.

    ``uv (N,2) float32`` pixel coordinates (x right, y down, centres at integers; ``UV_BEHIND``
    for z <= 0); ``depth (N,) float32`` camera z in metres (negative behind the camera);
    ``valid (N,) bool`` = depth in ``(depth_min, depth_max)`` and inside the image.
    """

    uv: np.ndarray
    depth: np.ndarray
    valid: np.ndarray


def world_to_camera(points: np.ndarray, cam_to_world: np.ndarray) -> np.ndarray:
    """World points ``(N,3)`` → camera frame ``(N,3)`` float64 using the inverse of the
    camera-to-world pose ``(4,4)``."""
    world_to_cam = np.linalg.inv(np.asarray(cam_to_world, dtype=np.float64))
    pts = np.asarray(points, dtype=np.float64)
    return pts @ world_to_cam[:3, :3].T + world_to_cam[:3, 3]


def camera_to_pixels(points_cam: np.ndarray, intrinsics: np.ndarray) -> np.ndarray:
    """Camera-frame points ``(N,3)`` → pixel coordinates ``(N,2)`` float64 with ``K (3,3)``.

    Points with z <= 0 (or non-finite coordinates) get ``UV_BEHIND``.
    """
    k = np.asarray(intrinsics, dtype=np.float64)[:3, :3]
    z = points_cam[:, 2]
    front = z > 0
    safe_z = np.where(front, z, 1.0)
    homog = points_cam @ k.T
    uv = homog[:, :2] / safe_z[:, None]
    uv[~front | ~np.isfinite(uv).all(1)] = UV_BEHIND
    return uv


def inside_image(uv: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(N,)`` bool: ``0 <= u <= W-1`` and ``0 <= v <= H-1`` for ``size = (W, H)``."""
    width, height = size
    u, v = uv[:, 0], uv[:, 1]
    return (u >= 0) & (u <= width - 1) & (v >= 0) & (v <= height - 1)


def project_points(points: np.ndarray, cam_to_world: np.ndarray, intrinsics: np.ndarray,
                   size: tuple[int, int], depth_min: float = 0.0,
                   depth_max: float = float("inf")) -> Projection:
    """Project world points ``(N,3)`` into a frame of ``size = (W, H)`` pixels.

    ``cam_to_world (4,4)``; ``intrinsics`` ``(3,3)`` or ``(4,4)`` (top-left 3x3 is used). A point
    is valid when ``depth_min < z < depth_max`` and it lands inside the image.
    """
    cam = world_to_camera(points, cam_to_world)
    uv = camera_to_pixels(cam, intrinsics)
    z = cam[:, 2]
    valid = (z > depth_min) & (z < depth_max) & inside_image(uv, size) & np.isfinite(uv).all(1)
    return Projection(uv=uv.astype(np.float32), depth=z.astype(np.float32), valid=valid)


def depth_consistency(points_cam: np.ndarray, depth_map: np.ndarray, depth_intrinsics: np.ndarray,
                      tolerance: float) -> np.ndarray:
    """Whether camera-frame points ``(N,3)`` agree with a depth map: ``(N,)`` bool.

    ``depth_map (h,w)`` float metres, 0 = unknown, at its own resolution with its own
    intrinsics. Each point is projected with ``depth_intrinsics`` and compared with the
    **nearest** depth pixel: consistent when ``|z - depth| <= tolerance`` (metres, absolute).
    Points falling outside the depth map, behind the camera or on an unknown (0) depth pixel
    are not consistent.
    """
    measured = measured_depth(points_cam, depth_map, depth_intrinsics)
    return (measured > 0) & (np.abs(points_cam[:, 2] - measured) <= tolerance)


def measured_depth(points_cam: np.ndarray, depth_map: np.ndarray,
                   depth_intrinsics: np.ndarray) -> np.ndarray:
    """The depth map's value ``(N,)`` float64 at the **nearest** depth pixel of each
    camera-frame point ``(N,3)``; 0 where the point is behind the camera, outside the map or
    on an unknown (0) pixel."""
    uv = camera_to_pixels(points_cam, depth_intrinsics)
    height, width = depth_map.shape
    cols = np.rint(uv[:, 0])
    rows = np.rint(uv[:, 1])
    inside = (points_cam[:, 2] > 0) & (cols >= 0) & (cols <= width - 1) \
        & (rows >= 0) & (rows <= height - 1)
    measured = np.zeros(len(points_cam), dtype=np.float64)
    measured[inside] = depth_map[rows[inside].astype(np.int64), cols[inside].astype(np.int64)]
    return measured


def depth_agreement(points_cam: np.ndarray, depth_map: np.ndarray, depth_intrinsics: np.ndarray,
                    tolerance: float, depth_min: float = 0.0,
                    depth_max: float = float("inf")) -> tuple[float, int]:
    """Does the pose put the scene where the depth map sees it? ``(fraction, n)``: of the ``n``
    points with ``depth_min < z < depth_max`` that land on a known depth pixel, the fraction
    within ``tolerance`` metres of it (0.0 when ``n == 0``). High for a right pose (occluded
    points lower it), near 0 for a pose of another convention (world-to-camera) or frame."""
    z = points_cam[:, 2]
    measured = measured_depth(points_cam, depth_map, depth_intrinsics)
    known = (measured > 0) & (z > depth_min) & (z < depth_max)
    n = int(known.sum())
    if n == 0:
        return 0.0, 0
    return float((np.abs(z[known] - measured[known]) <= tolerance).mean()), n


def depth_in_color(depth_map: np.ndarray, depth_intrinsics: np.ndarray,
                   color_intrinsics: np.ndarray, color_size: tuple[int, int]) -> float:
    """Do the two intrinsics describe cameras that see the same view? The fraction of known
    depth pixels whose ray lands inside the colour image of ``color_size = (W, H)`` (colour and
    depth share the optical centre: ``K_color @ inv(K_depth) @ [u, v, 1]``); 0.0 when the map
    has no known pixel. Near 1 for ScanNet's registered depth; a quarter for colour intrinsics
    of twice the image's resolution."""
    rows, cols = np.nonzero(depth_map > 0)
    if len(rows) == 0:
        return 0.0
    k_c = np.asarray(color_intrinsics, dtype=np.float64)[:3, :3]
    k_d = np.asarray(depth_intrinsics, dtype=np.float64)[:3, :3]
    homog = np.stack([cols, rows, np.ones(len(rows))], axis=1) @ (k_c @ np.linalg.inv(k_d)).T
    uv = homog[:, :2] / homog[:, 2:3]
    return float(inside_image(uv, color_size).mean())


def backproject_depth(depth_map: np.ndarray, depth_intrinsics: np.ndarray,
                      cam_to_world: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lift every known depth pixel to the world.

    ``depth_map (h,w)`` float metres (0 = unknown). Returns ``(points_world (M,3) float64,
    pixels (M,2) float64)`` with ``pixels`` the ``(u, v)`` depth-pixel centres (integers).
    """
    rows, cols = np.nonzero(depth_map > 0)
    z = depth_map[rows, cols].astype(np.float64)
    pixels = np.stack([cols, rows], axis=1).astype(np.float64)
    k_inv = np.linalg.inv(np.asarray(depth_intrinsics, dtype=np.float64)[:3, :3])
    rays = np.concatenate([pixels, np.ones((len(z), 1))], axis=1) @ k_inv.T
    cam = rays * (z / rays[:, 2])[:, None]
    pose = np.asarray(cam_to_world, dtype=np.float64)
    return cam @ pose[:3, :3].T + pose[:3, 3], pixels


def reprojection_error(depth_map: np.ndarray, depth_intrinsics: np.ndarray,
                       color_intrinsics: np.ndarray, cam_to_world: np.ndarray,
                       color_size: tuple[int, int]) -> float:
    """Max error in colour pixels of depth → world → colour, against the analytic mapping.

    Depth pixels are back-projected to the world (depth intrinsics, pose) and projected again
    with :func:`project_points` into the colour frame. Colour and depth share the optical centre
    (ScanNet's registered depth), so the exact colour pixel of depth pixel ``p`` is
    ``K_color @ inv(K_depth) @ [u, v, 1]``. Returns NaN when no pixel lands in the colour frame
    (no figure, not a perfect one).

    This round trip goes through the same pose and intrinsics both ways, so it cannot see a
    pose of the wrong convention or intrinsics of the wrong image size: that is what
    :func:`depth_agreement` and :func:`depth_in_color` are for.
    """
    points, pixels = backproject_depth(depth_map, depth_intrinsics, cam_to_world)
    proj = project_points(points, cam_to_world, color_intrinsics, color_size)
    k_c = np.asarray(color_intrinsics, dtype=np.float64)[:3, :3]
    k_d = np.asarray(depth_intrinsics, dtype=np.float64)[:3, :3]
    depth_to_color = k_c @ np.linalg.inv(k_d)
    homog = np.concatenate([pixels, np.ones((len(pixels), 1))], axis=1) @ depth_to_color.T
    expected = homog[:, :2] / homog[:, 2:3]
    if not proj.valid.any():
        return float("nan")
    err = np.linalg.norm(proj.uv[proj.valid].astype(np.float64) - expected[proj.valid], axis=1)
    return float(err.max())


def project_points_batched(points: torch.Tensor, cam_to_world: torch.Tensor,
                           intrinsics: torch.Tensor, size: tuple[int, int],
                           depth_min: float = 0.0, depth_max: float = float("inf"),
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched :func:`project_points` on any device (CPU or CUDA).

    ``points (B,N,3)`` world, ``cam_to_world (B,4,4)``, ``intrinsics (B,3,3)`` or ``(3,3)``
    shared by all frames; ``size = (W, H)``. Computes in the dtype of ``points`` (use float64
    for exact agreement with the numpy form). Returns ``uv (B,N,2)`` (``UV_BEHIND`` for
    z <= 0), ``z (B,N)`` and ``valid (B,N) bool``, with the conventions of the module docstring.
    """
    import torch

    dtype = points.dtype
    world_to_cam = torch.linalg.inv(cam_to_world.to(dtype))
    cam = points @ world_to_cam[:, :3, :3].transpose(1, 2) + world_to_cam[:, None, :3, 3]
    k = intrinsics.to(dtype)[..., :3, :3]
    k = k.expand(points.shape[0], 3, 3) if k.dim() == 2 else k
    z = cam[..., 2]
    front = z > 0
    safe_z = torch.where(front, z, torch.ones_like(z))
    uv = (cam @ k.transpose(1, 2))[..., :2] / safe_z[..., None]
    uv = torch.where(front[..., None], uv, torch.full_like(uv, UV_BEHIND))
    width, height = size
    inside = (uv[..., 0] >= 0) & (uv[..., 0] <= width - 1) \
        & (uv[..., 1] >= 0) & (uv[..., 1] <= height - 1)
    valid = (z > depth_min) & (z < depth_max) & inside & torch.isfinite(uv).all(-1)
    return uv, z, valid
