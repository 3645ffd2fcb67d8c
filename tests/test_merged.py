"""load_merged: SAM2 features + Method-B edges of one image as one dict with the seed's keys."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from featcache.config import build_dataclass
from featcache.engine import EngineParams, Piece, run_job
from featcache.engine.atomic import save_npz
from featcache.engine.writers import NpzWriter, WriterOptions
from featcache.merged import edges_path, features_path, list_merged_stems, load_merged, read_npz
from featcache.stages import edge_maps_methodB, extract_sam2
from featcache.stages.edge_maps_methodB import EdgeParams, edge_fields, run_edge_maps
from featcache.stages.extract_sam2 import feature_fields

SEED_KEYS = {"P4_S16", "P5_S32", "IMAGE_EMB_S16", "feature_flag",
             "edge_256x256", "edge_64x64", "edge_32x32", "edge_flag", "edge_version"}


def write_features(folder: Path, stem: str, seed: int = 0) -> dict[str, np.ndarray]:
    """``<stem>_features.npz`` as extract_sam2 writes it (its fields, its npz writer options),
    from random 1024-input levels; returns what the file holds."""
    rng = np.random.default_rng(seed)
    levels = {"P4_S16": rng.standard_normal((1, 256, 64, 64), np.float32),
              "P5_S32": rng.standard_normal((1, 256, 32, 32), np.float32)}
    options = WriterOptions(dtype="fp16", suffix=extract_sam2.OUTPUT_SUFFIX,
                            aliases=extract_sam2.NPZ_ALIASES)
    with NpzWriter(folder, provenance={}, options=options) as writer:
        writer.write([stem], feature_fields(levels, 1024))
    return read_npz(features_path(folder, stem))


def write_edges(folder: Path, stem: str) -> dict[str, np.ndarray]:
    """``<stem>_edges.npz`` as edge_maps_methodB writes it, from a striped edge map."""
    edge = np.arange(300 * 400).reshape(300, 400) % 3 == 0
    options = WriterOptions(suffix=edge_maps_methodB.OUTPUT_SUFFIX)
    with NpzWriter(folder, provenance={}, options=options) as writer:
        writer.write([stem], {k: v[None] for k, v in edge_fields(edge, (256, 64, 32)).items()})
    return read_npz(edges_path(folder, stem))


def test_merges_both_files_with_seed_keys(tmp_path: Path) -> None:
    feats = write_features(tmp_path / "sam2", "sa_1")
    edges = write_edges(tmp_path / "edges", "sa_1")
    write_features(tmp_path / "sam2", "sa_2", seed=1)  # another image must not leak in
    merged = load_merged(tmp_path / "sam2", tmp_path / "edges", "sa_1")
    assert set(merged) == SEED_KEYS
    for name, value in (feats | edges).items():
        assert merged[name].dtype == value.dtype
        np.testing.assert_array_equal(merged[name], value)
    assert merged["P4_S16"].shape == (256, 64, 64) and merged["P5_S32"].shape == (256, 32, 32)
    assert str(merged["edge_version"]) == "B_v1"


@pytest.mark.parametrize("missing", ["features", "edges"])
def test_missing_file_names_it(tmp_path: Path, missing: str) -> None:
    if missing != "features":
        write_features(tmp_path / "sam2", "sa_1")
    if missing != "edges":
        write_edges(tmp_path / "edges", "sa_1")
    with pytest.raises(FileNotFoundError, match=f"sa_1_{missing}.npz"):
        load_merged(tmp_path / "sam2", tmp_path / "edges", "sa_1")


def test_clashing_keys_and_corrupt_file_raise(tmp_path: Path) -> None:
    write_features(tmp_path / "sam2", "sa_1")
    save_npz(edges_path(tmp_path / "edges", "sa_1"), {"P4_S16": np.zeros(2)})
    with pytest.raises(ValueError, match="P4_S16"):
        load_merged(tmp_path / "sam2", tmp_path / "edges", "sa_1")
    edges_path(tmp_path / "edges", "sa_1").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="sa_1_edges.npz"):
        load_merged(tmp_path / "sam2", tmp_path / "edges", "sa_1")


def test_list_merged_stems_needs_both_files(tmp_path: Path) -> None:
    for stem in ("sa_1", "sa_2", "sa_3"):
        write_features(tmp_path / "sam2", stem)
    for stem in ("sa_2", "sa_3", "sa_4"):
        write_edges(tmp_path / "edges", stem)
    (tmp_path / "edges" / "failures.tsv").write_text("output\titem\terror\tmessage\n")
    assert list_merged_stems(tmp_path / "sam2", tmp_path / "edges") == ["sa_2", "sa_3"]


def test_merges_real_edge_stage_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    sa1b = tmp_path / "sa1b"
    sa1b.mkdir()
    Image.new("RGB", (80, 60)).save(sa1b / "sa_9.jpg")
    mask = np.zeros((60, 80), np.uint8)
    mask[10:30, 20:50] = 1
    enc = mask_utils.encode(np.asfortranarray(mask))
    seg = {"size": [60, 80], "counts": enc["counts"].decode("ascii")}
    (sa1b / "sa_9.json").write_text(json.dumps({
        "image": {"image_id": 9, "width": 80, "height": 60, "file_name": "sa_9.jpg"},
        "annotations": [{"id": 1, "segmentation": seg}]}))
    params = build_dataclass(EdgeParams, {"sa1b": str(sa1b), "out": str(tmp_path / "edges"),
                                          "num_workers": 0}, prefix="edge_maps_methodB")
    run_edge_maps(params)
    write_features(tmp_path / "sam2", "sa_9")
    merged = load_merged(tmp_path / "sam2", tmp_path / "edges", "sa_9")
    assert set(merged) == SEED_KEYS
    assert merged["edge_64x64"].shape == (64, 64) and merged["edge_64x64"].any()
    assert merged["edge_flag"] == 1 and merged["feature_flag"] == 1


def test_sharded_outputs_merge_like_the_seed_files(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Both stages' default layout: P4 is stored once, IMAGE_EMB_S16 comes back as P4."""
    monkeypatch.chdir(tmp_path)
    files = {stem: write_features(tmp_path / "npz", stem, seed=i)
             for i, stem in enumerate(("sa_1", "sa_2"))}

    class FeaturesJob:
        def items(self):
            return list(files)

        def signature(self, item):
            return item

        def load(self, item):
            arrays = {k: v for k, v in files[item].items() if k != "IMAGE_EMB_S16"}
            return [Piece(item, arrays=arrays)]

    run_job(FeaturesJob(), None, stage="extract_sam2", out=tmp_path / "sam2", provenance={},
            fingerprint={}, params=EngineParams(num_workers=0))
    assert not list((tmp_path / "sam2").glob("*.npz"))
    edges = write_edges(tmp_path / "edges_npz", "sa_2")
    merged = load_merged(tmp_path / "sam2", tmp_path / "edges_npz", "sa_2")
    assert set(merged) == SEED_KEYS
    for name, value in (files["sa_2"] | edges).items():
        np.testing.assert_array_equal(merged[name], value)
    assert list_merged_stems(tmp_path / "sam2", tmp_path / "edges_npz") == ["sa_2"]
    with pytest.raises(FileNotFoundError, match="sa_3: not in"):
        load_merged(tmp_path / "sam2", tmp_path / "edges_npz", "sa_3")
