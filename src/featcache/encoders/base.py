"""The one encoder interface: a typed spec in, a typed result out.

Every model family (open_clip, DINOv2, SAM2) is described by an :class:`EncoderSpec` (model,
weights source and the preprocessing that belongs to those weights, as timm's ``PretrainedCfg``)
and wrapped in an :class:`Encoder` whose ``forward`` maps a batch of preprocessed images
``[B, 3, H, W] float32`` to an :class:`EncoderOutput`:

- ``grid``: ``[B, C, h, w]`` patch tokens of one block (the last unless ``spec.layer`` says
  otherwise), prefix tokens (CLS, registers) split off; row ``i``/column ``j`` of the grid is the
  patch covering input pixels ``[i*p, (i+1)*p) x [j*p, (j+1)*p)`` (y, x) with ``p = patch_size``;
- ``pooled``: ``[B, D]`` the model's own pooled, projected image embedding (CLIP/SigLIP
  ``encode_image``, unnormalised), else ``None``;
- ``levels``: named extra maps, e.g. SAM2 ``{"P4_S16": [B,256,H/16,W/16], "P5_S32": ...}``.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import torch

Family = Literal["open_clip", "dinov2", "sam2"]
ResizeMode = Literal["shortest_crop", "squash"]
Interpolation = Literal["bicubic", "bilinear"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

M = TypeVar("M", bound=torch.nn.Module)


@dataclass(frozen=True, kw_only=True)
class EncoderSpec:
    """Everything that determines an encoder's features except the weights' bytes.

    ``name`` is the open_clip model name (``ViT-B-16``), the HF name (``facebook/dinov2-small``)
    or the SAM2 config (``sam2.1_hiera_t``); ``weights`` is what params said (``random``,
    ``pretrained``, an upstream tag, or a file path). ``input_size`` is ``(H, W)`` of the model
    input; ``resize``/``interpolation``/``mean``/``std`` define :class:`Preprocessor`;
    ``patch_size`` is the stride of ``grid`` in input pixels.
    """

    family: Family
    name: str
    weights: str
    input_size: tuple[int, int]
    resize: ResizeMode
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: Interpolation
    patch_size: int
    layer: int = -1
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (tuples become lists), for provenance and fingerprints."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EncoderSpec:
        """The spec :meth:`to_dict` wrote (a provenance's ``preprocessing``). ``ValueError``
        names the first key that is missing, of the wrong type, or unknown (a spec field this
        version does not know describes preprocessing it cannot redo); ``TypeError`` when
        ``data`` is not a mapping."""
        if not isinstance(data, Mapping):
            raise TypeError(f"encoder spec: expected a mapping, got {type(data).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"encoder spec: unknown key {unknown[0]!r}")
        values = {}
        for name, f in known.items():
            if name not in data:
                if f.default is dataclasses.MISSING:
                    raise ValueError(f"encoder spec: missing key {name!r}")
                continue
            values[name] = _spec_value(name, data[name])
        return cls(**values)

    @property
    def grid_size(self) -> tuple[int, int]:
        """``(h, w)`` of ``EncoderOutput.grid`` for this input size."""
        return self.input_size[0] // self.patch_size, self.input_size[1] // self.patch_size


# EncoderSpec fields: tuples (length, item type), and the Literal types of the named strings
_SPEC_TUPLES = {"input_size": (2, int), "mean": (3, float), "std": (3, float)}
_SPEC_CHOICES = {"family": Family, "resize": ResizeMode, "interpolation": Interpolation}
_SPEC_INTS = ("patch_size", "layer", "seed")


def _spec_value(name: str, value: Any) -> Any:
    """One :class:`EncoderSpec` field read from JSON (lists become tuples), type-checked."""
    def number(v: Any, kind: type) -> bool:
        return isinstance(v, (int, float) if kind is float else int) and not isinstance(v, bool)

    if name in _SPEC_TUPLES:
        n, kind = _SPEC_TUPLES[name]
        if not (isinstance(value, (list, tuple)) and len(value) == n
                and all(number(v, kind) for v in value)):
            raise ValueError(f"encoder spec: key {name!r} is {value!r}, expected {n} "
                             f"{kind.__name__}s")
        return tuple(value)
    if name in _SPEC_CHOICES and value not in typing.get_args(_SPEC_CHOICES[name]):
        raise ValueError(f"encoder spec: key {name!r} is {value!r}, expected one of "
                         f"{list(typing.get_args(_SPEC_CHOICES[name]))}")
    if name in _SPEC_INTS and not number(value, int):
        raise ValueError(f"encoder spec: key {name!r} is {value!r}, expected an int")
    if name in ("name", "weights") and not isinstance(value, str):
        raise ValueError(f"encoder spec: key {name!r} is {value!r}, expected a string")
    return value


@dataclass
class EncoderOutput:
    """Result of one forward pass; every tensor is on the encoder's device, batch first."""

    grid: torch.Tensor | None
    pooled: torch.Tensor | None
    levels: dict[str, torch.Tensor] = field(default_factory=dict)


class Encoder(torch.nn.Module):
    """Base of every family wrapper: holds the spec and the weights identity (what its
    outputs record: :func:`featcache.provenance.encoder_facts`).

    Subclasses implement :meth:`forward` and set :attr:`notes` (what the features are, in
    words) and :attr:`upstream` (the upstream package that defines the model).
    """

    notes: str = ""
    upstream: str = ""

    def __init__(self, spec: EncoderSpec, weights_id: str) -> None:
        super().__init__()
        self.spec = spec
        self.weights_id = weights_id

    def forward(self, x: torch.Tensor) -> EncoderOutput:  # pragma: no cover - abstract
        raise NotImplementedError


def finish_module(module: M, device: torch.device | str) -> M:
    """Move to ``device`` in float32, eval mode, no gradients (the encoders only infer)."""
    module = module.to(device=device, dtype=torch.float32).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def tokens_to_grid(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[B, h*w, C]`` row-major patch tokens -> ``[B, C, h, w]`` (contiguous)."""
    b, n, c = tokens.shape
    if n != height * width:
        raise ValueError(f"{n} tokens do not form a {height}x{width} grid")
    return tokens.reshape(b, height, width, c).permute(0, 3, 1, 2).contiguous()
