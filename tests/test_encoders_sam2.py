"""SAM2 encoder: SAM2Transforms-equal preprocessing, P4/P5 equal the official build's
backbone_fpn levels (scalp=0 and scalp=1 builds, same weights), {"model": sd} checkpoints,
Hydra's global state left alone. hiera_t, random weights, CPU; equivalence at 256 input plus
one 1024 shape check."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from encoder_fixtures import TINY_SAM2, TINY_SAM2_SIZE, real_looking_image

from featcache.config import ParamError
from featcache.encoders import Preprocessor, load_encoder, resolve_spec
from featcache.encoders.weights import sha256_path

CONFIG_FILE = "configs/sam2.1/sam2.1_hiera_t.yaml"


@contextlib.contextmanager
def sam2_hydra() -> Iterator[None]:
    """sam2's Hydra config module for ``build_sam2``, whatever the global state was; the
    previous state is restored afterwards."""
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    import sam2  # noqa: F401  (its __init__ may initialise Hydra)

    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("sam2", version_base="1.2"):
            yield
    finally:
        restore_gh_from_backup(backup)


def official_build(ckpt: str | None, scalp0: bool = False) -> torch.nn.Module:
    from sam2.build_sam import build_sam2

    extra = ["++model.image_encoder.scalp=0"] if scalp0 else []
    with sam2_hydra():
        return build_sam2(CONFIG_FILE, ckpt_path=ckpt, device="cpu", hydra_overrides_extra=extra)


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> tuple[str, torch.nn.Module]:
    """A full SAM2.1 hiera_t model (official build, scalp=1, seed 7) and its {"model": sd}
    checkpoint file."""
    torch.manual_seed(7)
    model = official_build(None)
    path = tmp_path_factory.mktemp("sam2") / "sam2.1_hiera_tiny.pt"
    torch.save({"model": model.state_dict()}, path)
    return str(path), model


@pytest.mark.parametrize("size", [TINY_SAM2_SIZE, 1024])
def test_preprocessing_equals_sam2_transforms(size):
    from sam2.utils.transforms import SAM2Transforms

    spec = resolve_spec("sam2", TINY_SAM2, weights="random", image_size=size)
    rgb = real_looking_image(240, 330)
    ours = Preprocessor(spec)(rgb)
    theirs = SAM2Transforms(resolution=size, mask_threshold=0.0)(rgb)
    std = torch.tensor(spec.std).view(3, 1, 1)
    assert ours.shape == theirs.shape == (3, size, size)
    assert float(((ours - theirs) * std).abs().max()) <= 1 / 255
    assert spec.resize == "squash" and spec.interpolation == "bilinear"


def test_levels_equal_official_backbone_fpn(official):
    ckpt, scalp1 = official
    spec = resolve_spec("sam2", TINY_SAM2, weights=ckpt, image_size=TINY_SAM2_SIZE, seed=1)
    enc = load_encoder(spec)
    x = Preprocessor(spec)(real_looking_image(200, 300))[None]
    scalp0 = official_build(ckpt, scalp0=True)
    with torch.inference_mode():
        out = enc(x)
        fpn1 = scalp1.image_encoder(x)["backbone_fpn"]
        fpn0 = scalp0.image_encoder(x)["backbone_fpn"]
    assert len(fpn1) == 3 and len(fpn0) == 4     # scalp=1 drops the stride-32 level
    assert out.grid is None and out.pooled is None
    assert out.levels["P4_S16"].shape == (1, 256, 16, 16)
    assert out.levels["P5_S32"].shape == (1, 256, 8, 8)
    assert (out.levels["P4_S16"] - fpn0[2]).abs().max() <= 1e-5
    assert (out.levels["P5_S32"] - fpn0[3]).abs().max() <= 1e-5
    assert (out.levels["P4_S16"] - fpn1[2]).abs().max() <= 1e-5
    assert enc.weights_id == sha256_path(ckpt)


def test_1024_shapes_with_random_weights():
    spec = resolve_spec("sam2", TINY_SAM2, weights="random")
    assert spec.input_size == (1024, 1024) and spec.mean == (0.485, 0.456, 0.406)
    enc = load_encoder(spec)
    with torch.inference_mode():
        out = enc(torch.randn(1, 3, 1024, 1024))
    assert out.levels["P4_S16"].shape == (1, 256, 64, 64)
    assert out.levels["P5_S32"].shape == (1, 256, 32, 32)
    assert enc.weights_id == "random(seed=0)" and "backbone_fpn" in enc.notes


def test_random_weights_are_seeded():
    x = torch.randn(1, 3, 128, 128)
    outs = []
    for seed in (0, 0, 1):
        enc = load_encoder(resolve_spec("sam2", TINY_SAM2, weights="random", seed=seed,
                                        image_size=128))
        with torch.inference_mode():
            outs.append(enc(x).levels["P4_S16"])
    assert torch.equal(outs[0], outs[1]) and not torch.allclose(outs[0], outs[2])


@pytest.mark.parametrize("initialised", [True, False])
def test_hydra_state_untouched_from_any_cwd(tmp_path, monkeypatch, initialised):
    """Our build never composes: it works from another cwd, with or without a global Hydra,
    and leaves the global state as it found it."""
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    import sam2  # noqa: F401

    monkeypatch.chdir(tmp_path)
    with sam2_hydra():
        backup = get_gh_backup()
        if not initialised:
            GlobalHydra.instance().clear()
        load_encoder(resolve_spec("sam2", TINY_SAM2, weights="random", image_size=64))
        assert GlobalHydra.instance().is_initialized() == initialised
        if initialised:
            assert compose(config_name=CONFIG_FILE).model.image_encoder.scalp == 1
        restore_gh_from_backup(backup)


def test_bad_checkpoint_and_params(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"model": {"something.else": torch.zeros(1)}}, bad)
    spec = resolve_spec("sam2", TINY_SAM2, weights=str(bad), image_size=64)
    with pytest.raises(ParamError, match=r"^weights: .*not a SAM2 checkpoint"):
        load_encoder(spec)
    with pytest.raises(ParamError, match=r"^config: .*sam2.1_hiera_t"):
        resolve_spec("sam2", "sam2.1_hiera_tiny", weights="random")
    with pytest.raises(ParamError, match=r"^size: "):
        resolve_spec("sam2", TINY_SAM2, weights="random", image_size=100)
    with pytest.raises(ParamError, match=r"^weights: "):
        resolve_spec("sam2", TINY_SAM2, weights="some_tag")
    assert resolve_spec("sam2", "sam2_hiera_b+", weights="random").name == "sam2_hiera_b+"
