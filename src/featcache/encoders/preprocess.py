"""Model-input preprocessing built from an :class:`EncoderSpec` alone (no model needed).

:class:`Preprocessor` is small and picklable, so it runs inside DataLoader workers. It reproduces
the upstream eval transforms exactly, with every setting explicit (no hidden 256-resize /
224-crop as in transformers' DINOv2 processor):

- open_clip and DINOv2: torchvision on PIL images, i.e. ``PIL.Image.resize`` (antialiased) with
  the spec's interpolation, then centre crop (``shortest_crop``) or nothing (``squash``), then
  ``ToTensor`` and ``Normalize``. Equal to ``open_clip.image_transform`` for the same settings.
- SAM2: as ``sam2.utils.transforms.SAM2Transforms``: ``ToTensor`` first, then a float tensor
  resize to the square input (bilinear, antialiased), then ``Normalize``.

The work is split in two so that the bytes crossing from DataLoader workers are few:
:meth:`Preprocessor.prepare` (workers) does the geometry and returns ``uint8 [3, H_in, W_in]``
(SAM2: the float resize's ``float32`` result, since its exact transform resizes in float);
:func:`model_input` (the compute side, on the device) casts, scales to ``[0, 1]`` and
normalises a whole batch. ``Preprocessor(spec)(rgb)`` is both steps, with the same bits.

Memory per item is bounded by the model input: with ``shortest_crop`` an image whose resized
size would exceed :data:`BOX_RESIZE_FACTOR` times the input area (e.g. a 1 x W strip, which
would become 224 x 224W) is resized through the crop window only (PIL's ``box``, the same
filter; measured within 4 grey levels of the full resize + crop, mean < 0.2, not bit-equal). Images
of aspect ratio up to 16:1 take the exact upstream order.

Preprocessing paths (the ``preprocess`` param of the image-folder stages, :data:`PREPROCESS_PATHS`;
the same :class:`ResizeGeometry` in all three, so points map the same way):

- ``exact`` (the default): the above, bit for bit the upstream transform;
- ``fast``: a JPEG at least :data:`DRAFT_FACTOR` times the resized size on both sides is decoded
  DCT-domain downscaled by libjpeg (PIL ``Image.draft``: 1/2, 1/4 or 1/8, never below the
  resized size, so the last resample still downsamples); the worker sends that ``uint8`` image
  as it is and the resize (``torch`` ``interpolate``, the spec's mode, antialiased) and crop run
  on the device (:mod:`featcache.encoders.device_input`);
- ``gpu_decode``: the worker sends a plain JPEG's bytes (:func:`~featcache.datasets.images.
  read_jpeg`), decoded on the device in one batched ``torchvision.io.decode_jpeg`` call (nvjpeg
  on CUDA), the EXIF orientation applied there, then resized as ``fast`` does. Anything else
  (PNG, CMYK, a truncated file) is decoded by the worker as ``exact`` decodes it.

Images whose resize is bounded by the crop window (above :data:`BOX_RESIZE_FACTOR`) take the
exact worker preprocessing under every path.

Coordinates (:class:`ResizeGeometry`): x right, y down, in pixels of the original image, with
pixel ``i`` covering ``[i, i+1)`` (its centre at ``i + 0.5``). A point maps into the model input
as ``x_in = (x + 0.5) * scale_x - offset_x - 0.5`` (same for y), where ``scale`` is
resized/original size and ``offset`` the centre-crop origin in the resized image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
from PIL import Image

from featcache.datasets.images import DecodedImage, load_image, read_jpeg
from featcache.encoders.base import EncoderSpec

BOX_RESIZE_FACTOR = 16  # resized/input area (= aspect ratio) above which only the crop window is resized
_PIL_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
PreprocessPath = Literal["exact", "fast", "gpu_decode"]
PREPROCESS_PATHS: tuple[str, ...] = get_args(PreprocessPath)
DRAFT_FACTOR = 2   # a JPEG is DCT-downscaled only when >= this many times the resized size
#: what each path does, for provenance (which path made a file)
PREPROCESS_DESCRIPTIONS = {
    "exact": "exact upstream preprocessing: PIL decode, resize and crop on the host",
    "fast": f"fast: JPEGs >= {DRAFT_FACTOR}x the resized size decoded DCT-downscaled "
            "(PIL draft); uint8 to the device; resize + crop on the device (torch "
            "interpolate, antialias)",
    "gpu_decode": "gpu_decode: plain JPEGs decoded on the device (torchvision decode_jpeg, "
                  "batched; EXIF orientation applied there), other files decoded on the host "
                  "as exact; resize + crop on the device (torch interpolate, antialias)",
}


@dataclass(frozen=True)
class ResizeGeometry:
    """How original pixel coordinates map into the model input (see the module docstring)."""

    scale_x: float
    scale_y: float
    offset_x: int
    offset_y: int
    resized_width: int    # size after resizing, before the crop
    resized_height: int

    def to_input(self, x: np.ndarray | float, y: np.ndarray | float,
                 ) -> tuple[np.ndarray | float, np.ndarray | float]:
        """Original-image pixel coordinates -> model-input pixel coordinates (same convention:
        integer + 0.5 is a pixel centre only after adding back the 0.5)."""
        return ((x + 0.5) * self.scale_x - self.offset_x - 0.5,
                (y + 0.5) * self.scale_y - self.offset_y - 0.5)

    def to_original(self, x_in: np.ndarray | float, y_in: np.ndarray | float,
                    ) -> tuple[np.ndarray | float, np.ndarray | float]:
        """Inverse of :meth:`to_input`."""
        return ((x_in + 0.5 + self.offset_x) / self.scale_x - 0.5,
                (y_in + 0.5 + self.offset_y) / self.scale_y - 0.5)


def resized_size(height: int, width: int, spec: EncoderSpec) -> tuple[int, int]:
    """``(h, w)`` after the resize step, before any crop (torchvision's rule for ``Resize(int)``:
    the short side becomes the input size, the long side ``int(size * long / short)``)."""
    out_h, out_w = spec.input_size
    if spec.resize == "squash":
        return out_h, out_w
    if out_h != out_w:
        raise ValueError(f"shortest_crop needs a square input size, got {spec.input_size}")
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(out_h * long / short)
    return (new_long, out_h) if width <= height else (out_h, new_long)


class Preprocessor:
    """``(H, W, 3) uint8 RGB -> [3, H_in, W_in] float32`` normalised model input.

    Raises ``ValueError`` on anything but a non-empty ``uint8`` RGB array, so a bad item becomes
    a failure record instead of a wrong feature. ``path`` is the preprocessing path of
    :func:`prepare_file` (see the module docstring); ``__call__`` and :meth:`prepare` are the
    exact path whatever it is.
    """

    def __init__(self, spec: EncoderSpec, path: PreprocessPath = "exact") -> None:
        if path not in PREPROCESS_PATHS:
            raise ValueError(f"preprocess path {path!r}; allowed: {PREPROCESS_PATHS}")
        self.spec, self.path = spec, path

    def __call__(self, rgb: np.ndarray) -> torch.Tensor:
        return model_input(self.prepare(rgb)[None], self.spec, torch.device("cpu"))[0]

    def prepare(self, rgb: np.ndarray) -> torch.Tensor:
        """The worker's half: ``(H, W, 3) uint8 -> [3, H_in, W_in]`` resized and cropped,
        ``uint8`` (SAM2: ``float32`` in ``[0, 1]`` when it had to resize), not normalised."""
        check_rgb(rgb)
        if self.spec.family == "sam2":
            return self._resize_tensor(rgb)
        return self._resize_pil(rgb)

    def geometry(self, height: int, width: int) -> ResizeGeometry:
        """Mapping of an ``height x width`` original image into the model input."""
        new_h, new_w = resized_size(height, width, self.spec)
        out_h, out_w = self.spec.input_size
        return ResizeGeometry(
            scale_x=new_w / width, scale_y=new_h / height,
            offset_x=int(round((new_w - out_w) / 2.0)),
            offset_y=int(round((new_h - out_h) / 2.0)),
            resized_width=new_w, resized_height=new_h)

    def draft_size(self, width: int, height: int) -> tuple[int, int] | None:
        """The ``fast`` path's rule (a :data:`~featcache.datasets.images.DraftRule`): the
        resized ``(width, height)`` when the image is at least :data:`DRAFT_FACTOR` times it on
        both sides, else ``None`` (decode at full size)."""
        geo = self.geometry(height, width)
        if self.window_only(geo):
            return None
        rw, rh = geo.resized_width, geo.resized_height
        if width >= DRAFT_FACTOR * rw and height >= DRAFT_FACTOR * rh:
            return rw, rh
        return None

    def window_only(self, geo: ResizeGeometry) -> bool:
        """True when the resize goes through the crop window only (extreme aspect ratios)."""
        out_h, out_w = self.spec.input_size
        return (self.spec.family != "sam2" and
                geo.resized_height * geo.resized_width > BOX_RESIZE_FACTOR * out_h * out_w)

    def device_arrays(self, rgb: np.ndarray, size: tuple[int, int] | None = None,
                      ) -> dict[str, np.ndarray]:
        """The worker's half of the ``fast`` path: ``pixels`` ``uint8 (3, h, w)`` (``rgb``
        as decoded, maybe DCT-downscaled) and ``geometry`` ``int64 [resized_h, resized_w,
        offset_y, offset_x]`` of the original ``size = (width, height)`` (default: ``rgb``'s),
        for :func:`~featcache.encoders.device_input.device_model_input`. Images resized through
        the crop window get the exact :meth:`prepare` (at input size, identity geometry)."""
        check_rgb(rgb)
        width, height = size or (rgb.shape[1], rgb.shape[0])
        geo = self.geometry(height, width)
        if self.window_only(geo):
            return self.input_arrays(self.prepare(rgb))
        return {"pixels": rgb.transpose(2, 0, 1).copy(),
                "geometry": np.array([geo.resized_height, geo.resized_width, geo.offset_y,
                                      geo.offset_x], np.int64)}

    def input_arrays(self, prepared: torch.Tensor) -> dict[str, np.ndarray]:
        """An exact :meth:`prepare` result as device-path arrays (identity geometry)."""
        out_h, out_w = self.spec.input_size
        return {"pixels": prepared.numpy(),
                "geometry": np.array([out_h, out_w, 0, 0], np.int64)}

    def _resize_pil(self, rgb: np.ndarray) -> torch.Tensor:
        height, width = rgb.shape[:2]
        geo = self.geometry(height, width)
        img = Image.fromarray(np.ascontiguousarray(rgb), mode="RGB")
        out_h, out_w = self.spec.input_size
        resample = _PIL_RESAMPLE[self.spec.interpolation]
        if geo.resized_height * geo.resized_width > BOX_RESIZE_FACTOR * out_h * out_w:
            # resize the crop window only: memory bounded by the input size (within 4 levels)
            box = (geo.offset_x / geo.scale_x, geo.offset_y / geo.scale_y,
                   (geo.offset_x + out_w) / geo.scale_x, (geo.offset_y + out_h) / geo.scale_y)
            img = img.resize((out_w, out_h), resample, box=box)
            return to_uint8_tensor(np.asarray(img))
        if (geo.resized_height, geo.resized_width) != (height, width):
            img = img.resize((geo.resized_width, geo.resized_height), resample)
        if (out_h, out_w) != (geo.resized_height, geo.resized_width):
            img = img.crop((geo.offset_x, geo.offset_y,
                            geo.offset_x + out_w, geo.offset_y + out_h))
        return to_uint8_tensor(np.asarray(img))

    def _resize_tensor(self, rgb: np.ndarray) -> torch.Tensor:
        if tuple(rgb.shape[:2]) == self.spec.input_size:
            return to_uint8_tensor(rgb)
        x = to_tensor(rgb)
        x = torch.nn.functional.interpolate(
            x[None], size=self.spec.input_size, mode=self.spec.interpolation,
            align_corners=False, antialias=True)[0]
        return x


def model_input(x: torch.Tensor, spec: EncoderSpec, device: torch.device) -> torch.Tensor:
    """The device's half: ``[B, 3, H, W]`` from :meth:`Preprocessor.prepare` (``uint8``, or
    ``float32`` in ``[0, 1]``) -> ``float32`` normalised with the spec's mean/std, on
    ``device``. The same float32 operations as torchvision's ``ToTensor`` + ``Normalize``, so
    the same bits."""
    x = x.to(device, non_blocking=True)
    if x.dtype == torch.uint8:
        x = x.to(torch.float32).div_(255)
    elif x.dtype != torch.float32:
        raise ValueError(f"model input must be uint8 or float32, got {x.dtype}")
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


def to_uint8_tensor(rgb: np.ndarray) -> torch.Tensor:
    """``(H, W, 3) uint8 -> [3, H, W] uint8`` (contiguous, owning its memory)."""
    return torch.from_numpy(np.array(rgb, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """``(H, W, 3) uint8 -> [3, H, W] float32`` in ``[0, 1]`` (as torchvision's ``ToTensor``)."""
    x = torch.from_numpy(np.array(rgb, dtype=np.uint8, copy=True))
    return x.permute(2, 0, 1).contiguous().to(torch.float32).div(255)


def check_rgb(rgb: np.ndarray) -> None:
    """Raise ``ValueError`` unless ``rgb`` is a non-empty ``(H, W, 3) uint8`` array."""
    if not isinstance(rgb, np.ndarray):
        raise ValueError(f"expected a numpy array, got {type(rgb).__name__}")
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB array, got shape {rgb.shape}")
    if rgb.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {rgb.dtype}")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"empty image of shape {rgb.shape}")


@dataclass
class FileInput:
    """What a worker makes of one image file (:func:`prepare_file`): ``tensor`` is the exact
    path's ``[3, H_in, W_in]`` input (``None`` on the device paths, whose input is ``arrays``:
    ``pixels`` or ``jpeg`` + ``orientation``, and ``geometry``); ``image`` the decoded image
    (``None`` when the device decodes it), for alpha masks and the like."""

    tensor: torch.Tensor | None
    image: DecodedImage | None
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def prepare_file(file: Path, pre: Preprocessor, to_rgb: Callable[[DecodedImage], np.ndarray],
                 ) -> FileInput:
    """Decode and preprocess one image file along ``pre.path``; ``to_rgb`` turns the decoded
    image into the RGB to encode (e.g. alpha composited over a background). Raises
    :class:`~featcache.datasets.images.ImageDecodeError` for a bad file (``gpu_decode``: a
    JPEG whose bytes the device then fails to decode raises there, in the batch)."""
    if pre.path == "gpu_decode":
        jpeg = read_jpeg(file)
        if jpeg is not None and not pre.window_only(pre.geometry(jpeg.height, jpeg.width)):
            geo = pre.geometry(jpeg.height, jpeg.width)
            return FileInput(None, None, {
                "jpeg": jpeg.data, "orientation": np.array(jpeg.orientation, np.int64),
                "geometry": np.array([geo.resized_height, geo.resized_width, geo.offset_y,
                                      geo.offset_x], np.int64)})
    if pre.path == "fast":
        image = load_image(file, draft=pre.draft_size)
        return FileInput(None, image, pre.device_arrays(to_rgb(image), image.draft_from))
    image = load_image(file)
    prepared = pre.prepare(to_rgb(image))
    if pre.path == "exact":
        return FileInput(prepared, image)
    return FileInput(None, image, pre.input_arrays(prepared))   # gpu_decode, not a plain JPEG
