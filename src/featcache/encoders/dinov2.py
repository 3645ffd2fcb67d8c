"""DINOv2 (transformers ``Dinov2Model`` / ``Dinov2WithRegistersModel``).

``grid`` ``[B, hidden, g, g]`` with ``g = size / 14`` is ``last_hidden_state[:, 1 + R:]`` (after
the model's final layernorm; CLS and the R register tokens split off); for ``spec.layer != -1``
the output of that block (0-based, negative from the end) through the same final layernorm.
``pooled`` is None.

Preprocessing is explicit, never the HF processor's hidden resize-256/crop-224: the short side is
resized to ``size`` (bicubic) and the centre ``size x size`` cut out (``shortest_crop``, the same
geometry as the CLIP grids so the two caches align), or the image is squashed to ``size x size``
when ``resize: squash`` is asked for; ImageNet mean/std. Any ``size`` that is a multiple of 14
works (the model interpolates its 37x37 position embeddings, made for 518).

Architectures are hard-coded (no hub access for ``weights: random``):
``facebook/dinov2-{small,base,large,giant}``, the ``facebook/dinov2-with-registers-*`` variants
(4 registers), and ``featcache/dinov2-tiny`` (2 blocks, hidden 32) for tests.

transformers is imported inside the functions that need it: a stage of another family never
loads it (each family's library is needed on that family's path only).
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import Any

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
    tokens_to_grid,
)

log = logging.getLogger(__name__)

PATCH = 14
TINY_DINOV2 = "featcache/dinov2-tiny"
_SIZES: dict[str, dict[str, Any]] = {
    "small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16),
    "giant": dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24,
                  use_swiglu_ffn=True),
}
_COMMON = dict(mlp_ratio=4, patch_size=PATCH, image_size=518, layerscale_value=1.0,
               layer_norm_eps=1e-6)
CONFIGS: dict[str, dict[str, Any]] = {
    **{f"facebook/dinov2-{k}": dict(_COMMON, **v) for k, v in _SIZES.items()},
    **{f"facebook/dinov2-with-registers-{k}": dict(_COMMON, num_register_tokens=4, **v)
       for k, v in _SIZES.items()},
    TINY_DINOV2: dict(_COMMON, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      mlp_ratio=2),
}
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def build_config(name: str) -> Any:
    """A ``Dinov2Config`` (or ``Dinov2WithRegistersConfig``) for a known name."""
    from transformers import Dinov2Config, Dinov2WithRegistersConfig

    kwargs = dict(CONFIGS[name])
    cls = Dinov2WithRegistersConfig if "num_register_tokens" in kwargs else Dinov2Config
    return cls(**kwargs)


def resolve_dinov2_spec(name: str, *, weights: str, seed: int = 0, image_size: int | None = None,
                        resize: str | None = None, key: str = "model") -> EncoderSpec:
    """Spec of a DINOv2 model at ``image_size`` (default 224), without building it."""
    if name not in CONFIGS:
        close = difflib.get_close_matches(name, list(CONFIGS), n=4, cutoff=0.4)
        raise ParamError(f"{key}: unknown DINOv2 model {name!r}; known: "
                         f"{', '.join(close or CONFIGS)}")
    size = image_size or 224
    if size % PATCH or size <= 0:
        raise ParamError(f"size: must be a positive multiple of {PATCH}, got {size}")
    if W.looks_like_path(weights) and not Path(weights).expanduser().exists():
        raise ParamError(f"weights: checkpoint not found: {weights}")
    if not (W.is_random(weights) or weights == W.PRETRAINED or W.looks_like_path(weights)
            or weights.count("/") == 1):
        raise ParamError(f"weights: DINOv2 takes random, pretrained, an HF repo id "
                         f"(org/name) or a path, got {weights!r}")
    return EncoderSpec(family="dinov2", name=name, weights=weights, input_size=(size, size),
                       resize=resize or "shortest_crop", mean=IMAGENET_MEAN, std=IMAGENET_STD,
                       interpolation="bicubic", patch_size=PATCH, seed=seed)


class Dinov2Encoder(Encoder):
    """Patch tokens of a DINOv2 model as a grid; see the module docstring."""

    upstream = "transformers"
    notes = ("grid = last_hidden_state[:, 1 + num_register_tokens:] (after the final layernorm), "
             "reshaped to [B, hidden, H/14, W/14]; no pooled output")

    def __init__(self, spec: EncoderSpec, weights_id: str, model: torch.nn.Module) -> None:
        super().__init__(spec, weights_id)
        self.model = model
        self.num_prefix = 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        """``x [B,3,H,W] float32`` (H, W multiples of 14) -> grid ``[B, hidden, H/14, W/14]``."""
        last = self.spec.layer == -1
        out = self.model(pixel_values=x, output_hidden_states=not last)
        # hidden_states[0] is the embedding output, so block i is hidden_states[i + 1]
        index = self.spec.layer + 1 if self.spec.layer >= 0 else self.spec.layer
        tokens = out.last_hidden_state if last else self.model.layernorm(
            out.hidden_states[index])
        h, w = x.shape[2] // PATCH, x.shape[3] // PATCH
        return EncoderOutput(grid=tokens_to_grid(tokens[:, self.num_prefix:], h, w), pooled=None)


def load_dinov2(spec: EncoderSpec, device: torch.device | str = "cpu") -> Dinov2Encoder:
    """Build the model once: random (seeded), an HF repo (``pretrained`` = ``spec.name``),
    or a path (a ``save_pretrained`` folder, or a state-dict file for the named config)."""
    if W.is_random(spec.weights):
        model, weights_id = _random_model(spec), W.random_weights_id(spec.seed)
    elif W.looks_like_path(spec.weights):
        path = Path(spec.weights).expanduser()
        model, weights_id = _model_from_path(spec, path), W.sha256_path(path)
    else:
        repo = spec.name if spec.weights == W.PRETRAINED else spec.weights
        model, weights_id = _from_pretrained(locate_dinov2(repo)), repo
    _check_config(spec, model.config)
    return finish_module(Dinov2Encoder(spec, weights_id, model), device)


def _model_class(config: Any) -> type:
    from transformers import Dinov2Model, Dinov2WithRegistersModel

    return Dinov2WithRegistersModel if hasattr(config, "num_register_tokens") else Dinov2Model


def _random_model(spec: EncoderSpec) -> torch.nn.Module:
    W.warn_random(f"DINOv2 {spec.name}", spec.seed)
    W.seed_everything(spec.seed)
    config = build_config(spec.name)
    return _model_class(config)(config)


def _from_pretrained(folder: Path) -> torch.nn.Module:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    return _model_class(config).from_pretrained(folder, local_files_only=True,
                                                dtype=torch.float32)


def _model_from_path(spec: EncoderSpec, path: Path) -> torch.nn.Module:
    if path.is_dir():
        return _from_pretrained(path)
    config = build_config(spec.name)
    model = _model_class(config)(config)
    state = W.load_state_dict_file(path)
    model.load_state_dict(state, strict=True)
    return model


def _check_config(spec: EncoderSpec, config: Any) -> None:
    patch = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
    if patch != spec.patch_size:
        raise ParamError(f"weights: checkpoint has patch size {patch}, expected {spec.patch_size}")


def local_weight_dirs(repo: str) -> list[Path]:
    """``data/weights/<org>/<name>/`` (a ``save_pretrained`` folder: config.json + weights)."""
    return [W.weights_dir() / repo]


def locate_dinov2(repo: str) -> Path:
    """Folder holding ``config.json`` and the weights of an HF repo: data/weights, the HF hub
    cache, then a download of those two files."""
    def cached() -> Path | None:
        config = W.hf_cached_file(repo, "config.json")
        if config is None or not any((config.parent / f).is_file() for f in _WEIGHT_FILES):
            return None
        return config

    def download() -> Path:
        config = W.hf_download(repo, "config.json")
        W.hf_download(repo, _WEIGHT_FILES[0])
        return config

    folder = local_weight_dirs(repo)[0]
    how = (f"Put config.json and {_WEIGHT_FILES[0]} (save_pretrained output) in {folder}/ "
           f"or set weights: checkpoints/<folder> (your own save_pretrained folder)")
    config = W.locate_weights(f"DINOv2 {repo}", [d / "config.json" for d in local_weight_dirs(repo)],
                              cached, download, how)
    return config.parent
