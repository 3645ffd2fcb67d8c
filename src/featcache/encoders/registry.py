"""The encoder families by name: an explicit registry, for code that meets a family as data.

A stage knows its family and imports that family's module itself (``extract_sam2`` imports
:mod:`featcache.encoders.sam2` and nothing of open_clip), so its dvc.yaml deps list only that
module. Code that reads the family from a file (verify's spot checks recompute features from the
spec stored in an output's provenance) or from a user's call goes through :data:`REGISTRY`,
which depends on every family::

    spec = resolve_spec("open_clip", "ViT-B-16", weights="random")
    encoder = load_encoder(spec, device="cpu")
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from featcache.config import ParamError
from featcache.encoders import dinov2, openclip, sam2

if TYPE_CHECKING:
    import torch

    from featcache.encoders.base import Encoder, EncoderSpec


@dataclass(frozen=True)
class Family:
    """One model family: how to describe a model without building it, and how to load it."""

    name: str
    resolve: Callable[..., EncoderSpec]
    load: Callable[..., Encoder]


REGISTRY: dict[str, Family] = {
    "open_clip": Family("open_clip", openclip.resolve_openclip_spec, openclip.load_openclip),
    "dinov2": Family("dinov2", dinov2.resolve_dinov2_spec, dinov2.load_dinov2),
    "sam2": Family("sam2", sam2.resolve_sam2_spec, sam2.load_sam2),
}


def family(name: str, key: str = "family") -> Family:
    """The registered family ``name``; ParamError naming ``key`` otherwise."""
    if name not in REGISTRY:
        raise ParamError(f"{key}: unknown encoder family {name!r}; allowed: "
                         f"{', '.join(REGISTRY)}")
    return REGISTRY[name]


def resolve_spec(family_name: str, name: str, *, weights: str, seed: int = 0,
                 image_size: int | None = None, resize: str | None = None,
                 key: str | None = None) -> EncoderSpec:
    """The :class:`EncoderSpec` of ``name`` in ``family_name`` (``open_clip``, ``dinov2``,
    ``sam2``) without building the model. ``image_size`` overrides the model's input size
    (square); ``resize`` (``shortest_crop`` | ``squash``) overrides the default resize mode.

    Raises :class:`ParamError` naming ``key`` (default ``model``, for SAM2 ``config``) for an
    unknown model (listing close matches), ``weights`` for an unknown tag or a missing
    checkpoint path, ``size`` for an impossible input size.
    """
    if resize not in (None, "shortest_crop", "squash"):
        raise ParamError(f"resize: got {resize!r}; allowed: shortest_crop, squash")
    if seed < 0:
        raise ParamError(f"seed: must be >= 0, got {seed}")
    named: dict[str, Any] = {"key": key} if key else {}
    return family(family_name).resolve(name, weights=weights, seed=seed, image_size=image_size,
                                       resize=resize, **named)


def load_encoder(spec: EncoderSpec, device: torch.device | str = "cpu") -> Encoder:
    """Build the encoder of ``spec`` once, load its weights, move it to ``device`` (float32,
    eval, no grad). Raises :class:`WeightsNotFoundError` when tagged weights are nowhere."""
    return family(spec.family).load(spec, device)
