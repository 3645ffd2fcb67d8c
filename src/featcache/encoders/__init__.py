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

The families are an explicit registry (:data:`featcache.encoders.registry.REGISTRY`); each
stage imports its own family module directly, so editing ``encoders/sam2.py`` invalidates only
the SAM2 stage. This package imports nothing heavy at import time (model-free stages import
:mod:`featcache.encoders.weights` for its error type); classes are loaded on first access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from featcache.config import ParamError

if TYPE_CHECKING:
    import torch  # deferred: params checks import featcache.encoders without loading torch

    from featcache.encoders.base import Encoder, EncoderOutput, EncoderSpec
    from featcache.encoders.preprocess import Preprocessor, ResizeGeometry
    from featcache.encoders.registry import load_encoder, resolve_spec
    from featcache.encoders.weights import WeightsNotFoundError

FAMILIES = ("open_clip", "dinov2", "sam2")
TINY_OPENCLIP = "featcache-tiny-vit"
TINY_SIGLIP = "featcache-tiny-siglip"
TINY_DINOV2 = "featcache/dinov2-tiny"

# lazy exports for users and tests. A stage never imports a family through these: it imports
# its own family module (featcache.encoders.openclip, .dinov2, .sam2), so that dvc.yaml lists
# only that module among its deps; the by-name API lives in featcache.encoders.registry.
_LAZY = {  # attribute -> submodule (relative names: nothing here is a static import)
    "Encoder": "base", "EncoderOutput": "base", "EncoderSpec": "base",
    "Preprocessor": "preprocess", "ResizeGeometry": "preprocess",
    "WeightsNotFoundError": "weights", "resolve_spec": "registry", "load_encoder": "registry",
    "register_tiny_models": "openclip",
}

__all__ = ["FAMILIES", "TINY_OPENCLIP", "TINY_SIGLIP", "TINY_DINOV2", "resolve_device", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
