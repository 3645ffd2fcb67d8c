"""Pictures of cached features, for people rather than programs (drawn by the ``verify`` stage).

- ``clip_grid_pca.png``, ``dinov2_pca.png``: a few images as the model saw them (resized and
  cropped per the recorded preprocessing) beside their patch grid, the grid's first three
  principal components (over the tokens of all images shown) as RGB;
- ``edges.png``: SA-1B images with their largest edge map in red, then the smaller maps;
- ``uv_projection.png``: a ScanNet frame with the scene's points projected (green: visible,
  ``conf_2d = 1``; red: occluded) over the colour and the depth map, and the points coloured by
  the PCA of their sampled CLIP features;
- ``siglip_segments.png``: a few segments' crops with the mask outlined, beside the blended crop
  the model encoded.

OpenCV and NumPy only (images are BGR ``uint8`` arrays); PNG output is byte-deterministic.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from featcache.config import build_dataclass
from featcache.datasets import scannet
from featcache.datasets.coco_panoptic import (
    read_ids_and_image,
    read_panoptic_split,
    segment_key,
)
from featcache.datasets.images import composite_alpha, list_images, load_image
from featcache.encoders import Preprocessor
from featcache.engine.atomic import atomic_path
from featcache.provenance import (
    EdgeProvenance,
    GridProvenance,
    SiglipProvenance,
    UvIndexProvenance,
)
from featcache.reader import FeatureStore, open_features
from featcache.stages._grids import image_key
from featcache.stages.build_uv_index import STAGE as UV_STAGE
from featcache.stages.build_uv_index import UvIndexParams
from featcache.stages.extract_siglip import H5_NAME, crop_box, mask_bbox, segment_crop

log = logging.getLogger(__name__)

TILE = 192                                   # tile height in pixels
GREEN, RED, YELLOW = (60, 220, 60), (40, 40, 230), (0, 230, 255)    # BGR


@dataclass(frozen=True)
class PictureInputs:
    """What the pictures are drawn from: the output folders of edge_maps_methodB,
    build_uv_index, sample_point_feats and extract_siglip (the grid stages' stores are passed
    as opened), ``items`` per picture, and ``folder``, where the pictures go."""

    folder: Path
    items: int
    edges: Path
    uv_index: Path
    point_feats: Path
    siglip: Path


def draw_pictures(inputs: PictureInputs, grids: dict[str, list[FeatureStore]]) -> list[str]:
    """Write every picture into ``inputs.folder`` (replaced as a whole); returns their paths.

    A picture that cannot be drawn is logged and skipped: the checks, not the pictures, say
    whether the outputs are right, and a corrupt output can raise anything here.
    """

    n = inputs.items
    drawers: dict[str, Callable[[], np.ndarray | None]] = {
        "clip_grid_pca.png": lambda: grid_pca_picture(grids.get("clip_grid", []), n),
        "dinov2_pca.png": lambda: grid_pca_picture(grids.get("dinov2", []), n),
        "edges.png": lambda: edges_picture(inputs.edges, n),
        "uv_projection.png": lambda: uv_picture(inputs.uv_index, inputs.point_feats),
        "siglip_segments.png": lambda: siglip_picture(inputs.siglip, n),
    }
    written = []
    with atomic_path(inputs.folder, is_dir=True) as tmp:
        for name, draw in drawers.items():
            try:
                image = draw()
            except Exception as e:  # noqa: BLE001 - see the docstring
                log.warning("picture %s not drawn: %s: %s", name, type(e).__name__, e)
                continue
            if image is not None:
                cv2.imwrite(str(tmp / name), image)
                written.append((inputs.folder / name).as_posix())
    return written


def grid_pca_picture(stores: Sequence[FeatureStore], n: int) -> np.ndarray | None:
    """The first ``n`` images of the first split beside the PCA->RGB of their grids."""

    if not stores:
        return None
    store = stores[0]
    prov = GridProvenance.from_dict(store.provenance)
    files = {image_key(p.name, prov.key_rule): p for p in list_images(prov.images)}
    keys = [k for k in sorted(store) if k in files][:n]
    views, tokens = [], []
    for key in keys:
        image = load_image(files[key])
        rgb = composite_alpha(image.rgb, image.alpha, prov.background)
        views.append(model_view(rgb, Preprocessor(prov.preprocessing)))
        grid = np.asarray(store[key], np.float32)
        tokens.append(grid if prov.array_layout == "tokens" else
                      grid.reshape(grid.shape[0], -1).T)
    t = prov.grid
    colours = pca_rgb(np.concatenate(tokens)).reshape(len(keys), t, t, 3)
    rows = [hstack([fit(view[..., ::-1], TILE), fit(c[..., ::-1], TILE, cv2.INTER_NEAREST)])
            for view, c in zip(views, colours)]
    return titled(vstack(rows), f"{prov.model} {store.path.name}: image as encoded | PCA of "
                                f"its {t}x{t} grid ({', '.join(keys)})")


def model_view(rgb: np.ndarray, preprocessor: Preprocessor) -> np.ndarray:
    """``(H, W, 3)`` RGB resized and centre-cropped as the encoder's preprocessing does."""
    geo = preprocessor.geometry(*rgb.shape[:2])
    in_h, in_w = preprocessor.spec.input_size
    resized = cv2.resize(rgb, (geo.resized_width, geo.resized_height),
                         interpolation=cv2.INTER_AREA)
    return resized[geo.offset_y:geo.offset_y + in_h, geo.offset_x:geo.offset_x + in_w]


def pca_rgb(features: np.ndarray) -> np.ndarray:
    """``(N, C)`` features -> ``(N, 3)`` uint8: the first three principal components, each
    stretched from its 1st to its 99th percentile."""
    x = features.astype(np.float64) - features.mean(axis=0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    proj = x @ vt[:3].T
    if proj.shape[1] < 3:
        proj = np.pad(proj, ((0, 0), (0, 3 - proj.shape[1])))
    lo, hi = np.percentile(proj, 1, axis=0), np.percentile(proj, 99, axis=0)
    scaled = (proj - lo) / np.maximum(hi - lo, 1e-12)
    return (np.clip(scaled, 0, 1) * 255).round().astype(np.uint8)


def edges_picture(folder: Path, n: int) -> np.ndarray | None:
    """The first ``n`` SA-1B images with edges (edgeless ones only to fill up), the largest
    edge map in red over the image, then every map."""

    store = open_features(folder)
    prov = EdgeProvenance.from_dict(store.provenance)
    sizes = sorted(prov.sizes, reverse=True)
    files = {p.stem: p for p in list_images(prov.sa1b)}
    chosen: dict[str, dict[str, np.ndarray]] = {}
    blank: dict[str, dict[str, np.ndarray]] = {}  # images without edges, shown only if needed
    for key in (k for k in sorted(store) if k in files):
        maps = store[key]
        if maps[f"edge_{sizes[0]}x{sizes[0]}"].any():
            chosen[key] = maps
        elif len(blank) < n:
            blank[key] = maps
        if len(chosen) == n:
            break
    rows = []
    for key, maps in list({**chosen, **blank}.items())[:n]:
        bgr = load_image(files[key]).rgb[..., ::-1].copy()
        edge = cv2.resize(maps[f"edge_{sizes[0]}x{sizes[0]}"], bgr.shape[1::-1],
                          interpolation=cv2.INTER_NEAREST) > 0
        bgr[edge] = RED
        small = [fit(np.repeat(maps[f"edge_{s}x{s}"][..., None] * 255, 3, axis=2), TILE,
                     cv2.INTER_NEAREST) for s in sizes]
        rows.append(hstack([fit(bgr, TILE)] + small))
    if not rows:
        return None
    maps = " | ".join(f"{s}x{s}" for s in sizes)
    return titled(vstack(rows), f"edge maps (Method B, kernel {prov.kernel_size}): image with "
                                f"edge_{sizes[0]}x{sizes[0]} in red | {maps}")


def uv_picture(uv_folder: Path, feats_folder: Path) -> np.ndarray | None:
    """The first frame of the uv index (any layout): points over colour and depth, and, when
    the point features exist, the points coloured by their feature PCA."""

    store = open_features(uv_folder)
    if not len(store):
        return None
    key = sorted(store)[0]
    arrays = store[key]
    params = build_dataclass(UvIndexParams, UvIndexProvenance.from_dict(store.provenance).params,
                             UV_STAGE)
    scene_dir = Path(params.scannet) / "scans" / key.split("/")[0]
    paths = scannet.frame_paths(scene_dir, str(arrays["frame"]))
    color = cv2.imread(str(paths.color), cv2.IMREAD_COLOR)
    depth = scannet.read_depth(paths.depth, params.depth_scale)
    panels = render_panels(color, depth, arrays, zoom=2)
    feats = open_features(feats_folder) if feats_folder.is_dir() else {}
    right = ""
    if key in feats:
        panels = hstack([panels, feature_panel(color, feats[key], zoom=2)])
        right = "; right: points coloured by the PCA of pts_feat"
    n_valid, n_vis = int(arrays["valid"].sum()), int((arrays["conf_2d"] > 0).sum())
    return add_caption(panels, f"{key}: {n_valid} of {len(arrays['valid'])} points in view, "
                               f"{n_vis} visible (green), {n_valid - n_vis} occluded (red)"
                               f"{right}")


def render_panels(color: np.ndarray, depth: np.ndarray, arrays: dict[str, np.ndarray],
                  zoom: int) -> np.ndarray:
    """Colour ``(H,W,3)`` BGR and depth ``(h,w)`` metres, each with the frame's valid points
    drawn at ``uv_idx`` (pixel centres at integers, hence the +0.5 when scaling)."""
    height, width = color.shape[:2]
    big = cv2.resize(color, (width * zoom, height * zoom), interpolation=cv2.INTER_NEAREST)
    span = max(float(depth.max()), 1e-6)
    depth_u8 = (np.clip(depth / span, 0, 1) * 255).astype(np.uint8)
    depth_rgb = cv2.applyColorMap(depth_u8, cv2.COLORMAP_VIRIDIS)
    depth_rgb[depth <= 0] = 0
    depth_big = cv2.resize(depth_rgb, (width * zoom, height * zoom),
                           interpolation=cv2.INTER_NEAREST)
    valid, visible = arrays["valid"], arrays["conf_2d"] > 0
    for panel in (big, depth_big):
        for sel, colour in ((valid & ~visible, RED), (valid & visible, GREEN)):
            for u, v in (arrays["uv_idx"][sel] + 0.5) * zoom:
                cv2.circle(panel, (int(u), int(v)), 2, colour, -1, lineType=cv2.LINE_AA)
    return np.concatenate([big, depth_big], axis=1)


def feature_panel(color: np.ndarray, feats: dict[str, np.ndarray], zoom: int) -> np.ndarray:
    """The dimmed colour frame with each valid point drawn in the PCA colour of its feature."""
    height, width = color.shape[:2]
    panel = cv2.resize(color // 3, (width * zoom, height * zoom), interpolation=cv2.INTER_NEAREST)
    valid = feats["valid"]
    if valid.sum() >= 3:
        colours = pca_rgb(feats["pts_feat"][valid].astype(np.float32))[:, ::-1]
        for (u, v), c in zip((feats["uv_idx"][valid] + 0.5) * zoom, colours):
            cv2.circle(panel, (int(u), int(v)), 2, tuple(int(x) for x in c), -1,
                       lineType=cv2.LINE_AA)
    return panel


def siglip_picture(folder: Path, n: int) -> np.ndarray | None:
    """``n`` segments spread over the embeddings: crop with the mask outlined | blended crop."""

    store = open_features(folder / H5_NAME if (folder / H5_NAME).is_file() else folder)
    prov, keys = SiglipProvenance.from_dict(store.provenance), list(store)
    chosen = [keys[i] for i in np.linspace(0, len(keys) - 1, min(n, len(keys))).astype(int)]
    split = read_panoptic_split(prov.coco, prov.split)
    crop = prov.crop
    tiles = []
    for entry in (e for e in split.entries if e.image is not None):
        segments = [s for s in entry.image.segments
                    if segment_key(entry.image.image_id, s.id) in chosen]
        if not segments:
            continue
        ids, rgb = read_ids_and_image(split, entry.image)
        for seg in segments:
            mask = ids == seg.id
            x0, y0, x1, y1 = box = crop_box(mask_bbox(mask), *ids.shape, crop.pad_ratio,
                                            crop.min_crop)
            outlined = fit(rgb[y0:y1, x0:x1, ::-1], TILE)  # outline drawn at display size
            shown = fit(mask[y0:y1, x0:x1].astype(np.uint8), TILE, cv2.INTER_NEAREST)
            contours, _ = cv2.findContours(shown, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(outlined, contours, -1, (0, 0, 0), 3)
            cv2.drawContours(outlined, contours, -1, YELLOW, 1)
            blended = segment_crop(rgb, mask, box, crop)[..., ::-1]
            pair = hstack([outlined, fit(blended, TILE)])
            tiles.append(titled(pair, segment_key(entry.image.image_id, seg.id)
                                + (" crowd" if seg.iscrowd else "")))
    if not tiles:
        return None
    return titled(vstack(tiles), f"{prov.model}: segment crop, mask outlined in yellow | "
                                 f"the blended crop it encoded (bg_alpha {crop.bg_alpha})")


def fit(image: np.ndarray, height: int, interpolation: int = cv2.INTER_AREA) -> np.ndarray:
    """``image`` scaled to ``height`` rows, aspect ratio kept."""
    h, w = image.shape[:2]
    width = max(1, round(w * height / h))
    return cv2.resize(np.ascontiguousarray(image), (width, height), interpolation=interpolation)


def hstack(images: Sequence[np.ndarray], gap: int = 4) -> np.ndarray:
    """Side by side on white, top-aligned, ``gap`` pixels apart."""
    height = max(i.shape[0] for i in images)
    parts = []
    for image in images:
        pad = np.full((height, image.shape[1] + gap, 3), 255, np.uint8)
        pad[:image.shape[0], :image.shape[1]] = image
        parts.append(pad)
    return np.concatenate(parts, axis=1)[:, :sum(i.shape[1] for i in parts) - gap]


def vstack(images: Sequence[np.ndarray], gap: int = 4) -> np.ndarray:
    """One above the other on white, left-aligned, ``gap`` pixels apart."""
    width = max(i.shape[1] for i in images)
    parts = []
    for image in images:
        pad = np.full((image.shape[0] + gap, width, 3), 255, np.uint8)
        pad[:image.shape[0], :image.shape[1]] = image
        parts.append(pad)
    return np.concatenate(parts, axis=0)[:sum(i.shape[0] for i in parts) - gap]


def titled(image: np.ndarray, text: str) -> np.ndarray:
    """``text`` in a white bar above ``image``."""
    bar = np.full((22, max(image.shape[1], 8 * len(text)), 3), 255, np.uint8)
    cv2.putText(bar, text, (4, 15), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
    return vstack([bar, image], gap=0)


def add_caption(image: np.ndarray, text: str) -> np.ndarray:
    """``text`` in a white bar below ``image``."""
    bar = np.full((28, image.shape[1], 3), 255, np.uint8)
    cv2.putText(bar, text, (8, 19), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([image, bar], axis=0)
