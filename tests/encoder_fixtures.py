"""Tiny-model helpers for tests (import from any test: ``from encoder_fixtures import ...``).

The tiny models go through the same params route as real ones, so a stage test can simply put
``model: featcache-tiny-vit`` (open_clip), ``model: featcache-tiny-siglip`` (timm/SigLIP-style
open_clip), ``model: featcache/dinov2-tiny`` (DINOv2) in its params.yaml with ``weights: random``;
for SAM2 use ``config: sam2.1_hiera_t`` at a small input size (``TINY_SAM2_SIZE``).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from featcache.encoders import TINY_DINOV2, TINY_OPENCLIP, TINY_SIGLIP, load_encoder, resolve_spec

Kind = Literal["clip", "siglip", "dinov2", "sam2"]

TINY_SAM2 = "sam2.1_hiera_t"
TINY_SAM2_SIZE = 256
TINY = {"clip": ("open_clip", TINY_OPENCLIP), "siglip": ("open_clip", TINY_SIGLIP),
        "dinov2": ("dinov2", TINY_DINOV2), "sam2": ("sam2", TINY_SAM2)}
# What each tiny model produces with its default input size (grid is [C, h, w]).
TINY_SHAPES = {"clip": {"grid": (64, 14, 14), "pooled": (32,), "input": (224, 224)},
               "siglip": {"grid": (96, 10, 10), "pooled": (96,), "input": (160, 160)},
               "dinov2": {"grid": (32, 16, 16), "pooled": None, "input": (224, 224)},
               "sam2": {"P4_S16": (256, 16, 16), "P5_S32": (256, 8, 8), "input": (256, 256)}}


def tiny_spec(kind: Kind, *, weights: str = "random", seed: int = 0,
              image_size: int | None = None):
    """EncoderSpec of a tiny model (SAM2: hiera_t at ``TINY_SAM2_SIZE`` unless given)."""
    family, name = TINY[kind]
    if kind == "sam2" and image_size is None:
        image_size = TINY_SAM2_SIZE
    return resolve_spec(family, name, weights=weights, seed=seed, image_size=image_size)


def tiny_encoder(kind: Kind, **kwargs):
    """A loaded tiny encoder on the CPU (random weights unless ``weights=`` says otherwise)."""
    return load_encoder(tiny_spec(kind, **kwargs), "cpu")


def real_looking_image(height: int = 240, width: int = 320, seed: int = 0) -> np.ndarray:
    """``(H, W, 3) uint8`` with smooth gradients, hard-edged shapes and mild noise: the kind of
    content on which resize implementations differ if they differ at all."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([xx / max(width - 1, 1), yy / max(height - 1, 1),
                    0.5 + 0.5 * np.sin((xx + yy) / 9.0)], axis=-1) * 255.0
    for _ in range(6):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        r = rng.uniform(0.05, 0.25) * min(height, width)
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
        img[disk] = rng.uniform(0, 255, size=3)
    y0, x0 = height // 3, width // 4
    img[y0:y0 + height // 5, x0:x0 + width // 3] = (250, 20, 30)
    img += rng.normal(0, 4, size=img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)
