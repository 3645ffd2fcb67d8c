"""verify: passes on real outputs of every stage, and each corruption fails exactly its check.

The world is the embedded sample with every stage run on it with the tiny models (SAM2 outputs
are written through the engine by a model-free job: hiera_t at 1024 takes seconds per image on a
CPU). Each corruption test copies the features, breaks one thing in a shard or an index and
expects exactly one check to fail.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import yaml

from encoder_fixtures import tiny_spec
from featcache.stages.extract_clip_grid import ClipGridParams, extract_clip_grid
from featcache.config import ParamError, SharedParams, build_dataclass
from featcache.stages.extract_dinov2 import Dinov2Params, extract_dinov2
from featcache.stages.edge_maps_methodB import EdgeParams, run_edge_maps
from featcache.encoders import TINY_DINOV2, TINY_OPENCLIP, TINY_SIGLIP
from featcache.engine import (EngineParams, Piece, WriterOptions, finish_stage, run_job)
from featcache.engine.shards import INDEX_NAME, SHARDS_DIR, ShardReader, read_index
from featcache.datasets.images import list_images
from featcache.provenance import Sam2Provenance
from featcache.stages.sample_point_feats import PointFeatsParams, sample_point_feats
from featcache.sample import generate_sample
from featcache.stages.extract_siglip import SiglipParams, extract_siglip
from featcache.stages.build_uv_index import UvIndexParams, build_uv_index
from featcache.stages.verify import VerificationFailed, VerifyParams, verify

ROOT = Path(__file__).resolve().parents[1]
SHARED = SharedParams(model=TINY_OPENCLIP, weights="random", device="cpu", seed=0)
FEATURES = ("clip_grid", "dinov2", "siglip", "sam2", "edges", "uv_index", "point_feats")
SCENES = ("scene0000_00", "scene0001_00")


class FakeSam2Job:
    """SAM2-shaped records at a 256 input (P4 16x16), as extract_sam2 stores them."""

    def __init__(self, images: Path) -> None:
        self.paths = {p.stem: p for p in list_images(images)}

    def items(self) -> list[str]:
        return sorted(self.paths)

    def signature(self, item: str) -> str:
        return item

    def load(self, item: str) -> list[Piece]:
        rng = np.random.default_rng(sorted(self.paths).index(item))
        p4 = rng.normal(size=(256, 16, 16)).astype(np.float32)
        return [Piece(item, arrays={"P4_S16": p4, "P5_S32": p4[:, ::2, ::2],
                                    "feature_flag": np.int64(1)})]


def write_fake_sam2(images: Path, out: Path) -> None:
    spec = tiny_spec("sam2")
    prov = Sam2Provenance(model=spec.name, family="sam2", weights="random",
                          weights_id="random(seed=0)", preprocessing=spec,
                          compute_precision="fp32", config=spec.name,
                          images=images.as_posix())
    params = EngineParams(num_workers=0, metrics="metrics/extract_sam2.json")
    result = run_job(FakeSam2Job(images), None, stage="extract_sam2", out=out,
                     writer_options=WriterOptions(dtype="fp16"), provenance=prov.to_dict(),
                     fingerprint={}, params=params)
    finish_stage("extract_sam2", out, [result], params)


def build_world(root: Path) -> None:
    """The sample in ``raw/``, every output in ``features/``, metrics in ``metrics/`` (cwd)."""
    generate_sample("raw", seed=0)
    engine = {"num_workers": 0, "max_failures": 0.5}
    splits = [{"name": "coco_val2017", "images": "coco/val2017"}] + \
        [{"name": s, "images": f"scannet/scans/{s}/color"} for s in SCENES]
    extract_clip_grid(SHARED, build_dataclass(ClipGridParams, {
        "root": "raw", "out": "features/clip_grid", "splits": splits, **engine}, "c"))
    extract_dinov2(SHARED, build_dataclass(Dinov2Params, {
        "root": "raw", "out": "features/dinov2", "model": TINY_DINOV2, "size": 56,
        "splits": [{"name": "images", "images": "images"}], **engine}, "d"))
    extract_siglip(SHARED, build_dataclass(SiglipParams, {
        "coco": "raw/coco", "split": "val2017", "out": "features/siglip", "model": TINY_SIGLIP,
        **engine}, "s"))
    write_fake_sam2(Path("raw/sa1b"), Path("features/sam2"))
    run_edge_maps(build_dataclass(EdgeParams, {"sa1b": "raw/sa1b", "out": "features/edges",
                                               **engine}, "e"))
    build_uv_index(build_dataclass(UvIndexParams, {
        "scannet": "raw/scannet", "scenes": "scannetv2_sample.txt", "out": "features/uv_index",
        "frames_per_scene": 3, **engine}, "u"))
    sample_point_feats(build_dataclass(PointFeatsParams, {
        "uv_index": "features/uv_index", "clip_grid": "features/clip_grid",
        "out": "features/point_feats", **engine}, "p"))


def verify_params(features: Path, report: Path, **overrides: Any) -> VerifyParams:
    values = {"raw": "raw", **{name: str(features / name) for name in FEATURES},
              "uv_metrics": "metrics/build_uv_index.json", "report": str(report),
              "pictures": str(report.parent / "pictures"), "spot_check": 0,
              "picture_items": 0, **overrides}
    return build_dataclass(VerifyParams, values, "verify")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("world")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        build_world(root)
        yield root


@pytest.fixture()
def copy(world: Path, tmp_path: Path) -> Path:
    """A copy of the world's features to corrupt (provenance paths still resolve: cwd is the
    world)."""
    shutil.copytree(world / "features", tmp_path / "features")
    return tmp_path / "features"


def test_real_outputs_pass_every_check_and_get_pictures(world: Path) -> None:
    report_path = world / "reports" / "verify.json"
    report = verify(SHARED, verify_params(world / "features", report_path, spot_check=2,
                                          picture_items=2))
    doc = json.loads(report_path.read_text())
    assert doc["passed"] and doc["failed"] == [] and not report.failed
    kinds = {name.split(".")[0] for name in doc["checks"]}
    assert kinds == set(FEATURES)
    for name in ("clip_grid.spot_check", "dinov2.spot_check", "siglip.spot_check",
                 "siglip.unit_norm",
                 "siglip.index", "siglip.coverage", "edges.binary", "sam2.flags",
                 "uv_index.reprojection", "point_feats.valid"):
        assert doc["checks"][name]["passed"] and doc["checks"][name]["items"] > 0, name
    assert doc["checks"]["clip_grid.spot_check"]["items"] == 2 * 3      # 2 per grid file
    assert doc["checks"]["clip_grid.spot_check"]["min_cosine"] >= 0.999
    assert doc["checks"]["siglip.unit_norm"]["max_norm_error"] < 1e-3
    assert doc["checks"]["uv_index.reprojection"]["max_px"] < 1
    # the deliberate bad inputs of the sample are failures rows, so coverage still passes
    assert doc["checks"]["siglip.coverage"]["items"] == doc["checks"]["siglip.index"]["items"] + 1
    names = {Path(p).name for p in doc["pictures"]}
    assert names == {"clip_grid_pca.png", "dinov2_pca.png", "edges.png", "uv_projection.png",
                     "siglip_segments.png"}
    for path in doc["pictures"]:
        assert Path(path).stat().st_size > 1000
    again = world / "reports" / "again.json"
    verify(SHARED, verify_params(world / "features", again, spot_check=2, picture_items=2))
    assert again.read_bytes() == report_path.read_bytes()  # no times: a deterministic metric


def where(folder: Path, key: str | None = None) -> tuple[Path, int, str]:
    """``(shard file, row, key)`` of ``key`` (default: the first key) in a sharded output."""
    keys, shard, row, names, _ = read_index(folder)
    i = keys.index(key) if key is not None else 0
    return folder / SHARDS_DIR / names[shard[i]], int(row[i]), keys[i]


def change_row(folder: Path, field: str, change: Callable[[np.ndarray], np.ndarray],
               key: str | None = None) -> None:
    """Rewrite one stored value in place (dense or ragged field)."""
    path, row, _ = where(folder, key)
    with ShardReader(path) as r:
        value = np.array(r.read(field, row))
    value = change(value)
    with h5py.File(path, "r+") as f:
        obj = f[field]
        if isinstance(obj, h5py.Group):
            lo, hi = obj["offsets"][row:row + 2]
            obj["data"][lo:hi] = value.ravel()
        else:
            obj[row] = value


def scale_embedding(features: Path) -> None:
    keys = read_index(features / "siglip")[0]
    change_row(features / "siglip", "embeddings", lambda v: v * np.float16(1.5), keys[3])


def add_tsv_row(features: Path) -> None:
    path, _, _ = where(features / "siglip")
    with open(features / "siglip" / "inst2feat.tsv", "a") as f:
        f.write(f"000000999999\t7\t{SHARDS_DIR}/{path.name}#70\n")


def drop_grid(features: Path) -> None:
    """Remove the first image from the split's index (its rows stay in the shard)."""
    with h5py.File(features / "clip_grid" / "coco_val2017" / INDEX_NAME, "r+") as f:
        columns = {name: f[name][()] for name in ("keys", "shard", "row")}
        for name, values in columns.items():
            del f[name]
            f.create_dataset(name, data=values[1:], dtype=h5py.string_dtype()
                             if name == "keys" else values.dtype)


def roll_grid(features: Path) -> None:   # patches shifted by one position
    change_row(features / "clip_grid" / "coco_val2017", "grids", lambda v: np.roll(v, 1, 0))


def non_binary_edges(features: Path) -> None:
    def change(v: np.ndarray) -> np.ndarray:
        v[0, 0] = 2
        return v
    change_row(features / "edges", "edge_64x64", change)


def clear_feature_flag(features: Path) -> None:
    change_row(features / "sam2", "feature_flag", lambda v: np.zeros_like(v))


def bad_reprojection(features: Path) -> None:
    change_row(features / "uv_index", "reproj_err_px", lambda v: np.full_like(v, 1.5))


def features_where_invalid(features: Path) -> None:
    path, row, key = where(features / "point_feats")
    with ShardReader(path) as r:
        valid = r.read("valid", row)

    def change(v: np.ndarray) -> np.ndarray:
        v[np.flatnonzero(~valid)[0]] = 1
        return v
    change_row(features / "point_feats", "pts_feat", change, key)


@pytest.mark.parametrize("corrupt, check, spot", [
    (scale_embedding, "siglip.unit_norm", 0),
    (add_tsv_row, "siglip.index", 0),
    (drop_grid, "clip_grid.coverage", 0),
    (non_binary_edges, "edges.binary", 0),
    (roll_grid, "clip_grid.spot_check", 9),      # every coco key recomputed
    (clear_feature_flag, "sam2.flags", 0),
    (bad_reprojection, "uv_index.reprojection", 0),
    (features_where_invalid, "point_feats.valid", 0),
])
def test_each_corruption_fails_its_check(copy: Path, corrupt: Callable[[Path], None],
                                         check: str, spot: int) -> None:
    corrupt(copy)
    report_path = copy.parent / "verify.json"
    with pytest.raises(VerificationFailed, match=check.replace(".", r"\.")):
        verify(SHARED, verify_params(copy, report_path, spot_check=spot))
    doc = json.loads(report_path.read_text())  # written before failing
    assert not doc["passed"] and doc["failed"] == [check]
    failed = doc["checks"][check]
    assert failed["problems"] >= 1 and failed["first_problems"]


def test_a_missing_output_and_an_unreadable_file_are_reported(copy: Path) -> None:
    shutil.rmtree(copy / "dinov2")
    where(copy / "edges")[0].write_bytes(b"not an HDF5 file")
    with pytest.raises(VerificationFailed) as e:
        verify(SHARED, verify_params(copy, copy.parent / "verify.json"))
    assert "dinov2.readable" in str(e.value) and "edges.readable" in str(e.value)


def test_bad_params_name_the_key(copy: Path) -> None:
    with pytest.raises(ParamError, match="verify.min_cosine"):
        verify_params(copy, copy.parent / "v.json", min_cosine=1.5)
    with pytest.raises(ParamError, match="verify.spot_check"):
        verify_params(copy, copy.parent / "v.json", spot_check=-1)


def test_stage_script_writes_the_report_then_exits_1(world: Path, copy: Path,
                                                      tmp_path: Path) -> None:
    non_binary_edges(copy)
    params = verify_params(copy, tmp_path / "verify.json")
    doc = {"model": TINY_OPENCLIP, "weights": "random", "seed": 0, "runtime": {"device": "cpu"},
           "verify": dataclasses.asdict(params)}
    params_file = world / "params.yaml"  # the stage runs where the outputs' provenance points
    params_file.write_text(yaml.safe_dump(doc))
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "stages" / "verify.py")], cwd=world,
                              capture_output=True, text=True, timeout=300)
    finally:
        params_file.unlink()
    assert proc.returncode == 1, proc.stderr
    assert "edges.binary" in proc.stderr and "Traceback" not in proc.stderr
    assert json.loads((tmp_path / "verify.json").read_text())["failed"] == ["edges.binary"]


# --- a failure row is not coverage; a stale output names the param (issue 13, points 8-9) ---

class AllFailJob(FakeSam2Job):
    """Every image fails: the stage writes no record, only failure rows."""

    def load(self, item: str) -> list:
        from featcache.engine import Failure

        return [Failure(item, "bad_image", "unreadable")]


def test_an_output_whose_every_item_failed_fails_records(copy: Path) -> None:
    shutil.rmtree(copy / "sam2")
    params = EngineParams(num_workers=0, max_failures=100, metrics=str(copy / "m.json"))
    result = run_job(AllFailJob(Path("raw/sa1b")), None, stage="extract_sam2", out=copy / "sam2",
                     writer_options=WriterOptions(dtype="fp16"), fingerprint={}, params=params,
                     provenance={"model": "x", "family": "sam2", "weights": "random"})
    finish_stage("extract_sam2", copy / "sam2", [result], params)
    with pytest.raises(VerificationFailed, match=r"sam2\.records"):
        verify(SHARED, verify_params(copy, copy.parent / "v.json"), expected={})
    doc = json.loads((copy.parent / "v.json").read_text())
    assert doc["checks"]["sam2.records"]["written"] == 0
    assert doc["checks"]["sam2.records"]["failed"] == result.failed > 0
    assert "no records" in doc["checks"]["sam2.records"]["first_problems"][0]


def test_more_failures_than_the_stage_allows_fail_records(copy: Path) -> None:
    from featcache.verify.outputs import Expectation

    strict = {"siglip": Expectation("extract_siglip", max_failures=0,
                                    metrics="metrics/extract_siglip.json")}
    with pytest.raises(VerificationFailed, match=r"siglip\.records"):
        verify(SHARED, verify_params(copy, copy.parent / "v.json"), expected=strict)
    check = json.loads((copy.parent / "v.json").read_text())["checks"]["siglip.records"]
    assert check["failed"] >= 1 and check["items"] > check["failed"]
    assert "extract_siglip.max_failures=0" in check["first_problems"][0]
    lenient = {"siglip": Expectation("extract_siglip", max_failures=0.5,
                                     metrics="metrics/extract_siglip.json")}
    verify(SHARED, verify_params(copy, copy.parent / "v.json"), expected=lenient)


def test_failures_from_a_key_mismatch_fail_records(copy: Path) -> None:
    key = read_index(copy / "point_feats")[0][0]
    with open(copy / "point_feats" / "failures.tsv", "a") as f:
        f.write(f"point_feats\t{key}_x\tmissing_grid\tno grid under key 3 in scene0000_00\n")
    with pytest.raises(VerificationFailed, match=r"point_feats\.records"):
        verify(SHARED, verify_params(copy, copy.parent / "v.json"), expected={})
    check = json.loads((copy.parent / "v.json").read_text())["checks"]["point_feats.records"]
    assert check["key_mismatch"] == 1 and "extract_clip_grid" in check["first_problems"][0]


def world_params(root: Path, **siglip: Any) -> Path:
    """A params.yaml holding the extract_siglip section the world was built with."""
    section = {"coco": "raw/coco", "split": "val2017", "out": "features/siglip",
               "model": TINY_SIGLIP, "max_failures": 0.5, **siglip}
    path = root / "expect" / "params.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump({"model": TINY_OPENCLIP, "weights": "random", "seed": 0,
                                    "extract_siglip": section}))
    return path


@pytest.mark.parametrize("change, key", [
    ({"pad_ratio": 0.2}, "extract_siglip.pad_ratio"),
    ({"model": TINY_OPENCLIP}, "extract_siglip.model"),
    ({"layout": "npy"}, "extract_siglip.layout"),
    ({"weights": "pretrained"}, "extract_siglip.weights"),
])
def test_a_stale_output_fails_naming_the_param(world: Path, copy: Path, change: dict,
                                               key: str) -> None:
    from featcache.verify.expected import load_expectations

    params = verify_params(copy, copy.parent / "v.json")
    verify(SHARED, params, expected=load_expectations(world_params(world)))  # up to date
    with pytest.raises(VerificationFailed, match=r"siglip\.params"):
        verify(SHARED, params, expected=load_expectations(world_params(world, **change)))
    doc = json.loads((copy.parent / "v.json").read_text())
    problem = doc["checks"]["siglip.params"]["first_problems"][0]
    assert f"params.yaml has {key}:" in problem and "stale" in problem, problem


def test_compact_metric_and_records_table(copy: Path) -> None:
    params = verify_params(copy, copy.parent / "v.json", metrics=str(copy.parent / "m.json"),
                           outputs=str(copy.parent / "o.json"))
    verify(SHARED, params, expected={})
    metric = json.loads((copy.parent / "m.json").read_text())
    assert metric == {"passed": True, "failed_checks": 0,
                      "checks": len(json.loads((copy.parent / "v.json").read_text())["checks"])}
    rows = {r["output"]: r for r in json.loads((copy.parent / "o.json").read_text())}
    assert set(rows) >= {"clip_grid/coco_val2017", "siglip", "sam2", "point_feats"}
    assert all(r["written"] > 0 for r in rows.values())
