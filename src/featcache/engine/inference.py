"""Device and precision helpers for the model side of the runner."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from featcache.engine.types import Precision


def resolve_precision(device: torch.device, precision: Precision = "auto") -> str:
    """The compute precision actually used: ``precision`` unless ``auto``; under ``auto``,
    ``bf16`` on a device that supports it (CUDA with bf16: every family, SAM2 included, as
    SAM2's own code does; fp16 can overflow in its encoder), else ``fp16`` on CUDA, and
    ``fp32`` on the CPU (CPU autocast is slower and less precise). Recorded in provenance."""
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def autocast_for(device: torch.device, precision: Precision = "auto") -> contextlib.AbstractContextManager:
    """Autocast in :func:`resolve_precision`'s precision (none for fp32). Features are stored
    in the dtype the stage asks for regardless."""
    precision = resolve_precision(device, precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_storage(x: torch.Tensor, dtype: str | None) -> np.ndarray:
    """A float32 device tensor cast to the storage dtype on the device (``fp16``; ``fp32`` or
    ``None`` keep float32), then brought to the CPU as a contiguous array: only the stored
    bytes cross back. Round to nearest even, as numpy's ``astype``, so the stored bits do not
    depend on where the cast runs."""
    if dtype == "fp16":
        x = x.to(torch.float16)
    return x.contiguous().cpu().numpy()
