"""Exact rendering of a box room with box furniture: depth, colour and surface points.

World coordinates are metres, z up (as ScanNet). The room is the axis-aligned box
``[0, Lx] x [0, Ly] x [0, Lz]`` seen from inside; furniture are solid axis-aligned boxes.

Cameras follow the OpenCV/ScanNet convention: camera x right, y down, z forward; a pose is
camera-to-world, ``X_world = R @ X_cam + t``; intrinsics ``u = fx * x / z + cx``,
``v = fy * y / z + cy`` with pixel ``(col i, row j)`` centred at ``u = i, v = j``. The ray of
pixel ``(i, j)`` is ``t + s * R @ ((i - cx) / fx, (j - cy) / fy, 1)``, so the ray parameter ``s``
of the first hit *is* the camera-z depth. Everything is computed with elementwise IEEE
arithmetic (no BLAS), so the result does not depend on the machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CHECKER_M = 0.25  # side of the texture squares, metres
LIGHT = (0.3, -0.5, 0.8)  # light direction for Lambert shading (not normalised)


@dataclass(frozen=True)
class Room:
    """A box room ``size = (Lx, Ly, Lz)`` with furniture ``boxes = ((min xyz), (max xyz))``."""

    size: tuple[float, float, float]
    boxes: tuple[tuple[tuple[float, float, float], tuple[float, float, float]], ...]


@dataclass(frozen=True)
class Hits:
    """Per-pixel first hits: ``depth`` float64 (H, W) camera-z metres, ``surface`` int (H, W)
    (0-5 room faces ``-x,+x,-y,+y,-z,+z``; ``6 + 6 k + f`` face ``f`` of box ``k``), ``points``
    float64 (H, W, 3) world, ``normals`` float64 (H, W, 3) facing the camera."""

    depth: np.ndarray
    surface: np.ndarray
    points: np.ndarray
    normals: np.ndarray


def pixel_rays(pose: np.ndarray, fx: float, fy: float, cx: float, cy: float,
               width: int, height: int) -> np.ndarray:
    """World ray directions ``float64 (H, W, 3)`` with camera-z component 1 (see module doc)."""
    x = (np.arange(width, dtype=np.float64) - cx) / fx
    y = (np.arange(height, dtype=np.float64) - cy) / fy
    xc, yc = np.meshgrid(x, y)
    r = pose[:3, :3]
    return np.stack([r[k, 0] * xc + r[k, 1] * yc + r[k, 2] for k in range(3)], axis=2)


def cast(room: Room, origin: np.ndarray, rays: np.ndarray) -> Hits:
    """First intersection of each ray with the room's walls or its furniture."""
    with np.errstate(divide="ignore", invalid="ignore"):
        depth, axis, positive = _room_exit(room, origin, rays)
        surface = axis * 2 + positive
        for k, (lo, hi) in enumerate(room.boxes):
            t_box, box_axis, box_positive = _box_entry(lo, hi, origin, rays)
            closer = t_box < depth
            depth = np.where(closer, t_box, depth)
            surface = np.where(closer, 6 + 6 * k + box_axis * 2 + box_positive, surface)
    points = origin[None, None, :] + depth[:, :, None] * rays
    normals = surface_normals(surface)
    return Hits(depth=depth, surface=surface, points=points, normals=normals)


def _room_exit(room: Room, origin: np.ndarray, rays: np.ndarray,
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distance to the room wall each ray leaves through, that wall's axis and side."""
    ts = []
    for a in range(3):
        wall = np.where(rays[..., a] > 0, room.size[a], 0.0)
        ts.append(np.where(rays[..., a] != 0, (wall - origin[a]) / rays[..., a], np.inf))
    t = np.stack(ts, axis=2)
    axis = np.argmin(t, axis=2)
    positive = (np.take_along_axis(rays, axis[..., None], 2)[..., 0] > 0).astype(int)
    return np.min(t, axis=2), axis, positive


def _box_entry(lo: tuple[float, ...], hi: tuple[float, ...], origin: np.ndarray,
               rays: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Slab test: entry distance (``inf`` on a miss), entry face axis and side (1 = max face)."""
    t1 = np.stack([(lo[a] - origin[a]) / rays[..., a] for a in range(3)], axis=2)
    t2 = np.stack([(hi[a] - origin[a]) / rays[..., a] for a in range(3)], axis=2)
    near, far = np.minimum(t1, t2), np.maximum(t1, t2)
    t_near, t_far = np.max(near, axis=2), np.min(far, axis=2)
    axis = np.argmax(near, axis=2)
    entering_max = np.take_along_axis(rays, axis[..., None], 2)[..., 0] < 0
    hit = (t_near <= t_far) & (t_near > 0)
    return np.where(hit, t_near, np.inf), axis, entering_max.astype(int)


def surface_normals(surface: np.ndarray) -> np.ndarray:
    """Unit normals ``float64 (..., 3)`` pointing into free space for each surface id."""
    face = np.where(surface < 6, surface, (surface - 6) % 6)
    axis, positive = face // 2, face % 2
    inward = surface < 6  # room faces look into the room, box faces look out of the box
    sign = np.where(inward, np.where(positive == 1, -1.0, 1.0),
                    np.where(positive == 1, 1.0, -1.0))
    normals = np.zeros(surface.shape + (3,))
    for a in range(3):
        normals[..., a] = np.where(axis == a, sign, 0.0)
    return normals


def surface_albedo(surface: np.ndarray, points: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Checker-textured base colour ``float64 (..., 3)`` in 0..255 at world ``points``."""
    cells = np.floor(points / CHECKER_M).astype(np.int64)
    parity = (cells[..., 0] + cells[..., 1] + cells[..., 2]) % 2
    base = palette[surface % len(palette)]
    return base * np.where(parity == 1, 1.0, 0.78)[..., None]


def shade(hits: Hits, palette: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Colour image ``uint8 (H, W, 3)``: albedo x Lambert light + fine noise."""
    light = np.array(LIGHT) / np.sqrt(sum(c * c for c in LIGHT))
    n = hits.normals
    lambert = np.abs(n[..., 0] * light[0] + n[..., 1] * light[1] + n[..., 2] * light[2])
    colour = surface_albedo(hits.surface, hits.points, palette) * (0.55 + 0.45 * lambert)[..., None]
    colour = colour + rng.integers(-6, 7, size=colour.shape)
    return np.clip(np.floor(colour + 0.5), 0, 255).astype(np.uint8)


def sample_surface_points(room: Room, rng: np.random.Generator, per_m2: float,
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Points on the floor, the walls and the furniture's sides and tops (not the ceiling).

    Returns ``(points float64 (N, 3) world metres, surface ids int (N,))``; points hidden inside
    furniture (floor under a box, wall behind a box) are left out.
    """
    faces = [(s, np.zeros(3), np.array(room.size, float)) for s in (0, 1, 2, 3, 4)]
    for k, (lo, hi) in enumerate(room.boxes):
        faces += [(6 + 6 * k + f, np.array(lo, float), np.array(hi, float)) for f in range(6)
                  if f != 4]
    pts, ids = [], []
    for surface, lo, hi in faces:
        axis, positive = (surface if surface < 6 else (surface - 6) % 6) // 2, surface % 2
        extent = np.where(np.arange(3) == axis, 1.0, hi - lo)
        n = int(per_m2 * float(np.prod(extent)))
        p = lo + rng.random((n, 3)) * (hi - lo)
        p[:, axis] = hi[axis] if positive else lo[axis]
        if surface < 6:
            p = p[~_inside_any_box(room, p)]
        pts.append(p)
        ids.append(np.full(len(p), surface))
    return np.concatenate(pts), np.concatenate(ids)


def _inside_any_box(room: Room, p: np.ndarray) -> np.ndarray:
    inside = np.zeros(len(p), bool)
    for lo, hi in room.boxes:
        inside |= np.all((p >= np.array(lo)) & (p <= np.array(hi)), axis=1)
    return inside
