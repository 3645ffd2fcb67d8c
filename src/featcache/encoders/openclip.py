"""open_clip image towers (CLIP ViTs, SigLIP via timm, any open_clip model name).

One forward pass gives both outputs, through the tower's own ``forward_intermediates``:

- ``pooled`` ``[B, D]``: exactly ``model.encode_image(x)`` (unnormalised; D = ``embed_dim``,
  512 for ViT-B-16, 768 for ViT-B-16-SigLIP);
- ``grid`` ``[B, width, h, w]``: the tokens of block ``spec.layer`` (the last by default) after
  the tower's final norm (``ln_post`` for open_clip ViTs, ``trunk.norm`` for timm towers), prefix
  tokens (CLS, registers) removed. The tokens are NOT passed through ``proj``, so the width is the
  transformer width (768 for ViT-B-16, 1024 for ViT-L-14), not ``embed_dim``. For CNN towers
  (RN50, ConvNeXt) it is the last stage's feature map (stride 32). Pooling the grid (e.g. to
  7x7) is the stage's business.

Preprocessing is the one open_clip attaches to the weights' tag (``mean``/``std``,
``interpolation``, ``resize_mode``: ``shortest`` -> ``shortest_crop``, ``squash``); with
``weights: random`` or a file path it is the one of the model's default tag, so switching
between random and pretrained weights changes nothing but the weights.

Tiny models for tests (random weights, no network), registered on first use:
``featcache-tiny-vit`` (open_clip ViT, 2 blocks, width 64, patch 16, 224 -> 14x14 grid, pooled
32) and ``featcache-tiny-siglip`` (timm ``test_vit3``: no CLS, 1 register token, attention-pool
head, width 96, patch 16, 160 -> 10x10 grid, pooled 96, SigLIP preprocessing).

open_clip is imported inside the functions that need it: a stage of another family never
loads it (each family's library is needed on that family's path only).
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from featcache.config import ParamError
from featcache.encoders import weights as W
from featcache.encoders.base import Encoder, EncoderOutput, EncoderSpec, finish_module

log = logging.getLogger(__name__)

TINY_CONFIG_DIR = Path(__file__).parent / "tiny_configs"
TINY_VIT = "featcache-tiny-vit"
TINY_SIGLIP = "featcache-tiny-siglip"
_TINY_PREPROCESS = {TINY_SIGLIP: dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                                      interpolation="bicubic", resize_mode="squash")}
_TIMM_TEST_PATCH = {"test_vit": 16, "test_vit2": 16, "test_vit3": 16, "test_vit4": 16}
_JIT_EXTRAS = ("input_resolution", "context_length", "vocab_size", "attn_mask")
_CHECKPOINT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                     "open_clip_pytorch_model.bin")


def register_tiny_models() -> None:
    """Make ``featcache-tiny-vit`` and ``featcache-tiny-siglip`` known to open_clip
    (idempotent; called by :func:`resolve_openclip_spec` and :func:`load_openclip`)."""
    import open_clip

    if TINY_VIT not in open_clip.list_models():
        open_clip.add_model_config(TINY_CONFIG_DIR)


def model_config(name: str, key: str = "model") -> dict[str, Any]:
    """open_clip's architecture config of ``name``; unknown -> ParamError with close matches."""
    import open_clip

    register_tiny_models()
    cfg = open_clip.get_model_config(name) if ":" not in name else None
    if cfg is None:
        close = difflib.get_close_matches(name, open_clip.list_models(), n=5, cutoff=0.5)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise ParamError(f"{key}: unknown open_clip model {name!r}{hint} "
                         f"(open_clip.list_models() lists all)")
    return cfg


def default_tag(name: str) -> str | None:
    """open_clip's default pretrained tag for ``name`` (its first listed), or None."""
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(name)
    return tags[0] if tags else None


def resolve_tag(name: str, weights: str, key: str = "weights") -> str | None:
    """The pretrained tag ``weights`` stands for (None for random or a file path)."""
    import open_clip

    if W.is_random(weights) or W.looks_like_path(weights):
        return None
    tag = default_tag(name) if weights == W.PRETRAINED else weights
    if tag is None:
        raise ParamError(f"{key}: open_clip has no pretrained weights for {name!r}; "
                         f"use random or a checkpoint path")
    if not open_clip.get_pretrained_cfg(name, tag):
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        raise ParamError(f"{key}: {weights!r} is neither a file nor an open_clip tag of "
                         f"{name!r}; its tags: {tags}")
    return tag


def preprocess_cfg(name: str, tag: str | None) -> dict[str, Any]:
    """mean/std/interpolation/resize_mode open_clip uses with ``tag`` (default tag if None)."""
    import open_clip
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    if name in _TINY_PREPROCESS:
        return dict(_TINY_PREPROCESS[name])
    tag = tag or default_tag(name)
    pcfg = open_clip.get_pretrained_cfg(name, tag) if tag else {}
    return merge_preprocess_dict(PreprocessCfg(), pcfg)


def patch_size(vision_cfg: dict[str, Any]) -> int:
    """Stride of the grid in input pixels (32 for CNN towers)."""
    if vision_cfg.get("patch_size"):
        return int(vision_cfg["patch_size"])
    timm_name = vision_cfg.get("timm_model_name", "")
    m = re.search(r"patch(\d+)", timm_name)
    if m:
        return int(m.group(1))
    return _TIMM_TEST_PATCH.get(timm_name, 32)


def resolve_openclip_spec(name: str, *, weights: str, seed: int = 0,
                          image_size: int | None = None, resize: str | None = None,
                          key: str = "model") -> EncoderSpec:
    """Spec of an open_clip image tower, without building it."""
    cfg = model_config(name, key)
    if W.looks_like_path(weights) and not Path(weights).expanduser().exists():
        raise ParamError(f"weights: checkpoint file not found: {weights}")
    pcfg = preprocess_cfg(name, resolve_tag(name, weights))
    size = image_size or cfg["vision_cfg"].get("image_size", 224)
    hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return EncoderSpec(
        family="open_clip", name=name, weights=weights, input_size=hw,
        resize=resize or ("squash" if pcfg["resize_mode"] == "squash" else "shortest_crop"),
        mean=tuple(float(v) for v in pcfg["mean"]), std=tuple(float(v) for v in pcfg["std"]),
        interpolation="bilinear" if pcfg["interpolation"] == "bilinear" else "bicubic",
        patch_size=patch_size(cfg["vision_cfg"]), seed=seed)


class OpenClipEncoder(Encoder):
    """open_clip image tower; see the module docstring for what ``grid``/``pooled`` are."""

    upstream = "open_clip_torch"
    notes = ("pooled = model.encode_image(x), unnormalised; grid = patch tokens of the chosen "
             "block after the tower's final norm (ln_post / trunk.norm), NOT projected by proj, "
             "prefix tokens removed")

    def __init__(self, spec: EncoderSpec, weights_id: str, visual: torch.nn.Module) -> None:
        super().__init__(spec, weights_id)
        self.visual = visual

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        """``x [B,3,H,W] float32`` -> grid ``[B, width, H/p, W/p]``, pooled ``[B, D]``."""
        out = self.visual.forward_intermediates(
            x, indices=[self.spec.layer], normalize_intermediates=True, output_fmt="NCHW")
        return EncoderOutput(grid=out["image_intermediates"][0], pooled=out["image_features"])


def load_openclip(spec: EncoderSpec, device: torch.device | str = "cpu") -> OpenClipEncoder:
    """Locate the weights (fails before building anything), build the model once, load them,
    keep the image tower only (see :mod:`.weights`)."""
    import open_clip

    register_tiny_models()
    tag = resolve_tag(spec.name, spec.weights)
    tag_cfg = open_clip.get_pretrained_cfg(spec.name, tag) if tag else {}
    path = None
    if W.is_random(spec.weights):
        W.warn_random(f"open_clip {spec.name}", spec.seed)
        weights_id = W.random_weights_id(spec.seed)
    elif tag is None:
        path = Path(spec.weights).expanduser()
        weights_id = W.sha256_path(path)
    else:
        path, weights_id = locate_openclip(spec.name, tag, tag_cfg), tag
    W.seed_everything(spec.seed)
    with _quiet_random_init_warning():
        model = open_clip.create_model(
            spec.name, pretrained=None, force_image_size=_forced_size(spec),
            force_quick_gelu=uses_quick_gelu(spec, tag_cfg, path))
    if path is not None:
        load_checkpoint(model, path)
    visual = model.visual
    del model  # the text tower is not needed
    return finish_module(OpenClipEncoder(spec, weights_id, visual), device)


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextlib.contextmanager
def _quiet_random_init_warning() -> Iterator[None]:
    """open_clip warns on the root logger that the model is random before we load weights
    into it; the warning that matters (random weights) is ours."""
    root, drop = logging.getLogger(), _DropRandomInitWarning()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def load_checkpoint(model: torch.nn.Module, path: Path) -> None:
    """Load a checkpoint into a full open_clip model (strict). open_clip's own loader handles
    state dicts (``.bin``/``.pt`` with ``weights_only=True``, ``.safetensors``, big_vision
    ``.npz``); OpenAI's TorchScript ``.pt`` archives are read by :func:`W.load_state_dict_file`."""
    import open_clip
    from open_clip.model import resize_pos_embed

    if not W.is_torchscript_archive(path):
        open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
        return
    state = {k: v for k, v in W.load_state_dict_file(path).items() if k not in _JIT_EXTRAS}
    resize_pos_embed(state, model)
    model.load_state_dict(state, strict=True)


def uses_quick_gelu(spec: EncoderSpec, tag_cfg: dict[str, Any], path: Path | None) -> bool:
    """Whether the tower is built with QuickGELU, as the weights require: a tag says so in its
    config (OpenAI's weights need it); random weights follow the default tag, so the random
    architecture is the pretrained one; an OpenAI TorchScript archive always needs it. A plain
    state-dict file cannot tell: name the model ``<name>-quickgelu`` for OpenAI-trained weights."""
    import open_clip

    if tag_cfg:
        return bool(tag_cfg.get("quick_gelu", False))
    if W.is_random(spec.weights):
        tag = default_tag(spec.name)
        return bool(tag and open_clip.get_pretrained_cfg(spec.name, tag).get("quick_gelu"))
    return path is not None and W.is_torchscript_archive(path)


def _forced_size(spec: EncoderSpec) -> tuple[int, int] | int | None:
    size = model_config(spec.name)["vision_cfg"].get("image_size", 224)
    default = (size, size) if isinstance(size, int) else tuple(size)
    return None if tuple(default) == spec.input_size else spec.input_size


def local_weight_files(name: str, tag: str, tag_cfg: dict[str, Any]) -> list[Path]:
    """Where ``data/weights`` may hold the checkpoint of ``name``/``tag``, in order:
    ``<model>/<tag>/<file>``; ``<model>/<file>`` for the default tag; the HF repo's path
    (``timm/ViT-B-16-SigLIP/open_clip_model.safetensors``); the URL's file name
    (``ViT-B-16.pt`` for OpenAI's tags). ``<file>`` is one of open_clip's checkpoint names."""
    root = W.weights_dir()
    folders = [root / name / tag] + ([root / name] if tag == default_tag(name) else [])
    files = [folder / f for folder in folders for f in _CHECKPOINT_NAMES]
    repo, filename = _hf_location(tag_cfg)
    if repo:
        files += [root / repo / f for f in _hf_candidates(filename)]
    if tag_cfg.get("url"):
        files.append(root / Path(tag_cfg["url"]).name)
    return files


def locate_openclip(name: str, tag: str, tag_cfg: dict[str, Any]) -> Path:
    """Checkpoint file of an open_clip tag: data/weights, HF/URL cache, then download."""
    repo, filename = _hf_location(tag_cfg)
    url = tag_cfg.get("url", "")

    def cached() -> Path | None:
        if repo:
            for f in _hf_candidates(filename):
                if (found := W.hf_cached_file(repo, f)) is not None:
                    return found
        url_file = Path("~/.cache/clip").expanduser() / Path(url).name if url else None
        return url_file if url_file is not None and url_file.is_file() else None

    def download() -> Path:
        if not repo:
            return W.url_download(url)
        *safer, last = _hf_candidates(filename)
        for f in safer:
            try:
                return W.hf_download(repo, f)
            except Exception as e:  # the repo may only hold the .bin
                log.debug("no %s in %s: %s", f, repo, e)
        return W.hf_download(repo, last)

    how = (f"Put {_CHECKPOINT_NAMES[0]} or {_CHECKPOINT_NAMES[2]} in "
           f"{W.weights_dir() / name / tag}/ or set weights: checkpoints/<file> "
           "(your own checkpoint)")
    return W.locate_weights(f"open_clip {name} (tag {tag})",
                            local_weight_files(name, tag, tag_cfg),
                            cached, download, how)


def _hf_location(tag_cfg: dict[str, Any]) -> tuple[str, str]:
    hub = tag_cfg.get("hf_hub", "")
    if not hub:
        return "", ""
    repo, filename = hub.rstrip("/"), _CHECKPOINT_NAMES[2]
    if not hub.endswith("/"):
        repo, filename = hub.rsplit("/", 1)
    return repo, filename


def _hf_candidates(filename: str) -> list[str]:
    """open_clip prefers the safetensors twin of a ``.bin`` file."""
    if filename == _CHECKPOINT_NAMES[2]:
        return [_CHECKPOINT_NAMES[0], filename]
    return [filename[:-4] + ".safetensors", filename] if filename.endswith((".bin", ".pth")) \
        else [filename]
