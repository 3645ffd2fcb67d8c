"""Typed provenance (featcache.provenance): every output kind round-trips through to_dict/JSON/
from_dict, and from_dict names the key that is missing or wrong."""

from __future__ import annotations

import dataclasses
import json

import pytest

from featcache.encoders.base import EncoderSpec
from featcache.provenance import (
    KINDS,
    CropSettings,
    EdgeProvenance,
    GridProvenance,
    GridSource,
    OutputProvenance,
    PointFeatsProvenance,
    ProvenanceError,
    Sam2Provenance,
    SiglipProvenance,
    UvIndexProvenance,
    parse_provenance,
)

SPEC = EncoderSpec(family="open_clip", name="tiny", weights="random", input_size=(64, 48),
                   resize="shortest_crop", mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3),
                   interpolation="bicubic", patch_size=16, seed=3)
WRITTEN = dict(layout="shards", storage_dtype="fp16", libraries={"numpy": "2.0"},
               code_version="c0de", shard_mb=256.0)
ENCODED = dict(model="tiny", family="open_clip", weights="random", weights_id="random(seed=3)",
               preprocessing=SPEC, library="open_clip_torch", notes="patch tokens",
               compute_precision="fp32")
GRID = GridProvenance(stage="extract_clip_grid", **WRITTEN, **ENCODED, grid=2, native_grid=4,
                      pooling="avg_pool2d kernel 2", array_layout="tokens",
                      array_shape="(g*g, C)", split="val", images="raw/val", key_rule="image_id",
                      background=(255, 255, 255), precision="auto", preprocess="exact")

SAMPLES: dict[str, OutputProvenance] = {
    "extract_clip_grid": GRID,
    "extract_dinov2": dataclasses.replace(GRID, stage="extract_dinov2", array_layout="chw"),
    "extract_siglip": SiglipProvenance(
        stage="extract_siglip", **{**WRITTEN, "layout": "hdf5_packed"}, **ENCODED,
        coco="raw/coco", split="val2017", crop=CropSettings(0.3, 0.1, (124, 116, 104), 32),
        key="<image_id:012d>_<segment_id>"),
    "extract_sam2": Sam2Provenance(
        stage="extract_sam2", **{**WRITTEN, "layout": "npz"}, suffix="_features",
        aliases={"IMAGE_EMB_S16": "P4_S16"}, **{**ENCODED, "family": "sam2"},
        config="sam2.1_hiera_t", images="raw/sa1b", keys={"P4_S16": "backbone_fpn[2]"}),
    "edge_maps_methodB": EdgeProvenance(
        stage="edge_maps_methodB", **{**WRITTEN, "storage_dtype": None}, method="B",
        edge_version="B_v1", sa1b="raw/sa1b", kernel_size=3, sizes=(256, 64), compression="gzip"),
    "build_uv_index": UvIndexProvenance(
        stage="build_uv_index", **WRITTEN, params={"frames_per_scene": 3, "layout": "shards"},
        conventions="camera-to-world", intrinsics={"scene0": {"color": {"scale": [0.5, 0.5]}}}),
    "sample_point_feats": PointFeatsProvenance(
        stage="sample_point_feats", **WRITTEN, params={"upscale": 2}, notes="doc",
        clip_grid={"scene0": GridSource.of(GRID, "scene0")}),
}


def required_keys(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING]


def test_every_kind_has_a_sample() -> None:
    assert set(SAMPLES) == set(KINDS)
    assert all(isinstance(SAMPLES[stage], cls) for stage, cls in KINDS.items())


@pytest.mark.parametrize("stage", sorted(SAMPLES))
def test_round_trip_through_json(stage: str) -> None:
    prov = SAMPLES[stage]
    written = json.loads(json.dumps(prov.to_dict()))   # what the HDF5 attribute holds
    back = type(prov).from_dict(written)
    assert back == prov and back.to_dict() == written
    assert parse_provenance(written) == prov
    assert "extra" not in written and "dtype" not in written


def test_round_trip_keeps_unknown_keys_and_drops_unset_engine_facts() -> None:
    built = EdgeProvenance(method="B", edge_version="B_v1", sa1b="s", kernel_size=3,
                           sizes=(8,), compression="none")
    assert "code_version" not in built.to_dict() and "stage" not in built.to_dict()
    data = {**SAMPLES["edge_maps_methodB"].to_dict(), "added_later": [1, 2]}
    prov = EdgeProvenance.from_dict(data)
    assert prov.extra == {"added_later": [1, 2]} and prov.to_dict() == data


@pytest.mark.parametrize("stage", sorted(SAMPLES))
def test_a_missing_key_is_named(stage: str) -> None:
    prov = SAMPLES[stage]
    keys = required_keys(type(prov))
    assert keys, f"{stage}: no required key"
    for key in keys:
        data = {k: v for k, v in prov.to_dict().items() if k != key}
        with pytest.raises(ProvenanceError, match=rf"missing key '{key}'"):
            type(prov).from_dict(data)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("grid", "2", r"key 'grid' is '2', expected int"),
    ("array_layout", "hwc", r"key 'array_layout' is 'hwc', expected one of \['tokens', 'chw'\]"),
    ("background", [255, 255], r"key 'background' is \[255, 255\], expected a list of 3"),
    ("preprocessing", {**SPEC.to_dict(), "input_size": [64]},
     r"key 'preprocessing': encoder spec: key 'input_size' is \[64\], expected 2 ints"),
    ("preprocessing", {k: v for k, v in SPEC.to_dict().items() if k != "patch_size"},
     r"key 'preprocessing': encoder spec: missing key 'patch_size'"),
    ("storage_dtype", "int8", r"key 'storage_dtype' is 'int8'"),
])
def test_a_wrong_value_is_named(key: str, value: object, message: str) -> None:
    with pytest.raises(ProvenanceError, match=message):
        GridProvenance.from_dict({**GRID.to_dict(), key: value})


def test_nested_records_name_their_keys() -> None:
    siglip = SAMPLES["extract_siglip"].to_dict()
    with pytest.raises(ProvenanceError, match=r"key 'crop': crop provenance: missing key "
                                              r"'min_crop'"):
        SiglipProvenance.from_dict({**siglip, "crop": {"bg_alpha": 0.3, "pad_ratio": 0.1,
                                                       "fill": [1, 2, 3]}})
    points = SAMPLES["sample_point_feats"].to_dict()
    source = {k: v for k, v in points["clip_grid"]["scene0"].items() if k != "model"}
    with pytest.raises(ProvenanceError, match=r"key 'clip_grid.scene0': grid source "
                                              r"provenance: missing key 'model'"):
        PointFeatsProvenance.from_dict({**points, "clip_grid": {"scene0": source}})


def test_crop_settings_round_trip() -> None:
    crop = CropSettings(0.3, 0.1, (124, 116, 104), 32)
    assert crop.to_dict() == {"bg_alpha": 0.3, "pad_ratio": 0.1, "fill": [124, 116, 104],
                              "min_crop": 32}
    assert CropSettings.from_dict(crop.to_dict()) == crop
    with pytest.raises(ProvenanceError, match="unknown key 'blur'"):
        CropSettings.from_dict({**crop.to_dict(), "blur": 1})


def test_encoder_spec_from_dict() -> None:
    assert EncoderSpec.from_dict(json.loads(json.dumps(SPEC.to_dict()))) == SPEC
    defaults = {k: v for k, v in SPEC.to_dict().items() if k not in ("layer", "seed")}
    assert EncoderSpec.from_dict(defaults) == dataclasses.replace(SPEC, seed=0)
    with pytest.raises(ValueError, match="missing key 'input_size'"):
        EncoderSpec.from_dict({k: v for k, v in SPEC.to_dict().items() if k != "input_size"})
    with pytest.raises(ValueError, match="unknown key 'crop_pct'"):
        EncoderSpec.from_dict({**SPEC.to_dict(), "crop_pct": 0.9})
    with pytest.raises(ValueError, match=r"key 'resize' is 'stretch', expected one of"):
        EncoderSpec.from_dict({**SPEC.to_dict(), "resize": "stretch"})


def test_parse_provenance_refuses_an_unknown_stage() -> None:
    with pytest.raises(ProvenanceError, match="stage 'toy'"):
        parse_provenance({"stage": "toy"})
