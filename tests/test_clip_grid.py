"""extract_clip_grid and the shared grid machinery (featcache.stages._grids), on tiny open_clip models
and generated images; shapes of the real ViT-B/16, ViT-L/14, ViT-B/32 on the meta device."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from featcache.stages.extract_clip_grid import STAGE, ClipGridParams, extract_clip_grid, plan_clip_grid
from featcache.config import ParamError, SharedParams, build_dataclass, load_stage_params
from featcache.encoders import TINY_DINOV2, TINY_OPENCLIP, Preprocessor, resolve_spec
from featcache.stages._grid_geometry import alpha_grid, arrange_grid, check_target_grid, pool_grid
from featcache.stages._grids import build_grid_job, image_key

REPO = Path(__file__).resolve().parents[1]
TINY = SharedParams(model=TINY_OPENCLIP, weights="random", device="cpu", seed=0)
TINY_WIDTH, TINY_EMBED = 64, 32


def write_split(folder: Path) -> None:
    """COCO-named JPEGs, a duplicate id, RGBA, a fully transparent and a white image,
    grayscale, and a truncated JPEG."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for name in ("000000000139.jpg", "COCO_val2014_000000000285.jpg", "139.png"):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), np.uint8)).save(folder / name)
    rgba = rng.integers(0, 256, (40, 40, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[:, :20, 3] = 0
    Image.fromarray(rgba, "RGBA").save(folder / "cutout.png")
    rgba[..., 3] = 0
    Image.fromarray(rgba, "RGBA").save(folder / "transparent.png")
    Image.fromarray(np.full((40, 40, 3), 255, np.uint8)).save(folder / "white.png")
    Image.fromarray(rng.integers(0, 256, (30, 50), np.uint8), "L").save(folder / "gray.png")
    (folder / "broken.jpg").write_bytes((folder / "000000000139.jpg").read_bytes()[:200])


def make_params(root: Path, **overrides: Any) -> ClipGridParams:
    values = {"root": str(root), "out": str(root / "out"),
              "splits": [{"name": "val", "images": "imgs"}], "num_workers": 0,
              "batch_size": 3, "max_failures": 0.5, "dtype": "fp32", **overrides}
    return build_dataclass(ClipGridParams, values, STAGE)


def run(root: Path, **overrides: Any) -> Path:
    params = make_params(root, **overrides)
    extract_clip_grid(TINY, params)
    return Path(params.out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """One split extracted four ways (run once for the whole module)."""
    root = tmp_path_factory.mktemp("clip")
    write_split(root / "imgs")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        yield {"fp32": run(root, out="fp32", num_workers=2, layout="hdf5"),
               "fp16": run(root, out="fp16", dtype="fp16"),
               "grid7": run(root, out="grid7", grid=7, save_global=False),
               "npy": run(root, out="npy", layout="npy", save_meta=True),
               "root": root}


def read_h5(path: Path) -> dict[str, np.ndarray]:
    """Every ``{key}_{field}`` of a grid output: a sharded folder (read through the reader)
    or an HDF5 file (read the FSGR seed's way, with h5py)."""
    if path.is_dir():
        from featcache.reader import open_features

        return {f"{k}_{field}": v for field in open_features(path).fields()
                for k, v in open_features(path, field=field).items()}
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in f}


@pytest.mark.parametrize("name, rule, key", [
    ("000000000139.jpg", "image_id", "139"), ("COCO_train2014_000000000009.jpg", "image_id", "9"),
    ("3.jpg", "image_id", "3"), ("rgb_photo.png", "image_id", "rgb_photo"),
    ("sa_12.jpg", "image_id", "sa_12"), ("000000000139.jpg", "stem", "000000000139"),
    ("\u00b2.jpg", "image_id", "\u00b2")])
def test_image_key_rules(name: str, rule: str, key: str) -> None:
    assert image_key(name, rule) == key


def test_pool_grid_averages_non_overlapping_blocks() -> None:
    grid = torch.arange(2 * 14 * 14, dtype=torch.float32).reshape(1, 2, 14, 14)
    pooled = pool_grid(grid, 7)
    assert pooled.shape == (1, 2, 7, 7)
    assert pooled[0, 1, 3, 5] == grid[0, 1, 6:8, 10:12].mean()
    assert pool_grid(grid, 0) is grid and pool_grid(grid, 14) is grid
    odd = torch.randn(1, 3, 7, 7)
    assert pool_grid(odd, 7) is odd  # ViT-B/32 at 224: grid 7 is the native grid
    tokens = arrange_grid(grid, 7, "tokens")
    assert tokens.shape == (1, 49, 2) and tokens[0, 3 * 7 + 5, 1] == pooled[0, 1, 3, 5]


def test_target_grid_must_divide_the_native_grid() -> None:
    assert check_target_grid((14, 14), 0) == 14
    assert check_target_grid((14, 14), 7) == 7
    assert check_target_grid((7, 7), 7) == 7
    with pytest.raises(ParamError, match=r"grid: 7 does not divide .* 16x16 .*\[1, 2, 4, 8, 16\]"):
        check_target_grid((16, 16), 7)
    with pytest.raises(ParamError, match="grid"):
        check_target_grid((7, 7), 14)


def test_alpha_mask_is_the_area_average_per_cell() -> None:
    pre = Preprocessor(resolve_spec("open_clip", TINY_OPENCLIP, weights="random"))
    alpha = np.zeros((224, 224), np.uint8)
    alpha[:, 112:] = 255
    native = alpha_grid(alpha, (224, 224), pre, 0)
    assert native.shape == (14, 14) and native.dtype == np.float32
    np.testing.assert_array_equal(native[:, :7], 0)
    np.testing.assert_array_equal(native[:, 7:], 1)
    pooled = alpha_grid(alpha, (224, 224), pre, 2)
    np.testing.assert_allclose(pooled, [[0, 1], [0, 1]])
    wide = np.zeros((224, 448), np.uint8)  # centre crop keeps x in [112, 336)
    wide[:, 224:] = 255
    np.testing.assert_array_equal(alpha_grid(wide, (224, 448), pre, 0)[:, 7:], 1)
    np.testing.assert_array_equal(alpha_grid(wide, (224, 448), pre, 0)[:, :7], 0)
    big = np.kron(alpha, np.ones((2, 2), np.uint8))  # downscaled by 2 with area averaging
    np.testing.assert_array_equal(alpha_grid(big, (448, 448), pre, 0), native)
    np.testing.assert_array_equal(alpha_grid(None, (10, 10), pre, 7), np.ones((7, 7)))


def test_job_is_picklable_for_spawned_workers(tmp_path: Path) -> None:
    from featcache.datasets.images import list_images

    write_split(tmp_path / "imgs")
    pre = Preprocessor(resolve_spec("open_clip", TINY_OPENCLIP, weights="random"))
    paths = list_images(tmp_path / "imgs")
    job = build_grid_job(tmp_path / "imgs", paths, "image_id", pre, (255, 255, 255), 7)
    copy = pickle.loads(pickle.dumps(job))
    piece, same = job.load("cutout.png")[0], copy.load("cutout.png")[0]
    assert piece.key == same.key == "cutout" and piece.tensor.shape == (3, 224, 224)
    assert torch.equal(piece.tensor, same.tensor)
    np.testing.assert_array_equal(piece.arrays["mask"], same.arrays["mask"])
    assert copy.load("139.png")[0].error == "duplicate_key"
    assert copy.load("broken.jpg")[0].error == "bad_image"


@pytest.mark.parametrize("model, grid, shape", [
    ("ViT-B-16", 0, (196, 768)), ("ViT-B-16", 7, (49, 768)), ("ViT-L-14", 0, (256, 1024)),
    ("ViT-L-14", 8, (64, 1024)), ("ViT-B-32", 7, (49, 768))])
def test_real_architectures_give_the_documented_shapes(model: str, grid: int,
                                                       shape: tuple[int, int]) -> None:
    """The real towers, built on the meta device (shapes only, no weights, no compute)."""
    import open_clip

    from featcache.encoders.openclip import OpenClipEncoder

    plan = plan_clip_grid(SharedParams(model=model), make_params(Path("."), grid=grid))
    with torch.device("meta"):
        visual = open_clip.create_model(model, pretrained=None, device="meta").visual
    encoder = OpenClipEncoder(plan.spec, "meta", visual.eval())
    with torch.inference_mode():
        out = encoder(torch.zeros(2, 3, *plan.spec.input_size, device="meta"))
    assert tuple(arrange_grid(out.grid, plan.grid, plan.array_layout).shape) == (2, *shape)


def test_vit_l14_rejects_grid_7_before_work(tmp_path: Path) -> None:
    with pytest.raises(ParamError, match=r"extract_clip_grid\.grid: 7 does not divide"):
        extract_clip_grid(SharedParams(model="ViT-L-14"), make_params(tmp_path, grid=7))


def test_hdf5_layout_keys_shapes_and_failures(runs: dict[str, Path]) -> None:
    data = read_h5(runs["fp32"] / "val.h5")
    shards = read_h5(runs["fp32"] / "val")
    assert set(shards) == set(data)
    assert all(np.array_equal(shards[k], data[k]) for k in data)   # the view is the shards
    keys = {"139", "285", "cutout", "transparent", "white", "gray"}
    assert set(data) == {f"{k}_grids" for k in keys} | {f"{k}_global" for k in keys}
    assert data["139_grids"].shape == (196, TINY_WIDTH) and data["139_grids"].dtype == np.float32
    assert data["285_global"].shape == (TINY_EMBED,)
    failures = (runs["fp32"] / "failures.tsv").read_text().splitlines()
    rows = {line.split("\t")[1]: line.split("\t")[2] for line in failures[1:]}
    assert rows == {"broken.jpg": "bad_image", "139.png": "duplicate_key"}


def test_hdf5_attributes_and_provenance(runs: dict[str, Path]) -> None:
    with h5py.File(runs["fp32"] / "val.h5", "r") as f:
        attrs = dict(f.attrs)
    assert attrs["model"] == TINY_OPENCLIP and attrs["weights"] == "random"
    assert attrs["weights_id"] == "random(seed=0)" and attrs["grid"] == 14
    assert len(attrs["code_version"]) == 64 and attrs["layout"] == "hdf5"
    prov = json.loads(attrs["provenance"])
    assert prov["preprocessing"]["input_size"] == [224, 224]
    assert prov["preprocessing"]["resize"] == "shortest_crop" and prov["grid"] == 14
    assert prov["array_layout"] == "tokens" and prov["key_rule"] == "image_id"


def test_transparent_pixels_are_composited_over_the_background(runs: dict[str, Path]) -> None:
    data = read_h5(runs["fp32"] / "val")
    np.testing.assert_allclose(data["transparent_grids"], data["white_grids"], atol=1e-5)
    assert not np.allclose(data["cutout_grids"], data["white_grids"], atol=1e-2)


def test_grid_7_is_the_2x2_average_of_the_native_grid(runs: dict[str, Path]) -> None:
    native, pooled = read_h5(runs["fp32"] / "val"), read_h5(runs["grid7"] / "val")
    assert set(pooled) == {k for k in native if k.endswith("_grids")}
    for key, tokens in pooled.items():
        grid = native[key].reshape(7, 2, 7, 2, TINY_WIDTH).mean(axis=(1, 3)).reshape(49, -1)
        assert tokens.shape == (49, TINY_WIDTH)
        np.testing.assert_allclose(tokens, grid, rtol=1e-5, atol=1e-5)


def test_fp16_agrees_with_fp32_to_fp16_precision(runs: dict[str, Path]) -> None:
    full, half = read_h5(runs["fp32"] / "val"), read_h5(runs["fp16"] / "val")
    assert set(full) == set(half)
    for key, value in full.items():
        assert half[key].dtype == np.float16
        err = np.abs(half[key].astype(np.float32) - value)
        assert np.all(err <= np.abs(value) * 2.0**-11 + 2.0**-24), key


def test_npy_layout_masks_and_meta(runs: dict[str, Path]) -> None:
    folder, tokens = runs["npy"] / "val", read_h5(runs["fp32"] / "val")
    grid = np.load(folder / "000000000139.npy")
    assert grid.shape == (TINY_WIDTH, 14, 14)
    np.testing.assert_allclose(grid, tokens["139_grids"].reshape(14, 14, -1).transpose(2, 0, 1),
                               atol=1e-6)
    mask = np.load(folder / "cutout_mask.npy")
    assert mask.shape == (14, 14)
    assert np.all(mask[:, :6] == 0) and np.all(mask[:, 8:] == 1)
    assert not (folder / "gray_mask.npy").exists()  # no alpha, no mask
    assert json.loads((folder / "gray.json").read_text())["mask"] is None
    assert (folder / "139.npy").is_file()  # the stem rule keeps both files
    meta = json.loads((folder / "cutout.json").read_text())
    assert meta["has_alpha"] and (meta["width"], meta["height"]) == (40, 40)
    assert meta["shape"] == [TINY_WIDTH, 14, 14] and meta["mask"] == "cutout_mask.npy"
    assert not json.loads((folder / "gray.json").read_text())["has_alpha"]
    assert not (folder / "broken.json").exists()
    failures = (runs["npy"] / "failures.tsv").read_text().splitlines()
    assert [row.split("\t")[:2] for row in failures[1:]] == [["val", "broken.jpg"]]
    metrics = json.loads((runs["root"] / "metrics" / f"{STAGE}.json").read_text())
    assert metrics["failed"] == 1 and metrics["records"] == 7  # the npy run came last


@pytest.mark.parametrize("key, value, match", [
    ("splits", [], "splits: must list"), ("grid", -1, "grid: must be 0"),
    ("background", [0, 0, 300], "background"), ("layout", "zarr", "layout"),
    ("compression", "gzip", "compression: applies to the shards and hdf5 layouts"),
    ("save_meta", True, "save_meta: per-image JSON")])
def test_bad_params_name_the_key(tmp_path: Path, key: str, value: object, match: str) -> None:
    overrides = {key: value, "layout": "npy"} if key == "compression" else {key: value}
    with pytest.raises(ParamError, match=f"{STAGE}.{match}"):
        make_params(tmp_path, **overrides)


def test_missing_or_empty_split_fails_before_loading_a_model(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import featcache.encoders

    monkeypatch.setattr(featcache.encoders, "load_encoder", lambda *a: pytest.fail("loaded"))
    write_split(tmp_path / "imgs")
    splits = [{"name": "val", "images": "imgs"}, {"name": "train", "images": "nowhere"}]
    with pytest.raises(ParamError, match=r"splits\[1\]\.images: split 'train': folder not found"):
        extract_clip_grid(TINY, make_params(tmp_path, splits=splits))
    (tmp_path / "empty").mkdir()
    splits[1]["images"] = "empty"
    with pytest.raises(ParamError, match=r"splits\[1\]\.images: split 'train': no images"):
        extract_clip_grid(TINY, make_params(tmp_path, splits=splits))
    with pytest.raises(ParamError, match="model: unknown open_clip model"):
        extract_clip_grid(SharedParams(model="ViT-B-161"), make_params(tmp_path))
    assert not (tmp_path / "out").exists()


def test_repository_params_section_is_valid() -> None:
    shared, params = load_stage_params(STAGE, ClipGridParams, REPO / "params.yaml")
    assert params.splits and plan_clip_grid(shared, params).grid > 0


# --- real dvc: `dvc exp run -S model=...` ------------------------------------------------------

DVC_PARAMS = {
    "model": TINY_OPENCLIP, "weights": "random", "seed": 0, "data": "data/raw",
    "weights_dir": "data/weights", "checkpoints": "checkpoints",
    "runtime": {"device": "cpu", "num_workers": 0},
    "extract_clip_grid": {"out": "data/features/clip_grid",
                          "metrics": "metrics/extract_clip_grid.json",
                          "splits": [{"name": "val", "images": "imgs"}]},
    "extract_dinov2": {"out": "data/features/dinov2",
                       "metrics": "metrics/extract_dinov2.json",
                       "model": TINY_DINOV2, "size": 56,
                       "splits": [{"name": "val", "images": "imgs"}]},
}
SUMMARIZE = """import json, featcache
grids = featcache.open_features("data/features/clip_grid/val")
json.dump({k: list(grids[k].shape) for k in grids}, open("summary.json", "w"))
"""


def dvc_repo(repo: Path) -> Path:
    """A git+DVC repo with the real extract_clip_grid/extract_dinov2 stages of dvc.yaml plus a
    stage reading the CLIP grids (a dependent), on three generated JPEGs."""
    shutil.copytree(REPO / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__"))
    for stage in ("extract_clip_grid", "extract_dinov2"):
        (repo / "stages").mkdir(exist_ok=True)
        shutil.copy(REPO / "stages" / f"{stage}.py", repo / "stages")
    real = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    stages = {k: real[k] for k in ("extract_clip_grid", "extract_dinov2")}
    stages["summarize"] = {"cmd": "python summarize.py", "outs": ["summary.json"],
                           "deps": ["summarize.py", "${extract_clip_grid.out}"]}
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    (repo / "params.yaml").write_text(yaml.safe_dump(DVC_PARAMS, sort_keys=False))
    (repo / "summarize.py").write_text(SUMMARIZE)
    (repo / ".dvcignore").write_text("__pycache__/\n*.pyc\n.featcache/\n")
    (repo / ".gitignore").write_text(".featcache/\n__pycache__/\n")
    rng = np.random.default_rng(3)
    (repo / "data" / "raw" / "imgs").mkdir(parents=True)
    for folder in ("data/weights", "checkpoints"):  # the weights folders every model stage reads
        (repo / folder).mkdir(parents=True)
        (repo / folder / ".keep").write_text("")
    for i in (1, 2, 3):
        Image.fromarray(rng.integers(0, 256, (40, 60, 3), np.uint8)).save(
            repo / "data" / "raw" / "imgs" / f"{i:012d}.jpg")
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"],
                ["git", "commit", "-qm", "init"]):
        dvc_sh(cmd, repo)
    return repo


def dvc_sh(cmd: list[str], cwd: Path) -> str:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               DVC_NO_ANALYTICS="1", DVC_SITE_CACHE_DIR=str(cwd.parent / "dvc-site"),
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def ran_stages(log: str) -> set[str]:
    return {line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage '")}


def sha256(path: Path) -> str:
    """Of a file, or of a folder's files (names and bytes)."""
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


@pytest.mark.slow
def test_dvc_exp_run_switches_model_and_back_from_the_run_cache(tmp_path: Path) -> None:
    from featcache.encoders import TINY_SIGLIP

    repo = dvc_repo(tmp_path / "repo")
    h5 = repo / "data" / "features" / "clip_grid" / "val"
    first = dvc_sh(["dvc", "repro"], repo)
    assert ran_stages(first) == {"extract_clip_grid", "extract_dinov2", "summarize"}, first
    baseline, summary = sha256(h5), json.loads((repo / "summary.json").read_text())
    assert summary == {"1": [196, TINY_WIDTH], "2": [196, TINY_WIDTH], "3": [196, TINY_WIDTH]}
    dvc_sh(["git", "add", "-A"], repo)
    dvc_sh(["git", "commit", "-qm", "baseline"], repo)

    other = dvc_sh(["dvc", "exp", "run", "-S", f"model={TINY_SIGLIP}"], repo)
    assert ran_stages(other) == {"extract_clip_grid", "summarize"}, other
    assert sha256(h5) != baseline
    assert json.loads((repo / "summary.json").read_text())["1"] == [100, 96]  # 160/16, width 96

    back = dvc_sh(["dvc", "exp", "run", "-S", f"model={TINY_OPENCLIP}"], repo)
    assert ran_stages(back) == set(), back
    assert "Stage 'extract_clip_grid' is cached - skipping run" in back, back
    assert sha256(h5) == baseline
    assert json.loads((repo / "summary.json").read_text()) == summary


@pytest.mark.slow
def test_dvc_adding_a_split_recomputes_only_that_split(tmp_path: Path) -> None:
    """DVC deletes the stage's outputs before running it; the shards of the splits that did
    not change come back from DVC's cache (via the previous dvc.lock), linked, not computed."""
    repo = dvc_repo(tmp_path / "repo")
    dvc_sh(["dvc", "repro", "extract_clip_grid"], repo)
    val = repo / "data" / "features" / "clip_grid" / "val"
    baseline = sha256(val)
    rng = np.random.default_rng(4)
    (repo / "data" / "raw" / "more").mkdir()
    for i in (7, 8):
        Image.fromarray(rng.integers(0, 256, (40, 60, 3), np.uint8)).save(
            repo / "data" / "raw" / "more" / f"{i:012d}.jpg")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["extract_clip_grid"]["splits"].append({"name": "more", "images": "more"})
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    log = dvc_sh(["dvc", "repro", "extract_clip_grid"], repo)
    assert ran_stages(log) == {"extract_clip_grid"}, log
    metrics = json.loads((repo / "metrics" / "extract_clip_grid.json").read_text())
    assert (metrics["computed"], metrics["reused"], metrics["items"]) == (2, 3, 5), metrics
    assert sha256(val) == baseline
    status = dvc_sh(["dvc", "status", "extract_clip_grid"], repo)
    assert "up to date" in status, status
    assert featcache_reads(val) == 3


def featcache_reads(folder: Path) -> int:
    from featcache.reader import open_features

    store = open_features(folder)
    return sum(1 for k in store if store[k].shape == (196, TINY_WIDTH))


@pytest.mark.slow
def test_dvc_records_a_run_made_by_array_tasks(tmp_path: Path) -> None:
    """Slurm-array style: tasks compute shard ranges with FEATCACHE_SHARDS (the stage command
    is unchanged), then `dvc repro` finds every shard, computes nothing, records dvc.lock."""
    repo = dvc_repo(tmp_path / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["extract_clip_grid"]["shard_mb"] = 0.02   # ~1 image (25 KB) a shard: 3 shards
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ)
    for k in range(2):
        env["FEATCACHE_SHARDS"] = f"{k}/2"
        proc = subprocess.run([sys.executable, "stages/extract_clip_grid.py"], cwd=repo, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        assert not (repo / "data" / "features" / "clip_grid").exists()
    log = dvc_sh(["dvc", "repro", "extract_clip_grid"], repo)
    metrics = json.loads((repo / "metrics" / "extract_clip_grid.json").read_text())
    assert (metrics["computed"], metrics["reused"]) == (0, 3) and metrics["shards"] >= 2, log
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["extract_clip_grid"]
    assert lock["outs"][0]["path"] == "data/features/clip_grid"
    assert "up to date" in dvc_sh(["dvc", "status", "extract_clip_grid"], repo)
