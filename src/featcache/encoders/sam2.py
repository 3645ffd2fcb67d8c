"""SAM2 / SAM2.1 image encoder (the ``sam2`` package's Hiera trunk + FPN neck).

The encoder is built from the package's own YAML config (``configs/sam2.1/sam2.1_hiera_t.yaml``)
with ``scalp=0``, so ``backbone_fpn`` keeps all four levels (the official configs set
``scalp: 1``, which drops the stride-32 level; the stride-16 level is identical either way
because the FPN's top-down path still runs from stride 32). For a 1024 input:

- ``levels["P4_S16"] = backbone_fpn[2]`` ``[B, 256, 64, 64]``;
- ``levels["P5_S32"] = backbone_fpn[3]`` ``[B, 256, 32, 32]``;
- ``grid`` and ``pooled`` are None.

These are the raw ``backbone_fpn`` levels: SAM2's predictor further applies ``conv_s0``/``conv_s1``
(to the stride-4/8 levels) and adds ``no_mem_embed``; the cache does not.

Only the image encoder is instantiated (``hydra.utils.instantiate`` on the YAML's
``model.image_encoder`` node, loaded with OmegaConf): no ``compose``, so it works from any
working directory and never touches the global Hydra state. (Importing the ``sam2`` package
initialises Hydra's global config module itself, if nothing did; that is sam2's behaviour,
left as sam2 expects it.)

Preprocessing is ``SAM2Transforms``': squash to ``size x size`` (1024 by default, any multiple of
32) with a bilinear antialiased tensor resize, ImageNet mean/std.

hydra and omegaconf (the sam2 package's config machinery) are imported where the encoder is
built: a stage of another family never loads them.
"""

from __future__ import annotations

import difflib
import logging
import re
from importlib import resources
from pathlib import Path

import torch

from featcache.config import ParamError
from featcache.encoders import weights as W
from featcache.encoders.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Encoder,
    EncoderOutput,
    EncoderSpec,
    finish_module,
)

log = logging.getLogger(__name__)

_SIZES = {"t": "tiny", "s": "small", "b+": "base_plus", "l": "large"}
CONFIGS = tuple(f"{v}_hiera_{s}" for v in ("sam2.1", "sam2") for s in _SIZES)
LEVELS = {"P4_S16": 2, "P5_S32": 3}
DEFAULT_SIZE = 1024


def checkpoint_name(config: str) -> str:
    """Official checkpoint file of a config: ``sam2.1_hiera_t`` -> ``sam2.1_hiera_tiny.pt``."""
    version, size = config.split("_hiera_")
    return f"{version}_hiera_{_SIZES[size]}.pt"


def hf_repo(config: str) -> str:
    """HF repo of the official checkpoint: ``sam2.1_hiera_b+`` -> ``facebook/sam2.1-hiera-base-plus``."""
    version, size = config.split("_hiera_")
    return f"facebook/{version}-hiera-{_SIZES[size].replace('_', '-')}"


def config_path(config: str) -> Path:
    """The YAML shipped in the sam2 package for ``config``."""

    version = re.match(r"sam2(\.1)?", config).group(0)
    return Path(str(resources.files("sam2") / "configs" / version / f"{config}.yaml"))


def resolve_sam2_spec(name: str, *, weights: str, seed: int = 0, image_size: int | None = None,
                      resize: str | None = None, key: str = "config") -> EncoderSpec:
    """Spec of a SAM2 image encoder, without building it."""
    if name not in CONFIGS:
        close = difflib.get_close_matches(name, CONFIGS, n=4, cutoff=0.5)
        raise ParamError(f"{key}: unknown SAM2 config {name!r}; known: "
                         f"{', '.join(close or CONFIGS)}")
    size = image_size or DEFAULT_SIZE
    if size % 32 or size < 64:
        raise ParamError(f"size: SAM2 input size must be a multiple of 32 and >= 64, got {size}")
    if resize not in (None, "squash"):
        raise ParamError(f"resize: SAM2 only supports squash (as SAM2Transforms), got {resize}")
    if W.looks_like_path(weights) and not Path(weights).expanduser().is_file():
        raise ParamError(f"weights: checkpoint file not found: {weights}")
    if not (W.is_random(weights) or weights == W.PRETRAINED or W.looks_like_path(weights)):
        raise ParamError(f"weights: SAM2 takes random, pretrained or a checkpoint path, "
                         f"got {weights!r}")
    return EncoderSpec(family="sam2", name=name, weights=weights, input_size=(size, size),
                       resize="squash", mean=IMAGENET_MEAN, std=IMAGENET_STD,
                       interpolation="bilinear", patch_size=16, seed=seed)


def build_image_encoder(config: str, scalp: int = 0) -> torch.nn.Module:
    """Instantiate the ``model.image_encoder`` node of ``config`` with ``scalp`` (random init
    from the current torch RNG state)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(config_path(config))
    node = cfg.model.image_encoder
    node.scalp = scalp
    return instantiate(node, _recursive_=True)


class Sam2Encoder(Encoder):
    """SAM2 image encoder returning the raw stride-16 and stride-32 FPN levels."""

    upstream = "sam2"
    notes = ("levels = raw image_encoder backbone_fpn levels (built with scalp=0): "
             "P4_S16 = backbone_fpn[2], P5_S32 = backbone_fpn[3]; SAM2's conv_s0/conv_s1 "
             "and no_mem_embed are NOT applied")

    def __init__(self, spec: EncoderSpec, weights_id: str, image_encoder: torch.nn.Module) -> None:
        super().__init__(spec, weights_id)
        self.image_encoder = image_encoder

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        """``x [B,3,S,S] float32`` -> levels ``P4_S16 [B,256,S/16,S/16]``,
        ``P5_S32 [B,256,S/32,S/32]``."""
        fpn = self.image_encoder(x)["backbone_fpn"]
        return EncoderOutput(grid=None, pooled=None,
                             levels={k: fpn[i] for k, i in LEVELS.items()})


def load_sam2(spec: EncoderSpec, device: torch.device | str = "cpu") -> Sam2Encoder:
    """Build the image encoder once: seeded random init, the official checkpoint, or a file in
    the official ``{"model": state_dict}`` format (only ``image_encoder.*`` keys are used)."""
    path = None
    if W.is_random(spec.weights):
        W.warn_random(f"SAM2 {spec.name}", spec.seed)
        weights_id = W.random_weights_id(spec.seed)
    elif spec.weights == W.PRETRAINED:
        path = locate_sam2(spec.name)   # before building: a missing file fails fast
        weights_id = checkpoint_name(spec.name)
    else:
        path = Path(spec.weights).expanduser()
        weights_id = W.sha256_path(path)
    W.seed_everything(spec.seed)
    encoder = build_image_encoder(spec.name, scalp=0)
    if path is not None:
        load_image_encoder_weights(encoder, path)
    return finish_module(Sam2Encoder(spec, weights_id, encoder), device)


def load_image_encoder_weights(encoder: torch.nn.Module, path: Path) -> None:
    """Load the ``image_encoder.*`` tensors of a SAM2 checkpoint into ``encoder`` (strict)."""
    state = W.load_state_dict_file(path)
    state = state.get("model", state) if isinstance(state, dict) else state
    prefix = "image_encoder."
    own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not own:
        raise ParamError(f"weights: {path} is not a SAM2 checkpoint (no image_encoder.* "
                         f"tensors under 'model')")
    missing, unexpected = encoder.load_state_dict(own, strict=False)
    if missing or unexpected:
        raise ParamError(f"weights: {path} does not match this config: missing "
                         f"{list(missing)[:5]}, unexpected {list(unexpected)[:5]}")


def local_weight_files(config: str) -> list[Path]:
    """``data/weights/<file>`` and ``data/weights/<config>/<file>``."""
    name = checkpoint_name(config)
    return [W.weights_dir() / name, W.weights_dir() / config / name]


def locate_sam2(config: str) -> Path:
    """The official checkpoint: data/weights, the HF hub cache, then a download."""
    repo, name = hf_repo(config), checkpoint_name(config)
    how = f"Put {name} in {W.weights_dir()}/ or set weights: checkpoints/{name} (your own copy)"
    return W.locate_weights(f"SAM2 {config} ({name})", local_weight_files(config),
                            lambda: W.hf_cached_file(repo, name),
                            lambda: W.hf_download(repo, name), how)
