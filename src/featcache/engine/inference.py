"""Device and precision helpers for the model side of the runner."""

from __future__ import annotations

import contextlib
import torch

from featcache.engine.types import Precision


def autocast_for(device: torch.device, precision: Precision = "auto") -> contextlib.AbstractContextManager:
    """Autocast on CUDA (bf16 where supported, else fp16, under ``auto``); fp32 on the CPU
    unless asked. Features are stored in the dtype the stage asks for regardless."""
    if precision == "fp32" or (device.type != "cuda" and precision == "auto"):
        return contextlib.nullcontext()
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
