"""The sampling math of sample_point_feats: a CLIP grid as a map, colour pixels as model-input
pixels, bilinear samples at the points (see :mod:`featcache.stages.sample_point_feats` for the
conventions). Pure functions of arrays and an :class:`EncoderSpec`; no files."""

from __future__ import annotations

import math

import numpy as np
import torch

from featcache.encoders.base import EncoderSpec
from featcache.encoders.preprocess import Preprocessor
from featcache.failures import CodedError, FailureCode


class GridError(CodedError, ValueError):
    """A missing or unusable CLIP grid; ``code`` names the failure in ``failures.tsv``."""


def tokens_to_map(tokens: np.ndarray, upscale: int) -> torch.Tensor:
    """``(g*g, width)`` row-major tokens -> ``PixelShuffle(upscale)`` map
    ``(width / upscale², g*upscale, g*upscale)`` float32."""

    n, width = tokens.shape
    side = math.isqrt(n)
    if side * side != n:
        raise GridError(FailureCode.BAD_GRID, f"{n} tokens do not form a square grid")
    if width % (upscale * upscale):
        raise GridError(FailureCode.BAD_GRID,
                        f"width {width} is not divisible by upscale² = {upscale**2}")
    grid = torch.from_numpy(np.asarray(tokens, dtype=np.float32)).T.reshape(width, side, side)
    return torch.nn.functional.pixel_shuffle(grid[None], upscale)[0]


def input_coords(uv: np.ndarray, image_size: tuple[int, int], spec: EncoderSpec) -> np.ndarray:
    """Colour-image pixels ``(N,2)`` (x, y; centres at integers) of a ``(W, H)`` image ->
    model-input pixels ``(N,2)`` float64, same convention, via the encoder's resize geometry."""

    width, height = image_size
    geo = Preprocessor(spec).geometry(height, width)
    x_in, y_in = geo.to_input(uv[:, 0].astype(np.float64), uv[:, 1].astype(np.float64))
    return np.stack([x_in, y_in], axis=1)


def normalise_coords(xy_in: np.ndarray, input_size: tuple[int, int]) -> tuple[np.ndarray,
                                                                              np.ndarray]:
    """Model-input pixels ``(N,2)`` (x, y) of an ``(H_in, W_in)`` input -> ``grid_sample``
    coordinates ``(N,2)`` in [-1, 1] (``align_corners=False``) and ``(N,)`` bool: inside the
    input, i.e. ``-0.5 <= x_in <= W_in - 0.5`` (pixel edges), same for y."""
    h_in, w_in = input_size
    extent = np.array([w_in, h_in], dtype=np.float64)
    norm = (xy_in + 0.5) / extent * 2 - 1
    inside = np.isfinite(norm).all(1) & (np.abs(norm) <= 1 + 1e-9).all(1)
    return norm, inside


def sample_map(feature_map: torch.Tensor, coords: np.ndarray) -> np.ndarray:
    """Bilinear samples of a ``(C, h, w)`` map at ``grid_sample`` coords ``(N,2)`` (x, y in
    [-1, 1], ``align_corners=False``; border padding so the outer half cell is not blended
    with zeros) -> ``(N, C)`` float32."""

    grid = torch.from_numpy(np.asarray(coords, dtype=np.float32)).view(1, 1, -1, 2)
    out = torch.nn.functional.grid_sample(feature_map[None].float(), grid, mode="bilinear",
                                          padding_mode="border", align_corners=False)
    return out[0, :, 0, :].T.contiguous().numpy()


def sample_point_features(tokens: np.ndarray, uv: np.ndarray, valid: np.ndarray,
                          image_size: tuple[int, int], spec: EncoderSpec, upscale: int,
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Features of N points in one frame: ``(pts_feat (N, C) float16, valid (N,) bool)``.

    ``tokens (g*g, width)`` is the frame's grid, ``uv (N,2)`` colour pixels (centres at
    integers) of an image of ``image_size = (W, H)``, ``valid (N,)`` the uv index's mask.
    """
    feature_map = tokens_to_map(tokens, upscale)
    coords, inside = normalise_coords(input_coords(uv, image_size, spec), spec.input_size)
    keep = np.asarray(valid, dtype=bool) & inside
    feats = np.zeros((len(uv), feature_map.shape[0]), dtype=np.float16)
    if keep.any():
        feats[keep] = sample_map(feature_map, coords[keep]).astype(np.float16)
    return feats, keep


def grid_tokens(grid: np.ndarray) -> np.ndarray:
    """A stored grid as ``(g*g, width)`` row-major tokens: the ``tokens`` array layout as is,
    the ``chw`` layout ``(width, g, g)`` transposed (see :mod:`featcache.stages._grids`)."""
    if grid.ndim == 2:
        return grid
    if grid.ndim == 3:
        return grid.reshape(grid.shape[0], -1).T
    raise GridError(FailureCode.BAD_GRID,
                    f"grid of shape {grid.shape}: expected (g*g, width) tokens "
                    "or (width, g, g)")
