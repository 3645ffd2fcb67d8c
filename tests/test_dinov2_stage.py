"""extract_dinov2 on the tiny DINOv2 and generated images; real architectures' shapes on meta."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import featcache
from featcache.config import ParamError, SharedParams, build_dataclass, load_stage_params
from featcache.stages.extract_dinov2 import STAGE, Dinov2Params, extract_dinov2, plan_dinov2
from featcache.encoders import TINY_DINOV2, Preprocessor, load_encoder
from featcache.stages._grid_geometry import arrange_grid

REPO = Path(__file__).resolve().parents[1]
SHARED = SharedParams(weights="random", device="cpu", seed=0)
TINY_HIDDEN = 32


def write_split(folder: Path) -> None:
    """Two COCO-named JPEGs, an RGBA PNG with its right half transparent, a truncated JPEG."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True)
    for name in ("000000000632.jpg", "000000000724.jpg"):
        Image.fromarray(rng.integers(0, 256, (60, 80, 3), np.uint8)).save(folder / name)
    rgba = rng.integers(0, 256, (56, 56, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[:, 28:, 3] = 0
    Image.fromarray(rgba, "RGBA").save(folder / "cutout.png")
    (folder / "broken.jpg").write_bytes((folder / "000000000632.jpg").read_bytes()[:150])


def make_params(root: Path, **overrides: Any) -> Dinov2Params:
    values = {"root": str(root), "out": str(root / "out"), "model": TINY_DINOV2, "size": 56,
              "splits": [{"name": "val", "images": "imgs"}], "num_workers": 0,
              "max_failures": 0.5, "dtype": "fp32", **overrides}
    return build_dataclass(Dinov2Params, values, STAGE)


@pytest.fixture()
def split_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    write_split(tmp_path / "imgs")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_hdf5_grids_equal_the_upstream_last_hidden_state(split_root: Path) -> None:
    params = make_params(split_root, num_workers=2, layout="hdf5")
    extract_dinov2(SHARED, params)
    with h5py.File(split_root / "out" / "val.h5", "r") as f:   # the seed's way, on the view
        data = {k: f[k][()] for k in f}
        assert f.attrs["model"] == TINY_DINOV2 and f.attrs["grid"] == 4
    assert set(data) == {"632_grids", "724_grids", "cutout_grids"}
    shards = featcache.open_features(split_root / "out" / "val")
    assert shards.provenance["model"] == TINY_DINOV2 and sorted(shards) == ["632", "724", "cutout"]
    assert np.array_equal(shards["632"], data["632_grids"])
    assert data["632_grids"].shape == (TINY_HIDDEN, 4, 4)
    plan = plan_dinov2(SHARED, params)
    encoder = load_encoder(plan.spec, "cpu")
    rgb = np.asarray(Image.open(split_root / "imgs" / "000000000632.jpg").convert("RGB"))
    with torch.inference_mode():
        hidden = encoder.model(pixel_values=Preprocessor(plan.spec)(rgb)[None]).last_hidden_state
    expected = hidden[0, 1:].reshape(4, 4, TINY_HIDDEN).permute(2, 0, 1).numpy()
    np.testing.assert_allclose(data["632_grids"], expected, rtol=1e-5, atol=1e-5)
    rows = (split_root / "out" / "failures.tsv").read_text().splitlines()[1:]
    assert [r.split("\t")[1:3] for r in rows] == [["broken.jpg", "bad_image"]]


def test_npy_layout_with_mask(split_root: Path) -> None:
    extract_dinov2(SHARED, make_params(split_root, layout="npy", dtype="fp16", size=112))
    folder = split_root / "out" / "val"
    grid = np.load(folder / "000000000632.npy")
    assert grid.shape == (TINY_HIDDEN, 8, 8) and grid.dtype == np.float16
    mask = np.load(folder / "cutout_mask.npy")
    assert mask.shape == (8, 8)
    np.testing.assert_array_equal(mask[:, :4], 1)
    np.testing.assert_array_equal(mask[:, 4:], 0)
    assert sorted(p.name for p in folder.glob("*.json")) == ["provenance.json"]  # no meta
    index = (folder / "index.tsv").read_text().splitlines()
    assert "cutout\tmask\tcutout_mask.npy" in index


@pytest.mark.parametrize("name, hidden", [
    ("facebook/dinov2-small", 384), ("facebook/dinov2-base", 768),
    ("facebook/dinov2-large", 1024), ("facebook/dinov2-giant", 1536)])
def test_real_architectures_give_hidden_by_g_by_g(name: str, hidden: int) -> None:
    """The real configurations, built on the meta device (shapes only)."""
    from transformers import Dinov2Model

    from featcache.encoders.dinov2 import Dinov2Encoder, build_config

    plan = plan_dinov2(SharedParams(), make_params(Path("."), model=name, size=224))
    with torch.device("meta"):
        model = Dinov2Model(build_config(name))
    encoder = Dinov2Encoder(plan.spec, "meta", model.eval())
    with torch.inference_mode():
        out = encoder(torch.zeros(1, 3, 224, 224, device="meta"))
    assert tuple(arrange_grid(out.grid, plan.grid, plan.array_layout).shape) == (1, hidden, 16, 16)


@pytest.mark.parametrize("key, value, match", [
    ("size", 100, "size: must be a positive multiple of 14"), ("size", 0, "size"),
    ("splits", [], "splits"), ("dtype", "bf16", "dtype")])
def test_bad_params_name_the_key(tmp_path: Path, key: str, value: object, match: str) -> None:
    with pytest.raises(ParamError, match=f"{STAGE}.{match}"):
        make_params(tmp_path, **{key: value})


def test_unknown_model_and_missing_split_fail_before_work(split_root: Path) -> None:
    with pytest.raises(ParamError, match=f"{STAGE}.model: unknown DINOv2 model"):
        extract_dinov2(SHARED, make_params(split_root, model="facebook/dinov3-small"))
    with pytest.raises(ParamError, match=r"splits\[0\]\.images: split 'val': folder not found"):
        extract_dinov2(SHARED, make_params(split_root, splits=[{"name": "val", "images": "x"}]))
    assert not (split_root / "out").exists()


def test_repository_params_section_is_valid() -> None:
    shared, params = load_stage_params(STAGE, Dinov2Params, REPO / "params.yaml")
    assert plan_dinov2(shared, params).grid == params.size // 14
