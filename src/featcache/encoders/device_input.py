"""The device's half of the ``fast`` and ``gpu_decode`` preprocessing paths.

Workers (:func:`featcache.encoders.preprocess.prepare_file`) send, per image, either ``pixels``
(``uint8 (3, h, w)``: the decoded image, maybe DCT-downscaled; or an exact worker result at
input size, ``float32`` in ``[0, 1]`` for SAM2) or ``jpeg`` (the file's bytes, ``uint8 (n,)``)
with its EXIF ``orientation``, and the ``geometry`` ``int64 [resized_h, resized_w, offset_y,
offset_x]`` the exact path would use for the original image. Here, on the device:

1. ``jpeg`` items are decoded in one ``torchvision.io.decode_jpeg`` call (a list: batched
   nvjpeg on CUDA, libjpeg on the CPU) and turned to display orientation (as PIL's
   ``exif_transpose``);
2. every image is resized to ``(resized_h, resized_w)`` (``interpolate`` with the spec's mode,
   ``antialias=True``: PIL-like filters with support scaled to the downsampling factor) and
   centre-cropped at ``(offset_y, offset_x)``; open_clip/DINOv2 inputs are then rounded to the
   ``uint8`` levels, as PIL's resize returns them (SAM2 resizes in float upstream: not rounded);
3. the batch is zero-padded to ``pad_to`` rows (one shape for every batch, as the engine pads
   the exact path) and normalised by :func:`~featcache.encoders.preprocess.model_input`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from featcache.encoders.base import EncoderSpec
from featcache.encoders.preprocess import model_input


def batch_model_input(inputs: torch.Tensor | None, arrays: dict[str, list[Any]],
                      spec: EncoderSpec, device: torch.device, pad_to: int = 0) -> torch.Tensor:
    """The model input ``[B', 3, H_in, W_in] float32`` (normalised, on ``device``) of a batch:
    the exact path's stacked ``inputs`` when there are any, else the device paths' ``arrays``
    (``B' = max(B, pad_to)``; see the module docstring)."""
    if inputs is not None:
        return model_input(inputs, spec, device)
    return device_model_input(arrays, spec, device, pad_to)


def device_model_input(arrays: dict[str, list[Any]], spec: EncoderSpec, device: torch.device,
                       pad_to: int = 0) -> torch.Tensor:
    """``arrays`` (per item: ``pixels`` or ``jpeg`` + ``orientation``, and ``geometry``) ->
    ``[max(B, pad_to), 3, H_in, W_in] float32`` normalised on ``device``. Raises
    ``RuntimeError`` when a JPEG does not decode (the engine then retries the batch's items one
    by one, so the bad one becomes its own failure row)."""
    geometry = arrays["geometry"]
    n = len(geometry)
    images: list[torch.Tensor | None] = [None] * n
    pixels = arrays.get("pixels", [None] * n)
    for i, p in enumerate(pixels):
        if p is not None:
            images[i] = torch.from_numpy(np.ascontiguousarray(p)).to(device, non_blocking=True)
    jpegs = [i for i, j in enumerate(arrays.get("jpeg", [None] * n)) if j is not None]
    if jpegs:
        decoded = decode_jpegs([arrays["jpeg"][i] for i in jpegs], device)
        for i, img in zip(jpegs, decoded):
            images[i] = apply_orientation(img, int(arrays["orientation"][i]))
    missing = [i for i, img in enumerate(images) if img is None]
    if missing:
        raise ValueError(f"device-path items without pixels or jpeg bytes: rows {missing}")
    resized = [resize_on_device(img, tuple(int(v) for v in geo), spec)
               for img, geo in zip(images, geometry)]
    x = torch.stack(resized)
    if pad_to > n:
        x = torch.cat([x, x.new_zeros((pad_to - n, *x.shape[1:]))])
    return model_input(x, spec, device)


def decode_jpegs(data: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """JPEG bytes -> ``uint8 [3, h, w]`` RGB tensors on ``device`` (grayscale replicated), in
    one batched ``decode_jpeg`` call; the EXIF orientation is not applied."""
    # torchvision.io is imported here only: it is needed on the gpu_decode path alone
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.from_numpy(np.array(d, dtype=np.uint8, copy=True)) for d in data]
    try:
        return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))
    except RuntimeError as e:   # keep the decoder's reason, not its source location
        reason = str(e).strip().splitlines()[-1].rsplit(", ", 1)[-1]
        raise RuntimeError(f"JPEG decode on {device.type} failed: {reason}") from None


def apply_orientation(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """``[C, h, w]`` as stored -> display orientation for EXIF ``orientation`` 1-8 (the same
    flips and rotations as PIL's ``ImageOps.exif_transpose``)."""
    if orientation == 2:
        return img.flip(-1)
    if orientation == 3:
        return img.flip(-1, -2)
    if orientation == 4:
        return img.flip(-2)
    if orientation == 5:
        return img.transpose(-1, -2)
    if orientation == 6:
        return img.rot90(-1, dims=(-2, -1))
    if orientation == 7:
        return img.transpose(-1, -2).flip(-1, -2)
    if orientation == 8:
        return img.rot90(1, dims=(-2, -1))
    return img


def resize_on_device(img: torch.Tensor, geometry: tuple[int, ...], spec: EncoderSpec,
                     ) -> torch.Tensor:
    """``[3, h, w]`` (``uint8``, or ``float32`` in ``[0, 1]``) -> ``float32 [3, H_in, W_in]`` in
    ``[0, 1]``: resized to ``geometry``'s ``(resized_h, resized_w)`` and cropped at its offsets
    (an image already at the input size with a zero offset is only scaled to ``[0, 1]``)."""
    rh, rw, oy, ox = geometry
    out_h, out_w = spec.input_size
    x = img.to(torch.float32)
    if img.dtype == torch.uint8:
        x = x.div_(255)
    if tuple(x.shape[-2:]) != (rh, rw):
        x = F.interpolate(x[None], size=(rh, rw), mode=spec.interpolation,
                          align_corners=False, antialias=True)[0]
        if spec.family != "sam2":   # the exact path's PIL resize returns uint8 levels
            x = x.mul_(255).round_().clamp_(0, 255).div_(255)
    return x[:, oy:oy + out_h, ox:ox + out_w]
