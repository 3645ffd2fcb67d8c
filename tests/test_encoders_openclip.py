"""open_clip encoder: preprocessing, pooled and grid equal open_clip's own forward (tiny models,
random weights, CPU), checkpoint loading through the path route."""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest
import torch
from encoder_fixtures import real_looking_image
from PIL import Image

from featcache.config import ParamError
from featcache.encoders import (TINY_OPENCLIP, TINY_SIGLIP, Preprocessor, load_encoder,
                                register_tiny_models, resolve_spec)
from featcache.encoders.weights import sha256_path
from featcache.provenance import encoder_facts


def upstream_model(name: str, seed: int) -> torch.nn.Module:
    import open_clip

    register_tiny_models()
    torch.manual_seed(seed)
    return open_clip.create_model(name).eval()


def upstream_transform(name: str, tag: str | None):
    """open_clip's own eval transform for the tag's preprocessing (independent of our spec)."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

    pcfg = merge_preprocess_dict(PreprocessCfg(), open_clip.get_pretrained_cfg(name, tag))
    return image_transform_v2(PreprocessCfg(**pcfg), is_train=False)


def max_pixel_diff(a: torch.Tensor, b: torch.Tensor, std: tuple[float, ...]) -> float:
    """Largest difference in [0, 1] pixel units (undoing the normalisation's division)."""
    s = torch.tensor(std).view(3, 1, 1)
    return float(((a - b) * s).abs().max())


@pytest.mark.parametrize("name,tag,resize", [("ViT-B-16", "openai", "shortest_crop"),
                                             ("ViT-B-16-SigLIP", "webli", "squash")])
@pytest.mark.parametrize("hw", [(240, 320), (333, 250)])
def test_preprocessing_equals_open_clip_transform(name, tag, resize, hw):
    spec = resolve_spec("open_clip", name, weights="random")
    assert spec.resize == resize and spec.input_size == (224, 224)
    rgb = real_looking_image(*hw)
    ours = Preprocessor(spec)(rgb)
    theirs = upstream_transform(name, tag)(Image.fromarray(rgb))
    assert ours.shape == theirs.shape == (3, 224, 224)
    assert ours.dtype == torch.float32
    assert max_pixel_diff(ours, theirs, spec.std) <= 1 / 255


def test_pretrained_means_the_default_tag_preprocessing():
    siglip = resolve_spec("open_clip", "ViT-B-16-SigLIP", weights="pretrained")
    assert siglip.mean == (0.5, 0.5, 0.5) and siglip.resize == "squash"
    clip = resolve_spec("open_clip", "ViT-B-16", weights="openai")
    assert clip.resize == "shortest_crop" and clip.interpolation == "bicubic"
    assert clip.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert resolve_spec("open_clip", "ViT-L-14", weights="random").patch_size == 14


def test_geometry_hand_computed_and_matches_pixels():
    spec = resolve_spec("open_clip", TINY_OPENCLIP, weights="random")
    pre = Preprocessor(spec)
    geo = pre.geometry(240, 320)
    # short side 240 -> 224, long side int(224 * 320 / 240) = 298, crop offset round(74 / 2)
    assert (geo.resized_height, geo.resized_width) == (224, 298)
    assert (geo.offset_x, geo.offset_y) == (37, 0)
    assert geo.scale_x == pytest.approx(298 / 320) and geo.scale_y == pytest.approx(224 / 240)
    assert geo.to_original(*geo.to_input(100.0, 50.0)) == pytest.approx((100.0, 50.0))
    rgb = np.zeros((240, 320, 3), np.uint8)
    rgb[100:140, 200:240] = 255            # square centred on pixel coordinate (219.5, 119.5)
    x = pre(rgb)[0] * spec.std[0] + spec.mean[0]
    ys, xs = torch.meshgrid(torch.arange(224.0), torch.arange(224.0), indexing="ij")
    cx, cy = float((x * xs).sum() / x.sum()), float((x * ys).sum() / x.sum())
    ex, ey = geo.to_input(219.5, 119.5)
    assert abs(cx - ex) < 0.5 and abs(cy - ey) < 0.5


def test_squash_geometry():
    spec = resolve_spec("open_clip", TINY_SIGLIP, weights="random")
    geo = Preprocessor(spec).geometry(100, 400)
    assert (geo.scale_x, geo.scale_y, geo.offset_x, geo.offset_y) == (0.4, 1.6, 0, 0)


def test_preprocessor_rejects_bad_arrays():
    pre = Preprocessor(resolve_spec("open_clip", TINY_OPENCLIP, weights="random"))
    for bad in (np.zeros((10, 10), np.uint8), np.zeros((10, 10, 4), np.uint8),
                np.zeros((10, 10, 3), np.float32), np.zeros((0, 10, 3), np.uint8)):
        with pytest.raises(ValueError):
            pre(bad)


def vit_reference(model: torch.nn.Module, x: torch.Tensor, block: int = -1) -> torch.Tensor:
    """Tokens of a block via a forward hook, then ln_post, CLS dropped, as [B, C, g, g]."""
    captured = {}
    handle = model.visual.transformer.resblocks[block].register_forward_hook(
        lambda m, i, o: captured.__setitem__("x", o))
    model.encode_image(x)
    handle.remove()
    tokens = model.visual.ln_post(captured["x"])[:, 1:]
    g = int(tokens.shape[1] ** 0.5)
    return tokens.reshape(x.shape[0], g, g, -1).permute(0, 3, 1, 2)


def test_tiny_vit_equals_open_clip_forward(tmp_path):
    model = upstream_model(TINY_OPENCLIP, seed=123)
    ckpt = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(model.state_dict(), ckpt)
    spec = resolve_spec("open_clip", TINY_OPENCLIP, weights=str(ckpt), seed=5)
    enc = load_encoder(spec)
    x = torch.stack([Preprocessor(spec)(real_looking_image(200, 260, seed=s)) for s in (1, 2)])
    with torch.inference_mode():
        out = enc(x)
        pooled, grid = model.encode_image(x), vit_reference(model, x)
    assert out.pooled.shape == (2, 32) and out.grid.shape == (2, 64, 14, 14)
    assert (out.pooled - pooled).abs().max() <= 1e-5
    assert (out.grid - grid).abs().max() <= 1e-5
    assert enc.weights_id == sha256_path(ckpt)
    assert not torch.allclose(out.grid[0], out.grid[1])


def test_layer_selects_a_block(tmp_path):
    model = upstream_model(TINY_OPENCLIP, seed=3)
    ckpt = tmp_path / "m.pt"
    torch.save(model.state_dict(), ckpt)
    spec = dataclasses.replace(resolve_spec("open_clip", TINY_OPENCLIP, weights=str(ckpt)),
                               layer=0)
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        got = load_encoder(spec)(x).grid
        assert (got - vit_reference(model, x, block=0)).abs().max() <= 1e-5
        assert (got - vit_reference(model, x, block=-1)).abs().max() > 1e-3


def test_tiny_siglip_timm_tower_equals_open_clip_forward(tmp_path):
    from safetensors.torch import save_file

    model = upstream_model(TINY_SIGLIP, seed=11)
    ckpt = tmp_path / "open_clip_model.safetensors"
    save_file(model.state_dict(), str(ckpt))
    spec = resolve_spec("open_clip", TINY_SIGLIP, weights=str(ckpt))
    enc = load_encoder(spec)
    x = torch.randn(2, 3, 160, 160)
    trunk = model.visual.trunk
    captured = {}
    handle = trunk.blocks[-1].register_forward_hook(lambda m, i, o: captured.__setitem__("x", o))
    with torch.inference_mode():
        out, pooled = enc(x), model.encode_image(x)
        handle.remove()
        tokens = trunk.norm(captured["x"])[:, trunk.num_prefix_tokens:]
    assert trunk.num_prefix_tokens == 1 and not trunk.cls_token  # register token, no CLS
    grid = tokens.reshape(2, 10, 10, -1).permute(0, 3, 1, 2)
    assert out.grid.shape == (2, 96, 10, 10) and out.pooled.shape == (2, 96)
    assert (out.pooled - pooled).abs().max() <= 1e-5
    assert (out.grid - grid).abs().max() <= 1e-5


def test_random_weights_are_seeded_and_warned(caplog):
    x = torch.randn(1, 3, 224, 224)
    with caplog.at_level(logging.WARNING):
        a = load_encoder(resolve_spec("open_clip", TINY_OPENCLIP, weights="random", seed=0))
    assert any("RANDOM" in r.getMessage() for r in caplog.records)
    b = load_encoder(resolve_spec("open_clip", TINY_OPENCLIP, weights="random", seed=0))
    c = load_encoder(resolve_spec("open_clip", TINY_OPENCLIP, weights="random", seed=1))
    with torch.inference_mode():
        ga, gb, gc = a(x).grid, b(x).grid, c(x).grid
    assert torch.equal(ga, gb) and not torch.allclose(ga, gc)
    assert a.weights_id == "random(seed=0)" and c.weights_id == "random(seed=1)"
    assert not any(p.requires_grad for p in a.parameters()) and not a.training


def test_provenance_is_json_able():
    enc = load_encoder(resolve_spec("open_clip", TINY_OPENCLIP, weights="random"))
    facts = encoder_facts(enc)
    prov = json.loads(json.dumps({**facts, "preprocessing": facts["preprocessing"].to_dict()}))
    assert prov["model"] == TINY_OPENCLIP and prov["family"] == "open_clip"
    assert prov["weights_id"] == "random(seed=0)"
    assert prov["preprocessing"]["input_size"] == [224, 224]
    assert prov["library"] == "open_clip_torch" and "ln_post" in prov["notes"]


def test_image_size_override():
    spec = resolve_spec("open_clip", TINY_OPENCLIP, weights="random", image_size=128)
    assert spec.input_size == (128, 128) and spec.grid_size == (8, 8)
    with torch.inference_mode():
        out = load_encoder(spec)(torch.randn(1, 3, 128, 128))
    assert out.grid.shape == (1, 64, 8, 8)


def test_bad_params_name_the_key(tmp_path):
    with pytest.raises(ParamError, match=r"^model: .*ViT-B-16"):
        resolve_spec("open_clip", "ViT-B-61", weights="random")
    with pytest.raises(ParamError, match=r"^extract_siglip\.model: "):
        resolve_spec("open_clip", "nonsense", weights="random", key="extract_siglip.model")
    with pytest.raises(ParamError, match=r"^weights: .*openai"):
        resolve_spec("open_clip", "ViT-B-16", weights="no_such_tag")
    with pytest.raises(ParamError, match=r"^weights: .*not found"):
        resolve_spec("open_clip", "ViT-B-16", weights=str(tmp_path / "missing.pt"))
    with pytest.raises(ParamError, match=r"^weights: .*no pretrained"):
        resolve_spec("open_clip", TINY_OPENCLIP, weights="pretrained")
    with pytest.raises(ParamError, match=r"^family: "):
        resolve_spec("clip", "ViT-B-16", weights="random")


def test_quick_gelu_follows_the_tag(monkeypatch, tmp_path):
    """Tags trained with QuickGELU (e.g. openai) must build the tower with QuickGELU."""
    import open_clip
    from open_clip import pretrained

    register_tiny_models()
    ckpt = tmp_path / "data/weights" / TINY_OPENCLIP / "qg" / "open_clip_pytorch_model.bin"
    ckpt.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(open_clip.create_model(TINY_OPENCLIP, force_quick_gelu=True).state_dict(), ckpt)
    monkeypatch.setitem(pretrained._PRETRAINED, TINY_OPENCLIP,
                        {"qg": pretrained._pcfg(hf_hub="featcache/none/", quick_gelu=True)})
    monkeypatch.chdir(tmp_path)
    enc = load_encoder(resolve_spec("open_clip", TINY_OPENCLIP, weights="pretrained"))
    assert enc.weights_id == "qg"
    assert type(enc.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"


@pytest.mark.parametrize("kind", ["clip", "siglip", "dinov2", "sam2"])
def test_tiny_shapes_table_is_true(kind):
    """encoder_fixtures.TINY_SHAPES is what other tests rely on: check it against the models."""
    from encoder_fixtures import TINY_SHAPES, tiny_encoder

    enc, shapes = tiny_encoder(kind), TINY_SHAPES[kind]
    assert enc.spec.input_size == shapes["input"]
    with torch.inference_mode():
        out = enc(torch.randn(1, 3, *shapes["input"]))
    if kind == "sam2":
        assert {k: tuple(v.shape[1:]) for k, v in out.levels.items()} == \
            {k: shapes[k] for k in ("P4_S16", "P5_S32")}
        return
    assert tuple(out.grid.shape[1:]) == shapes["grid"]
    assert (None if out.pooled is None else tuple(out.pooled.shape[1:])) == shapes["pooled"]


def test_random_weights_build_the_default_tags_architecture():
    """ViT-B-16's default tag (openai) was trained with QuickGELU: the random tower has it too,
    so `weights: random` is the pretrained architecture; a model without tags keeps GELU."""
    from featcache.encoders.openclip import uses_quick_gelu

    assert uses_quick_gelu(resolve_spec("open_clip", "ViT-B-16", weights="random"), {}, None)
    assert not uses_quick_gelu(resolve_spec("open_clip", TINY_OPENCLIP, weights="random"), {},
                               None)
