"""DINOv2 encoder: explicit preprocessing, grid equals transformers' own Dinov2Model forward,
save_pretrained / state-dict loading through the path route (tiny config, random weights)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from encoder_fixtures import real_looking_image
from PIL import Image

from featcache.config import ParamError
from featcache.encoders import TINY_DINOV2, Preprocessor, load_encoder, resolve_spec
from featcache.encoders.base import IMAGENET_MEAN, IMAGENET_STD
from featcache.encoders.dinov2 import CONFIGS, build_config
from featcache.encoders.weights import sha256_path


def upstream(seed: int) -> torch.nn.Module:
    from transformers import Dinov2Model

    torch.manual_seed(seed)
    return Dinov2Model(build_config(TINY_DINOV2)).eval()


def torchvision_transform(size: int, squash: bool):
    from torchvision import transforms as T

    resize = [T.Resize((size, size), T.InterpolationMode.BICUBIC)] if squash else \
        [T.Resize(size, T.InterpolationMode.BICUBIC), T.CenterCrop(size)]
    return T.Compose([*resize, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


@pytest.mark.parametrize("resize", ["shortest_crop", "squash"])
@pytest.mark.parametrize("hw", [(240, 320), (400, 210)])
def test_preprocessing_equals_explicit_torchvision(resize, hw):
    spec = resolve_spec("dinov2", "facebook/dinov2-small", weights="random", image_size=224,
                        resize=None if resize == "shortest_crop" else resize)
    assert spec.resize == resize and spec.input_size == (224, 224)
    rgb = real_looking_image(*hw)
    ours = Preprocessor(spec)(rgb)
    theirs = torchvision_transform(224, resize == "squash")(Image.fromarray(rgb))
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert ours.shape == theirs.shape == (3, 224, 224)
    assert float(((ours - theirs) * std).abs().max()) <= 1 / 255


def test_no_hidden_256_resize_224_crop():
    """The HF processor's default (short side 256, centre crop 224) must not be what we do."""
    spec = resolve_spec("dinov2", "facebook/dinov2-small", weights="random", image_size=224)
    rgb = real_looking_image(240, 320)
    hidden = torchvision_transform(256, False)(Image.fromarray(rgb))[:, 16:240, 16:240]
    assert float((Preprocessor(spec)(rgb) - hidden).abs().max()) > 0.1


def reference_grid(model: torch.nn.Module, x: torch.Tensor, prefix: int = 1) -> torch.Tensor:
    tokens = model(pixel_values=x).last_hidden_state[:, prefix:]
    g = x.shape[2] // 14
    return tokens.reshape(x.shape[0], g, g, -1).permute(0, 3, 1, 2)


@pytest.mark.parametrize("size", [224, 126])
def test_grid_equals_dinov2model_through_save_pretrained(tmp_path, size):
    model = upstream(seed=7)
    model.save_pretrained(tmp_path / "ckpt")
    spec = resolve_spec("dinov2", TINY_DINOV2, weights=str(tmp_path / "ckpt"), image_size=size,
                        seed=3)
    enc = load_encoder(spec)
    x = torch.stack([Preprocessor(spec)(real_looking_image(230, 300, seed=s)) for s in (0, 1)])
    with torch.inference_mode():
        out, ref = enc(x), reference_grid(model, x)
    g = size // 14
    assert out.grid.shape == (2, 32, g, g) and out.pooled is None
    assert (out.grid - ref).abs().max() <= 1e-5
    assert enc.weights_id == sha256_path(tmp_path / "ckpt")
    assert enc.weights_id.startswith("sha256:")


def test_state_dict_file_route(tmp_path):
    model = upstream(seed=9)
    torch.save(model.state_dict(), tmp_path / "dino.pt")
    spec = resolve_spec("dinov2", TINY_DINOV2, weights=str(tmp_path / "dino.pt"))
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        assert (load_encoder(spec)(x).grid - reference_grid(model, x)).abs().max() <= 1e-5


def test_random_is_seeded_and_layer_option():
    x = torch.randn(1, 3, 112, 112)
    spec = resolve_spec("dinov2", TINY_DINOV2, weights="random", image_size=112, seed=4)
    enc = load_encoder(spec)
    first = load_encoder(dataclasses.replace(spec, layer=0))
    with torch.inference_mode():
        last = enc(x).grid
        again = load_encoder(spec)(x).grid
        block0 = first(x).grid
        hidden = first.model(pixel_values=x, output_hidden_states=True).hidden_states
        ref0 = first.model.layernorm(hidden[1])[:, 1:].reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
    assert torch.equal(last, again) and enc.weights_id == "random(seed=4)"
    assert (block0 - ref0).abs().max() <= 1e-6
    assert (block0 - last).abs().max() > 1e-3


def test_register_tokens_are_split_off():
    """with-registers models carry CLS + 4 registers before the patch tokens."""
    spec = resolve_spec("dinov2", "facebook/dinov2-with-registers-small", weights="random",
                        image_size=56)
    enc = load_encoder(spec)
    x = torch.randn(1, 3, 56, 56)
    with torch.inference_mode():
        out = enc(x)
        ref = reference_grid(enc.model, x, prefix=5)
    assert enc.num_prefix == 5 and out.grid.shape == (1, 384, 4, 4)
    assert torch.equal(out.grid, ref)


def test_named_configs_match_official_sizes():
    expected = {"small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16),
                "giant": (1536, 40, 24)}
    for size, (hidden, layers, heads) in expected.items():
        cfg = build_config(f"facebook/dinov2-{size}")
        assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == \
            (hidden, layers, heads)
        assert cfg.patch_size == 14 and cfg.image_size == 518
    assert build_config("facebook/dinov2-giant").use_swiglu_ffn
    assert len(CONFIGS) == 9


def test_bad_params():
    with pytest.raises(ParamError, match=r"^model: .*facebook/dinov2-small"):
        resolve_spec("dinov2", "facebook/dinov2-smal", weights="random")
    with pytest.raises(ParamError, match=r"^size: .*multiple of 14"):
        resolve_spec("dinov2", "facebook/dinov2-small", weights="random", image_size=225)
    with pytest.raises(ParamError, match=r"^resize: "):
        resolve_spec("dinov2", "facebook/dinov2-small", weights="random", resize="longest")
    with pytest.raises(ParamError, match=r"^weights: .*not found"):
        resolve_spec("dinov2", "facebook/dinov2-small", weights="./nowhere/dino")
