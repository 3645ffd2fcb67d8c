"""One encoder interface for three model families (open_clip, DINOv2, SAM2).

::

    spec = resolve_spec("open_clip", "ViT-B-16", weights="random")   # cheap, no model
    pre = Preprocessor(spec)                                          # picklable, for workers
    enc = load_encoder(spec, device=resolve_device("auto"))           # loads the model once
    out = enc(torch.stack([pre(rgb) for rgb in images]))              # EncoderOutput

Tiny models for tests, usable through params like any other name (registered on first use,
nothing happens at import): open_clip ``featcache-tiny-vit`` and ``featcache-tiny-siglip``,
DINOv2 ``featcache/dinov2-tiny``. SAM2 has no tiny model; use ``sam2.1_hiera_t`` with a small
``image_size`` (a multiple of 32, e.g. 256).

This package imports nothing heavy at import time (model-free stages import
:mod:`featcache.encoders.weights` for its error type); classes are loaded on first access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from featcache.config import ParamError

if TYPE_CHECKING:
    import torch

    from featcache.encoders.base import Encoder, EncoderOutput, EncoderSpec
    from featcache.encoders.preprocess import Preprocessor, ResizeGeometry
    from featcache.encoders.weights import WeightsNotFoundError

FAMILIES = ("open_clip", "dinov2", "sam2")
TINY_OPENCLIP = "featcache-tiny-vit"
TINY_SIGLIP = "featcache-tiny-siglip"
TINY_DINOV2 = "featcache/dinov2-tiny"

_LAZY = {
    "Encoder": "featcache.encoders.base", "EncoderOutput": "featcache.encoders.base",
    "EncoderSpec": "featcache.encoders.base", "Preprocessor": "featcache.encoders.preprocess",
    "ResizeGeometry": "featcache.encoders.preprocess",
    "WeightsNotFoundError": "featcache.encoders.weights",
}
_MODULES = {"open_clip": "featcache.encoders.openclip", "dinov2": "featcache.encoders.dinov2",
            "sam2": "featcache.encoders.sam2"}

__all__ = ["FAMILIES", "TINY_OPENCLIP", "TINY_SIGLIP", "TINY_DINOV2", "resolve_spec",
           "load_encoder", "resolve_device", "register_tiny_models", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _family_module(family: str, key: str = "family") -> Any:
    if family not in _MODULES:
        raise ParamError(f"{key}: unknown encoder family {family!r}; allowed: "
                         f"{', '.join(FAMILIES)}")
    return importlib.import_module(_MODULES[family])


def resolve_spec(family: str, name: str, *, weights: str, seed: int = 0,
                 image_size: int | None = None, resize: str | None = None,
                 key: str | None = None) -> EncoderSpec:
    """The :class:`EncoderSpec` of ``name`` in ``family`` (``open_clip``, ``dinov2``, ``sam2``)
    without building the model. ``image_size`` overrides the model's input size (square);
    ``resize`` (``shortest_crop`` | ``squash``) overrides the default resize mode.

    Raises :class:`ParamError` naming ``key`` (default ``model``, for SAM2 ``config``) for an
    unknown model (listing close matches),
    ``weights`` for an unknown tag or a missing checkpoint path, ``size`` for an impossible
    input size.
    """
    if resize not in (None, "shortest_crop", "squash"):
        raise ParamError(f"resize: got {resize!r}; allowed: shortest_crop, squash")
    if seed < 0:
        raise ParamError(f"seed: must be >= 0, got {seed}")
    module = _family_module(family)
    resolver = getattr(module, f"resolve_{module.__name__.rsplit('.', 1)[1]}_spec")
    named = {"key": key} if key else {}
    return resolver(name, weights=weights, seed=seed, image_size=image_size, resize=resize,
                    **named)


def load_encoder(spec: EncoderSpec, device: torch.device | str = "cpu") -> Encoder:
    """Build the encoder of ``spec`` once, load its weights, move it to ``device`` (float32,
    eval, no grad). Raises :class:`WeightsNotFoundError` when tagged weights are nowhere."""
    module = _family_module(spec.family)
    loader = getattr(module, f"load_{module.__name__.rsplit('.', 1)[1]}")
    return loader(spec, device)


def resolve_device(device: str) -> torch.device:
    """``auto`` -> ``cuda`` if available else ``cpu``; ``cpu``; ``cuda``/``cuda:<i>`` checked
    against the visible GPUs (ParamError naming ``device`` otherwise). ``device`` is
    params.yaml's ``runtime.device`` or a stage's ``runtime.<stage>.device``."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        index = int(device[5:]) if ":" in device else 0
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if index >= count:
            raise ParamError(f"device: {device!r} requested (runtime.device or "
                             f"runtime.<stage>.device) but {count} CUDA device(s) are "
                             f"visible; use auto or cpu")
        return torch.device(device)
    raise ParamError(f"device: got {device!r}; allowed: auto, cpu, cuda, cuda:<index>")


def register_tiny_models() -> None:
    """Register the tiny open_clip test models with open_clip (idempotent). Not needed before
    :func:`resolve_spec`/:func:`load_encoder`, which do it themselves; useful when a test calls
    ``open_clip`` directly with a tiny name."""
    from featcache.encoders.openclip import register_tiny_models as _register

    _register()
