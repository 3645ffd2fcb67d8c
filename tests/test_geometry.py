"""Projection math: hand-computed cameras, validity masks, depth checks, the batched form."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featcache.datasets import geometry

K = np.array([[100.0, 0.0, 50.0], [0.0, 200.0, 40.0], [0.0, 0.0, 1.0]])
SIZE = (101, 81)  # (W, H)


def rigid(rotation_deg: tuple[float, float, float], t: tuple[float, float, float]) -> np.ndarray:
    """Camera-to-world 4x4 from x, y, z rotations (degrees, applied z @ y @ x) and a translation."""
    ax, ay, az = np.deg2rad(rotation_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    pose = np.eye(4)
    pose[:3, :3] = rz @ ry @ rx
    pose[:3, 3] = t
    return pose


def test_hand_computed_projection_identity_pose() -> None:
    # u = 100 * 0.1/2 + 50 = 55, v = 200 * -0.2/2 + 40 = 20
    proj = geometry.project_points(np.array([[0.1, -0.2, 2.0]]), np.eye(4), K, SIZE)
    np.testing.assert_allclose(proj.uv, [[55.0, 20.0]], atol=1e-5)
    np.testing.assert_allclose(proj.depth, [2.0])
    assert proj.valid.tolist() == [True]
    assert proj.uv.dtype == np.float32 and proj.depth.dtype == np.float32


def test_hand_computed_projection_uses_inverse_pose() -> None:
    # camera rotated 90 deg about z and moved to (1, 2, 3): camera point (0.1, -0.2, 2)
    # is world R @ p + t = (0.2, 0.1, 2) + (1, 2, 3) = (1.2, 2.1, 5)
    pose = rigid((0, 0, 90), (1, 2, 3))
    proj = geometry.project_points(np.array([[1.2, 2.1, 5.0]]), pose, K, SIZE)
    np.testing.assert_allclose(proj.uv, [[55.0, 20.0]], atol=1e-4)
    np.testing.assert_allclose(proj.depth, [2.0], atol=1e-6)


def test_behind_camera_outside_frame_and_depth_range_are_invalid() -> None:
    points = np.array([
        [0.0, 0.0, -2.0],     # behind the camera
        [0.0, 0.0, 0.0],      # at the camera centre
        [1.2, 0.0, 2.0],      # u = 110 > W-1 = 100
        [-1.02, 0.0, 2.0],    # u = -1
        [0.0, 0.41, 2.0],     # v = 81 > H-1 = 80
        [1.0, 0.4, 2.0],      # u = 100, v = 80: exactly the last pixel centre -> valid
        [-1.0, -0.4, 2.0],    # u = 0, v = 0: the first pixel centre -> valid
        [0.0, 0.0, 0.1],      # z == depth_min: excluded (strict)
        [0.0, 0.0, 5.0],      # z == depth_max: excluded (strict)
        [np.nan, 0.0, 2.0],   # not a number
    ])
    proj = geometry.project_points(points, np.eye(4), K, SIZE, depth_min=0.1, depth_max=5.0)
    assert proj.valid.tolist() == [False, False, False, False, False, True, True, False, False,
                                   False]
    assert (proj.uv[[0, 1, 9]] == geometry.UV_BEHIND).all()
    assert np.isfinite(proj.uv).all()
    np.testing.assert_allclose(proj.uv[5], [100.0, 80.0], atol=1e-4)


def test_depth_consistency_at_another_resolution() -> None:
    # depth map at half resolution: cx_d = (cx + 0.5)/2 - 0.5 keeps pixel centres aligned
    k_depth = np.array([[50.0, 0, 24.75], [0, 100.0, 19.75], [0, 0, 1]])
    depth_map = np.full((41, 51), 2.0, dtype=np.float32)
    depth_map[19, 25] = 0.0                     # unknown, next to where point 3 lands
    cam = np.array([
        [0.2, 0.1, 2.0],        # on the surface
        [0.2, 0.1, 2.04],       # within 0.05 m
        [0.2, 0.1, 2.5],        # behind the surface: occluded
        [0.01, 0.0, 2.0],       # u = 25.0, v = 19.75: nearest depth pixel is (25, 20)
        [0.0, 0.0, -2.0],       # behind the camera
        [10.0, 0.0, 2.0],       # outside the depth map
    ])
    ok = geometry.depth_consistency(cam, depth_map, k_depth, tolerance=0.05)
    assert ok.tolist() == [True, True, False, True, False, False]
    depth_map[20, 25] = 0.0
    ok = geometry.depth_consistency(cam, depth_map, k_depth, tolerance=0.05)
    assert ok.tolist() == [True, True, False, False, False, False]


def render_tilted_plane(k_depth: np.ndarray, pose: np.ndarray, size: tuple[int, int],
                        ) -> np.ndarray:
    """Exact depth (metres, mm-quantised) of the world plane z = 3 seen from ``pose``."""
    width, height = size
    u, v = np.meshgrid(np.arange(width), np.arange(height))
    rays = np.stack([u, v, np.ones_like(u)], -1).reshape(-1, 3) @ np.linalg.inv(k_depth).T
    dirs = rays @ pose[:3, :3].T
    z_cam = (3.0 - pose[2, 3]) / dirs[:, 2]  # rays have z = 1 in the camera, so s = z_cam
    return (np.round(z_cam * 1000) / 1000).reshape(height, width).astype(np.float32)


def test_backprojected_depth_reprojects_within_one_pixel(record_property) -> None:
    k_color = np.array([[260.0, 0, 159.5], [0, 260.0, 119.5], [0, 0, 1]])
    k_depth = np.array([[130.0, 0, 79.5], [0, 130.0, 59.5], [0, 0, 1]])
    pose = rigid((8, -12, 3), (0.4, -0.2, 0.5))
    depth = render_tilted_plane(k_depth, pose, (160, 120))
    err = geometry.reprojection_error(depth, k_depth, k_color, pose, (320, 240))
    record_property("reprojection_max_px", err)
    assert err < 1e-3  # exact geometry: only float error remains, far below 1 px
    points, pixels = geometry.backproject_depth(depth, k_depth, pose)
    assert points.shape == (160 * 120, 3)
    np.testing.assert_allclose(points[:, 2], 3.0, atol=2e-3)   # on the plane (mm depth)
    proj = geometry.project_points(points, pose, k_color, (320, 240))
    # a depth pixel centre (u, v) is colour pixel centre (2u + 0.5, 2v + 0.5)
    np.testing.assert_allclose(proj.uv, 2 * pixels + 0.5, atol=1e-3)
    assert proj.valid.all()


@pytest.mark.parametrize("shared_k", [True, False])
def test_batched_torch_matches_numpy(shared_k: bool) -> None:
    rng = np.random.default_rng(0)
    points = rng.uniform([-3, -3, -1], [3, 3, 6], size=(3, 400, 3))
    poses = np.stack([rigid(tuple(rng.uniform(-20, 20, 3)), tuple(rng.uniform(-1, 1, 3)))
                      for _ in range(3)])
    ks = np.stack([K * [[s, 1, 1], [1, s, 1], [1, 1, 1]] for s in (0.8, 1.0, 1.3)])
    k_in = torch.from_numpy(K) if shared_k else torch.from_numpy(ks)
    uv, z, valid = geometry.project_points_batched(
        torch.from_numpy(points), torch.from_numpy(poses), k_in, SIZE, 0.1, 5.0)
    assert uv.shape == (3, 400, 2) and z.shape == (3, 400) and valid.dtype == torch.bool
    for b in range(3):
        ref = geometry.project_points(points[b], poses[b], K if shared_k else ks[b], SIZE,
                                      0.1, 5.0)
        np.testing.assert_allclose(uv[b].numpy(), ref.uv, atol=1e-3)
        np.testing.assert_allclose(z[b].numpy(), ref.depth, atol=1e-5)
        assert (valid[b].numpy() == ref.valid).all()
    assert 0 < valid.sum() < valid.numel()  # the case mixes valid and invalid points
