"""Two ScanNet-style scenes rendered from exact geometry (see :mod:`featcache.sample.render`).

Layout under ``<root>``, as ScanNet's SensReader export::

    scannetv2_sample.txt                         scene list
    scans/<scene>/color/<i>.jpg                  320x240 colour frames
    scans/<scene>/depth/<i>.png                  160x120 uint16 depth, millimetres, 0 = no data
    scans/<scene>/pose/<i>.txt                   camera-to-world 4x4 (one frame: all -inf)
    scans/<scene>/intrinsic/intrinsic_{color,depth}.txt, extrinsic_{color,depth}.txt (identity)
    scans/<scene>/<scene>_vh_clean_2.ply         surface points, binary little endian, metres
    scans/<scene>/<scene>.txt                    ScanNet's scene meta (sizes, fx/fy/mx/my)

The files are the ground truth: poses are written with 6 decimals as ScanNet does and the frames
are rendered from the values read back, so back-projecting a depth pixel ``(i, j, d)`` with the
depth intrinsics and the pose gives a point on a surface up to the millimetre rounding of ``d``.
Colour and depth cameras share the pose (identity extrinsics) but have their own intrinsics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from featcache.sample.paint import save_jpeg, save_png
from featcache.sample.render import (
    Room,
    cast,
    pixel_rays,
    sample_surface_points,
    shade,
    surface_albedo,
)

SCENES = ("scene0000_00", "scene0001_00")
SCENE_LIST = "scannetv2_sample.txt"
COLOR_SIZE, DEPTH_SIZE = (320, 240), (160, 120)  # (width, height)
COLOR_K = (289.0, 289.0, 159.75, 119.75)  # fx, fy, cx, cy (pixels, centres at integers)
DEPTH_K = (144.5, 144.5, 79.75, 59.75)
DEPTH_SCALE = 1000.0  # depth PNG units per metre
POINTS_PER_M2 = 80.0


def write_scannet(root: Path, rng: np.random.Generator) -> dict[str, Any]:
    """Write both scenes under ``root``; return the manifest entry."""
    (root / "scans").mkdir(parents=True, exist_ok=True)
    (root / SCENE_LIST).write_text("".join(f"{s}\n" for s in SCENES))
    entry: dict[str, Any] = {"scenes": list(SCENES), "frames": {}, "points": {},
                             "color_size": list(COLOR_SIZE), "depth_size": list(DEPTH_SIZE),
                             "depth_scale": DEPTH_SCALE}
    for k, scene in enumerate(SCENES):
        room = _make_room(rng, k)
        n_frames = int(rng.integers(6, 11))
        invalid = int(rng.integers(1, n_frames - 1)) if k == 0 else -1
        missing = 1 if k == 1 else -1
        scene_dir = root / "scans" / scene
        palette = rng.integers(60, 230, size=(6 + 6 * len(room.boxes), 3)).astype(float)
        for i, pose in enumerate(_camera_path(room, n_frames, rng)):
            _write_frame(scene_dir, i, pose, room, palette, rng,
                         invalid_pose=i == invalid, missing_depth=i == missing)
        _write_calibration(scene_dir, scene, n_frames)
        n_points = _write_ply(scene_dir / f"{scene}_vh_clean_2.ply", room, palette, rng)
        entry["frames"][scene] = n_frames
        entry["points"][scene] = n_points
        if k == 0:
            entry["invalid_pose"] = {"scene": scene, "frame": invalid}
        else:
            entry["missing_depth"] = {"scene": scene, "frame": missing,
                                      "box_xyxy": list(_MISSING_BOX)}
    return entry


_MISSING_BOX = (60, 40, 72, 50)  # depth pixels x0, y0, x1, y1 (exclusive) set to 0


def _cm(x: float) -> float:
    return float(np.floor(x * 100 + 0.5)) / 100


def _make_room(rng: np.random.Generator, k: int) -> Room:
    lx, ly, lz = _cm(3.6 + rng.random()), _cm(3.2 + rng.random()), _cm(2.5 + 0.2 * rng.random())
    tx, ty = _cm(lx * (0.3 + 0.15 * rng.random())), _cm(ly * (0.45 + 0.1 * rng.random()))
    table = ((tx, ty, 0.0), (_cm(tx + 1.0), _cm(ty + 0.7), 0.75))
    cx = _cm(lx * 0.55)
    cabinet = ((cx, _cm(ly - 0.45), 0.0), (_cm(cx + 0.9 + 0.2 * k), ly, 1.1))
    return Room(size=(lx, ly, lz), boxes=(table, cabinet))


def _camera_path(room: Room, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Camera-to-world poses along the near wall looking into the room, as read from text."""
    lx, ly, _ = room.size
    poses = []
    for i in range(n):
        s = i / (n - 1)
        jitter = (rng.random(3) - 0.5) * 0.1
        eye = np.array([lx * (0.2 + 0.6 * s), 0.35 + 0.2 * s, 1.5 - 0.2 * s]) + jitter
        target = np.array([lx * (0.4 + 0.2 * s), ly * 0.65, 0.6])
        poses.append(parse_matrix(format_matrix(look_at(eye, target))))
    return poses


def look_at(eye: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Camera-to-world 4x4 (OpenCV axes: x right, y down, z forward) with world z up."""
    f = _unit(target - eye)
    right = _unit(_cross(f, np.array([0.0, 0.0, 1.0])))
    down = _cross(f, right)
    pose = np.eye(4)
    pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = right, down, f, eye
    return pose


def _cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.array([a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2],
                     a[0] * b[1] - a[1] * b[0]])


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.sqrt(v[0] * v[0] + v[1] * v[1] + v[2] * v[2])


def format_matrix(m: np.ndarray) -> str:
    """A 4x4 matrix in ScanNet's text format: 4 lines of space-separated ``%f`` values."""
    return "".join(" ".join(f"{v:f}" for v in row) + "\n" for row in m)


def parse_matrix(text: str) -> np.ndarray:
    """Inverse of :func:`format_matrix` (accepts ``-inf``)."""
    return np.array([[float(v) for v in line.split()] for line in text.strip().splitlines()])


def _write_frame(scene_dir: Path, i: int, pose: np.ndarray, room: Room, palette: np.ndarray,
                 rng: np.random.Generator, invalid_pose: bool, missing_depth: bool) -> None:
    origin = pose[:3, 3]
    color = cast(room, origin, pixel_rays(pose, *COLOR_K, *COLOR_SIZE))
    save_jpeg(shade(color, palette, rng), scene_dir / "color" / f"{i}.jpg")
    depth_m = cast(room, origin, pixel_rays(pose, *DEPTH_K, *DEPTH_SIZE)).depth
    depth = np.floor(depth_m * DEPTH_SCALE + 0.5)
    depth = np.where(depth <= 65535, depth, 0).astype(np.uint16)
    if missing_depth:
        x0, y0, x1, y1 = _MISSING_BOX
        depth[y0:y1, x0:x1] = 0
    save_png(depth, scene_dir / "depth" / f"{i}.png")
    text = format_matrix(np.full((4, 4), -np.inf)) if invalid_pose else format_matrix(pose)
    (scene_dir / "pose").mkdir(parents=True, exist_ok=True)
    (scene_dir / "pose" / f"{i}.txt").write_text(text)


def intrinsic_matrix(k: tuple[float, float, float, float]) -> np.ndarray:
    """ScanNet's 4x4 intrinsic matrix from ``(fx, fy, cx, cy)``."""
    fx, fy, cx, cy = k
    return np.array([[fx, 0, cx, 0], [0, fy, cy, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float)


def _write_calibration(scene_dir: Path, scene: str, n_frames: int) -> None:
    intr = scene_dir / "intrinsic"
    intr.mkdir(parents=True, exist_ok=True)
    (intr / "intrinsic_color.txt").write_text(format_matrix(intrinsic_matrix(COLOR_K)))
    (intr / "intrinsic_depth.txt").write_text(format_matrix(intrinsic_matrix(DEPTH_K)))
    for name in ("extrinsic_color.txt", "extrinsic_depth.txt"):
        (intr / name).write_text(format_matrix(np.eye(4)))
    meta = {"axisAlignment": " ".join(f"{v:g}" for v in np.eye(4).ravel()),
            "colorHeight": COLOR_SIZE[1], "colorWidth": COLOR_SIZE[0],
            "depthHeight": DEPTH_SIZE[1], "depthWidth": DEPTH_SIZE[0],
            "fx_color": COLOR_K[0], "fx_depth": DEPTH_K[0], "fy_color": COLOR_K[1],
            "fy_depth": DEPTH_K[1], "mx_color": COLOR_K[2], "mx_depth": DEPTH_K[2],
            "my_color": COLOR_K[3], "my_depth": DEPTH_K[3], "numColorFrames": n_frames,
            "numDepthFrames": n_frames, "numIMUmeasurements": 0, "sceneType": "Synthetic"}
    (scene_dir / f"{scene}.txt").write_text("".join(f"{k} = {v}\n" for k, v in meta.items()))


PLY_DTYPE = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"),
                      ("green", "u1"), ("blue", "u1"), ("alpha", "u1")])


def _write_ply(path: Path, room: Room, palette: np.ndarray, rng: np.random.Generator) -> int:
    """Surface points with their texture colour, ScanNet's vertex layout, no faces."""
    points, surface = sample_surface_points(room, rng, POINTS_PER_M2)
    colour = np.clip(np.floor(surface_albedo(surface, points, palette) + 0.5), 0, 255)
    vertices = np.zeros(len(points), PLY_DTYPE)
    for a, name in enumerate("xyz"):
        vertices[name] = points[:, a]
    for c, name in enumerate(("red", "green", "blue")):
        vertices[name] = colour[:, c]
    vertices["alpha"] = 255
    header = ("ply\nformat binary_little_endian 1.0\ncomment featcache synthetic sample\n"
              f"element vertex {len(points)}\n"
              + "".join(f"property {t} {n}\n" for n, t in
                        (("x", "float"), ("y", "float"), ("z", "float"), ("red", "uchar"),
                         ("green", "uchar"), ("blue", "uchar"), ("alpha", "uchar")))
              + "element face 0\nproperty list uchar int vertex_indices\nend_header\n")
    path.write_bytes(header.encode("ascii") + vertices.tobytes())
    return len(points)

