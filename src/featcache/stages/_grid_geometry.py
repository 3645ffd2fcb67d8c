"""Patch-grid geometry of the grid stages: the stored grid side, pooling, array layouts and
the alpha mask per stored cell (see :mod:`featcache.stages._grids` for the conventions).

- **Pooling** (:func:`pool_grid`): the stored side ``t`` must divide the native side ``g``;
  ``t x t`` cells each average a ``(g/t) x (g/t)`` block (``avg_pool2d``, no overlap, no
  padding). ``t = 0`` or ``t = g`` stores the native grid unchanged; a ``t`` that does not
  divide ``g`` is a ``ParamError`` before any work (:func:`check_target_grid`).
- **Layouts** (:func:`arrange_grid`): ``tokens`` ``(t*t, C)``, row ``i*t + j`` is the cell at row
  ``i`` (y, down) and column ``j`` (x, right); ``chw`` ``(C, t, t)`` indexed ``[c, i, j]``.
- **Alpha** (:func:`alpha_grid`): the alpha goes through the model's own geometry
  (``cv2.INTER_AREA`` resize to the resized size, the same centre crop), then the mean over
  each patch, then the same pooling as the features.
"""

from __future__ import annotations

from typing import Any, Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from featcache.config import require
from featcache.encoders.preprocess import BOX_RESIZE_FACTOR, Preprocessor

ArrayLayout = Literal["tokens", "chw"]


def check_target_grid(native: tuple[int, int], target: int, key: str = "grid") -> int:
    """The stored grid side for ``target`` (0 = native); ParamError unless it divides ``native``."""
    g_h, g_w = native
    if target == 0:
        return g_h
    require(g_h == g_w, key, f"pooling needs a square native grid, got {g_h}x{g_w}")
    require(0 < target <= g_h and g_h % target == 0, key,
            f"{target} does not divide the model's native {g_h}x{g_h} grid; use 0 (native) or "
            f"one of {[d for d in range(1, g_h + 1) if g_h % d == 0]}")
    return target


def pool_grid(grid: torch.Tensor, target: int) -> torch.Tensor:
    """``[B, C, g, g] -> [B, C, t, t]`` by non-overlapping ``(g/t)``-blocks averages.

    ``target`` 0 or ``g`` returns ``grid`` unchanged; ``ValueError`` if it does not divide ``g``.
    """

    g = grid.shape[-1]
    if target in (0, g):
        return grid
    if g % target or grid.shape[-2] != g:
        raise ValueError(f"cannot pool a {tuple(grid.shape[-2:])} grid to {target}x{target}")
    return F.avg_pool2d(grid, kernel_size=g // target)


def arrange_grid(grid: torch.Tensor, target: int, layout: ArrayLayout) -> torch.Tensor:
    """``[B, C, g, g]`` -> pooled to ``t`` and laid out: ``tokens`` ``[B, t*t, C]`` (row-major
    over (y, x)) or ``chw`` ``[B, C, t, t]``."""
    grid = pool_grid(grid, target)
    return grid.flatten(2).transpose(1, 2) if layout == "tokens" else grid


def alpha_grid(alpha: np.ndarray | None, shape: tuple[int, int], pre: Preprocessor,
               target: int) -> np.ndarray:
    """Alpha of an ``shape = (H, W)`` image averaged over each stored cell: ``(t, t)`` float32
    in ``[0, 1]``; all ones when ``alpha`` is None (see the module docstring)."""


    spec = pre.spec
    (in_h, in_w), p = spec.input_size, spec.patch_size
    g_h, g_w = in_h // p, in_w // p
    t = target or g_h
    if alpha is None:
        return np.ones((t, t), np.float32)
    geo = pre.geometry(*shape)
    if geo.resized_height * geo.resized_width > BOX_RESIZE_FACTOR * in_h * in_w:
        a = _alpha_window(alpha, geo, in_h, in_w)
    else:
        a = cv2.resize(alpha.astype(np.float32) / 255.0,
                       (geo.resized_width, geo.resized_height), interpolation=cv2.INTER_AREA)
        a = a[geo.offset_y:geo.offset_y + in_h, geo.offset_x:geo.offset_x + in_w]
    cells = a[:g_h * p, :g_w * p].reshape(g_h, p, g_w, p).mean(axis=(1, 3))
    k = g_h // t
    return cells.reshape(t, k, t, k).mean(axis=(1, 3)).astype(np.float32)


def _alpha_window(alpha: np.ndarray, geo: Any, in_h: int, in_w: int) -> np.ndarray:
    """The model-input window of the resized alpha, resizing only the original pixels under
    it (as the preprocessing does above ``BOX_RESIZE_FACTOR``: a 1 x W strip would otherwise be
    resized to 224 x 224W floats). The window is placed to the nearest resized pixel, so cells
    differ from the full resize by a sub-pixel shift (under 0.05 on noise, tested)."""

    h, w = alpha.shape
    x0, y0 = geo.offset_x / geo.scale_x, geo.offset_y / geo.scale_y
    x1, y1 = (geo.offset_x + in_w) / geo.scale_x, (geo.offset_y + in_h) / geo.scale_y
    c0, r0 = max(0, int(np.floor(x0))), max(0, int(np.floor(y0)))
    c1, r1 = min(w, int(np.ceil(x1))), min(h, int(np.ceil(y1)))
    size = (max(in_w, int(round((c1 - c0) * geo.scale_x))),
            max(in_h, int(round((r1 - r0) * geo.scale_y))))
    a = cv2.resize(alpha[r0:r1, c0:c1].astype(np.float32) / 255.0, size,
                   interpolation=cv2.INTER_AREA)
    ox = min(int(round((x0 - c0) * geo.scale_x)), size[0] - in_w)
    oy = min(int(round((y0 - r0) * geo.scale_y)), size[1] - in_h)
    return a[oy:oy + in_h, ox:ox + in_w]
