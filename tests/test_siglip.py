"""extract_siglip: crop geometry, every edge case of the job, both layouts end to end, batching
across images, and equivalence with open_clip's own transform + encode_image.

Runs the tiny open_clip SigLIP (``featcache-tiny-siglip``: timm test_vit3, 160 px, D = 96) on
generated COCO-panoptic splits (``SplitBuilder`` from test_coco_panoptic.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import featcache
from featcache.config import ParamError, SharedParams, build_dataclass
from featcache.encoders import TINY_SIGLIP, Preprocessor, register_tiny_models, resolve_spec
from featcache.engine import Batch, Failure, Piece, TooManyFailures
from featcache.stages.extract_siglip import (SiglipCompute, SiglipParams, blend_background, build_siglip_job,
                              crop_box, extract_siglip, run_siglip)
from test_coco_panoptic import SplitBuilder, blocks

STAGE_SCRIPT = Path(__file__).resolve().parents[1] / "stages" / "extract_siglip.py"
FILL = (124, 116, 104)
DIM = 96  # embed_dim of featcache-tiny-siglip (checked against its config below)


def rect_labels() -> np.ndarray:
    """64x96 background id 5 with a rectangle id 42 at rows 10..29, columns 20..49."""
    labels = np.full((64, 96), 5, np.int64)
    labels[10:30, 20:50] = 42
    return labels


def build_edge_split(root: Path) -> dict[str, list[str]]:
    """Every edge case of issue 5 in one split; returns expected keys and failure items."""
    b = SplitBuilder(root)
    b.add(1, rect_labels())
    tiny = blocks(ids=(7, 300))
    tiny[20:22, 40:43] = 9                                   # a 6-pixel segment
    tiny[0, 0] = 10                                          # a 1-pixel segment in a corner
    b.add(2, tiny, crowd=(300,))                             # 300 is a crowd segment
    ann = b.add(3, blocks(ids=(7, 300)))
    ann["segments_info"].append({"id": 55, "category_id": 1, "iscrowd": 0})  # not in the PNG
    b.add(4, blocks(), png=False)                            # missing PNG
    b.add(5, blocks(), png_labels=blocks(40, 64))            # PNG smaller than the image
    b.add(6, blocks(ids=(3, 4)), mode="L")                   # grayscale JPEG
    b.add(7, blocks(ids=(3, 4)), mode="CMYK")                # CMYK JPEG
    b.write()
    keys = ["000000000001_5", "000000000001_42", "000000000002_7", "000000000002_9",
            "000000000002_10", "000000000002_300", "000000000003_7", "000000000003_300",
            "000000000006_3", "000000000006_4", "000000000007_3", "000000000007_4"]
    failures = [("000000000003_55", "empty_mask"), ("000000000004", "missing_file"),
                ("000000000005", "size_mismatch")]
    return {"keys": keys, "failures": failures}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A seeded open_clip tiny SigLIP and its checkpoint file (the ``weights: <path>`` route)."""
    import open_clip

    register_tiny_models()
    torch.manual_seed(3)
    model = open_clip.create_model(TINY_SIGLIP).eval()
    path = tmp_path_factory.mktemp("weights") / "tiny_siglip.pt"
    torch.save(model.state_dict(), path)
    return model, path


@pytest.fixture(scope="module")
def edge_split(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    return root, build_edge_split(root)


def make_params(coco: Path, out: Path, **kw) -> SiglipParams:
    values = dict(coco=str(coco), split="val2017", out=str(out), model=TINY_SIGLIP,
                  batch_size=5, num_workers=0, max_failures=5)
    return SiglipParams(**{**values, **kw})


def run_extract(tmp_path: Path, coco: Path, weights: str, **kw):
    """extract_siglip into ``tmp_path/out``, run from ``tmp_path`` (scratch and metrics/ are
    relative to the working directory)."""
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        params = make_params(coco, tmp_path / "out", **kw)
        shared = SharedParams(weights=weights, checkpoints=str(Path(weights).parent),
                              device="cpu")  # a checkpoint lies in a folder the stage depends on
        return params, extract_siglip(shared, params)
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def hdf5_run(tmp_path_factory, edge_split, tiny_model):
    """The hdf5 layout (shards + the packed view) on the edge-case split, with the
    checkpoint's weights."""
    work = tmp_path_factory.mktemp("hdf5_run")
    _, result = run_extract(work, edge_split[0], str(tiny_model[1]), layout="hdf5")
    return work / "out", result


def read_tsv(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text().splitlines()]


@pytest.mark.parametrize("key, value, fragment", [
    ("bg_alpha", 1.5, "[0, 1]"), ("pad_ratio", -0.1, "[0, 10]"), ("fill", [1, 2], "RGB"),
    ("fill", [0, 0, 256], "0..255"), ("min_crop", 0, ">= 1"), ("layout", "zarr", "allowed"),
    ("coco", " ", "empty"), ("batch_size", 0, ">= 1"), ("colour", 1, "unknown key")])
def test_bad_params_name_the_key(key, value, fragment):
    values = {"coco": "c", "split": "val2017", "out": "o", key: value}
    with pytest.raises(ParamError) as err:
        build_dataclass(SiglipParams, values, prefix="extract_siglip")
    assert f"extract_siglip.{key}" in str(err.value) and fragment in str(err.value)


@pytest.mark.parametrize("bbox, hw, pad, min_crop, expected", [
    ((20, 10, 60, 30), (100, 200), 0.1, 8, (16, 8, 64, 32)),       # pad 4 px and 2 px
    ((0, 0, 10, 50), (100, 200), 0.1, 1, (0, 0, 11, 55)),          # clipped at the border
    ((5, 5, 7, 9), (100, 200), 0.25, 1, (4, 4, 8, 10)),             # 0.5 px rounds up to 1
    ((50, 50, 51, 51), (100, 100), 0.1, 32, (34, 34, 66, 66)),     # 1 px grows to 32
    ((0, 0, 1, 1), (100, 100), 0.1, 32, (0, 0, 32, 32)),           # ... shifted inside
    ((99, 99, 100, 100), (100, 100), 0.1, 32, (68, 68, 100, 100)),
    ((5, 5, 6, 6), (10, 20), 0.1, 32, (0, 0, 20, 10)),             # image smaller than 32
    ((0, 0, 200, 100), (100, 200), 0.1, 32, (0, 0, 200, 100)),     # whole image
])
def test_crop_box_hand_computed(bbox, hw, pad, min_crop, expected):
    assert crop_box(bbox, *hw, pad, min_crop) == expected


def test_crop_box_always_contains_the_mask_and_stays_inside():
    rng = np.random.default_rng(0)
    for _ in range(500):
        h, w = (int(v) for v in rng.integers(1, 80, 2))
        x0, x1 = sorted(int(v) for v in rng.choice(w + 1, 2, replace=False)) if w > 1 else (0, 1)
        y0, y1 = sorted(int(v) for v in rng.choice(h + 1, 2, replace=False)) if h > 1 else (0, 1)
        min_crop = int(rng.integers(1, 40))
        bx0, by0, bx1, by1 = crop_box((x0, y0, x1, y1), h, w, float(rng.uniform(0, 1)), min_crop)
        assert 0 <= bx0 <= x0 < x1 <= bx1 <= w and 0 <= by0 <= y0 < y1 <= by1 <= h
        assert bx1 - bx0 >= min(min_crop, w) and by1 - by0 >= min(min_crop, h)


def test_blend_keeps_mask_pixels_and_mixes_the_background_with_fill():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (12, 9, 3), dtype=np.uint8)
    mask = rng.random((12, 9)) < 0.4
    out = blend_background(rgb, mask, 0.3, FILL)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out[mask], rgb[mask])
    expected = np.rint(0.3 * rgb.astype(np.float64) + 0.7 * np.array(FILL))
    np.testing.assert_allclose(out[~mask], expected[~mask], atol=1)
    assert (blend_background(rgb, mask, 0.0, FILL)[~mask] == FILL).all()
    np.testing.assert_array_equal(blend_background(rgb, mask, 1.0, FILL), rgb)


def hand_crop(image: Path, labels: np.ndarray, seg: int, rows: slice, cols: slice) -> np.ndarray:
    """The blended crop written out by hand (PIL decode, numpy formula)."""
    img = np.asarray(Image.open(image).convert("RGB"))[rows, cols].astype(np.float32)
    m = (labels[rows, cols] == seg)[..., None]
    out = m * img + (1 - m) * (0.3 * img + 0.7 * np.array(FILL, np.float32))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def test_job_load_handles_every_edge_case(edge_split):
    root, expected = edge_split
    spec = resolve_spec("open_clip", TINY_SIGLIP, weights="random")
    job = build_siglip_job(make_params(root, root / "unused"), spec)
    loaded = {item: job.load(item) for item in job.items()}
    pieces = {p.key: p for out in loaded.values() for p in out if isinstance(p, Piece)}
    failures = sorted((f.item, f.error) for out in loaded.values() for f in out
                      if isinstance(f, Failure))
    assert sorted(pieces) == sorted(expected["keys"])
    assert failures == sorted(expected["failures"])
    assert all(tuple(p.tensor.shape) == (3, 160, 160) for p in pieces.values())
    crowd = {k: int(p.arrays["iscrowd"]) for k, p in pieces.items()}
    assert crowd["000000000002_300"] == 1 and sum(crowd.values()) == 1
    assert int(pieces["000000000002_9"].arrays["segment_id"]) == 9
    assert int(pieces["000000000002_9"].arrays["image_id"]) == 2
    tiny = blocks(ids=(7, 300))
    tiny[20:22, 40:43] = 9
    jpg = root / "val2017" / "000000000002.jpg"
    # 3x2 px at x 40..42, y 20..21: centre (41.5, 21) -> a 32 px box from x 25, y 5
    # workers send the prepared uint8 crop; normalisation happens in compute, on the device
    want = Preprocessor(spec).prepare(hand_crop(jpg, tiny, 9, slice(5, 37), slice(25, 57)))
    torch.testing.assert_close(pieces["000000000002_9"].tensor, want, atol=0, rtol=0)
    for image_id in (6, 7):  # grayscale and CMYK decode to RGB and embed normally
        jpg = root / "val2017" / f"00000000000{image_id}.jpg"
        want = Preprocessor(spec).prepare(hand_crop(jpg, blocks(ids=(3, 4)), 3, slice(0, 48),
                                                    slice(0, 35)))
        torch.testing.assert_close(pieces[f"00000000000{image_id}_3"].tensor, want,
                                   atol=0, rtol=0)


def test_missing_or_corrupt_image_is_one_failure(tmp_path):
    b = SplitBuilder(tmp_path)
    b.add(1, blocks())
    b.add(2, blocks())
    b.write()
    (tmp_path / "val2017" / "000000000001.jpg").unlink()
    (tmp_path / "val2017" / "000000000002.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    job = build_siglip_job(make_params(tmp_path, tmp_path / "o"),
                           resolve_spec("open_clip", TINY_SIGLIP, weights="random"))
    for item in job.items():
        (failure,) = job.load(item)
        assert failure.item == item and failure.error == "bad_image"


def test_hdf5_layout_end_to_end(hdf5_run, edge_split):
    import open_clip

    _, expected = edge_split
    out, result = hdf5_run
    with h5py.File(out / "embeddings.h5", "r") as f:
        keys = [k.decode() for k in f["keys"][:]]
        emb, image_id = f["embeddings"][:], f["image_id"][:]
        segment_id, iscrowd = f["segment_id"][:], f["iscrowd"][:]
    assert keys == expected["keys"] and result.records == len(keys)
    assert emb.dtype == np.float16 and emb.shape == (len(keys), DIM)
    assert open_clip.get_model_config(TINY_SIGLIP)["embed_dim"] == DIM
    np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1, atol=1e-3)
    assert [f"{i:012d}_{s}" for i, s in zip(image_id, segment_id)] == keys
    assert iscrowd.tolist() == [int(k == "000000000002_300") for k in keys]
    rows = read_tsv(out / "inst2feat.tsv")
    assert rows[0] == ["image_id", "segment_id", "feat_file"]
    assert rows[1:] == [[k[:12], k[13:], f"embeddings.h5#{i}"] for i, k in enumerate(keys)]
    assert sorted((r[1], r[2]) for r in read_tsv(out / "failures.tsv")[1:]) == \
        sorted(expected["failures"])
    assert result.failed == 3  # images 3 (one segment), 4 and 5
    store = featcache.open_features(out)   # the shards hold the same rows as the view
    assert list(store) == keys and np.array_equal(np.stack([store[k] for k in keys]), emb)


def test_shards_layout_index_points_into_the_shards(tmp_path, edge_split, tiny_model, hdf5_run):
    from featcache.engine.shards import ShardReader

    run_extract(tmp_path, edge_split[0], str(tiny_model[1]))
    out = tmp_path / "out"
    assert not (out / "embeddings.h5").exists() and (out / "index.h5").is_file()
    rows = read_tsv(out / "inst2feat.tsv")[1:]
    assert [f"{r[0]}_{r[1]}" for r in rows] == edge_split[1]["keys"]
    packed = featcache.open_features(hdf5_run[0] / "embeddings.h5")
    for image, segment, feat_file in rows:
        shard, row = feat_file.split("#")
        with ShardReader(out / shard) as r:
            np.testing.assert_array_equal(r.read("embeddings", int(row)),
                                          packed[f"{image}_{segment}"])


def test_one_crop_equals_open_clip_transform_and_encode_image(hdf5_run, edge_split, tiny_model):
    """open_clip's own SigLIP transform (the webli tag's settings) + encode_image on a crop
    written out by hand, against the stored fp16 row."""
    import open_clip

    root, _ = edge_split
    model, _ = tiny_model
    with h5py.File(hdf5_run[0] / "embeddings.h5", "r") as f:
        keys = [k.decode() for k in f["keys"][:]]
        emb = f["embeddings"][:]
    assert {k: v for k, v in open_clip.get_pretrained_cfg("ViT-B-16-SigLIP", "webli").items()
            if k in ("mean", "std", "interpolation", "resize_mode")} == {
        "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bicubic",
        "resize_mode": "squash"}
    transform = open_clip.image_transform(160, is_train=False, mean=(0.5,) * 3, std=(0.5,) * 3,
                                          interpolation="bicubic", resize_mode="squash")
    # columns 20..49 padded by 3 -> 17..52; rows 10..29 padded by 2 -> 8..31 is 24 px, fewer
    # than min_crop, so 32 rows around the centre row 20 -> 4..35
    crop = hand_crop(root / "val2017" / "000000000001.jpg", rect_labels(), 42,
                     slice(4, 36), slice(17, 53))
    with torch.no_grad():
        ref = model.encode_image(transform(Image.fromarray(crop))[None])[0]
    ref = torch.nn.functional.normalize(ref, dim=0).numpy()
    stored = emb[keys.index("000000000001_42")].astype(np.float32)
    assert float(stored @ ref) >= 0.999
    assert float(emb[keys.index("000000000001_5")].astype(np.float32) @ ref) < 0.999


def test_npy_layout_is_the_seeds_and_equals_hdf5(tmp_path, edge_split, tiny_model, hdf5_run):
    root, expected = edge_split
    run_extract(tmp_path, root, str(tiny_model[1]), layout="npy", num_workers=2)
    out = tmp_path / "out"
    rows = read_tsv(out / "inst2feat.tsv")
    assert rows[0] == ["image_id", "segment_id", "feat_file"]
    assert rows[1:] == [[k[:12], k[13:], f"{k}.npy"] for k in expected["keys"]]
    assert sorted(p.name for p in out.glob("*.npy")) == sorted(f"{k}.npy" for k in expected["keys"])
    with h5py.File(hdf5_run[0] / "embeddings.h5", "r") as f:
        packed = f["embeddings"][:]
    for i, key in enumerate(expected["keys"]):
        vec = np.load(out / f"{key}.npy")
        assert vec.dtype == np.float16 and vec.shape == (DIM,)
        np.testing.assert_array_equal(vec, packed[i])
    assert len(read_tsv(out / "failures.tsv")) == 1 + len(expected["failures"])


class CountingCompute(SiglipCompute):
    """Records the keys of every batch the engine hands to the model."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.batches: list[list[str]] = []

    def __call__(self, batch):
        self.batches.append(list(batch.keys))
        return super().__call__(batch)


def test_crops_from_several_images_share_one_forward(tmp_path, monkeypatch):
    from featcache.encoders import load_encoder

    b = SplitBuilder(tmp_path / "coco")
    for image_id in range(1, 6):  # 5 images x 2 segments
        b.add(image_id, blocks(ids=(image_id, 100 + image_id)))
    b.write()
    monkeypatch.chdir(tmp_path)
    params = make_params(tmp_path / "coco", tmp_path / "out", batch_size=4, num_workers=2)
    spec = resolve_spec("open_clip", TINY_SIGLIP, weights="random")
    job = build_siglip_job(params, spec)
    compute = CountingCompute(load_encoder(spec, "cpu"), torch.device("cpu"))
    result = run_siglip(job, compute, params, {"model": TINY_SIGLIP}, {"test": 1})
    assert [len(k) for k in compute.batches] == [4, 4, 2] and result.records == 10
    assert [sorted({k[:12] for k in keys}) for keys in compute.batches] == [
        ["000000000001", "000000000002"], ["000000000003", "000000000004"], ["000000000005"]]


def test_bad_params_fail_before_any_work(tmp_path, edge_split):
    root, _ = edge_split
    cases = [(dict(model="ViT-B-16-SigLIPP"), "random", "extract_siglip.model"),
             (dict(coco=str(tmp_path / "nowhere")), "random", "extract_siglip.coco"),
             (dict(split="train2017"), "random", "extract_siglip.coco"),
             ({}, str(tmp_path / "missing.pt"), "weights")]
    for change, weights, key in cases:
        with pytest.raises(ParamError, match=key.replace(".", r"\.")):
            run_extract(tmp_path, change.pop("coco", root), weights, **change)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".featcache").exists()


def test_too_many_failures_still_writes_the_outputs(tmp_path, edge_split):
    root, expected = edge_split
    with pytest.raises(TooManyFailures):
        run_extract(tmp_path, root, "random", max_failures=0.1)  # 3 of 7 images failed
    assert len(read_tsv(tmp_path / "out" / "inst2feat.tsv")) == 1 + len(expected["keys"])
    assert (tmp_path / "metrics" / "extract_siglip.json").is_file()


def test_stage_script_reports_a_bad_param_in_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text(
        "weights: random\nextract_siglip:\n  coco: c\n  split: val2017\n  out: o\n"
        "  bg_alpha: 2\n")
    proc = subprocess.run([sys.executable, str(STAGE_SCRIPT)], cwd=tmp_path, text=True,
                          capture_output=True, timeout=120)
    assert proc.returncode == 2
    assert "extract_siglip.bg_alpha" in proc.stderr and "Traceback" not in proc.stderr


class BrokenEncoder(torch.nn.Module):
    """Pools to zeros for the first input and NaN for the second."""

    spec = resolve_spec("open_clip", TINY_SIGLIP, weights="random")  # mean/std for compute

    def forward(self, x):
        from featcache.encoders import EncoderOutput

        pooled = torch.ones(x.shape[0], 4)
        pooled[0], pooled[1] = 0.0, float("nan")
        return EncoderOutput(grid=None, pooled=pooled)


def test_compute_refuses_to_store_embeddings_that_are_not_unit_norm():
    batch = Batch(keys=["a_1", "a_2", "a_3"], inputs=torch.zeros(3, 3, 8, 8), arrays={})
    with pytest.raises(FloatingPointError, match=r"\['a_1', 'a_2'\]"):
        SiglipCompute(BrokenEncoder(), torch.device("cpu"), with_ids=False)(batch)


def test_spot_check_recomputes_segments_and_catches_a_tampered_one(hdf5_run, tmp_path):
    import h5py

    from featcache.verify.spotcheck import spot_check_segments

    out, _ = hdf5_run
    good = spot_check_segments(out / "embeddings.h5", n=3)
    assert len(good.keys) == 3 and good.passed(0.999), good
    assert spot_check_segments(out, n=3).min_cosine == good.min_cosine   # shards: the same
    bad = tmp_path / "out"
    shutil.copytree(out, bad)
    for shard in (bad / "shards").glob("*.h5"):
        with h5py.File(shard, "r+") as f:   # every row now belongs to another segment
            f["embeddings"][:] = f["embeddings"][()][::-1]
    tampered = spot_check_segments(bad / "embeddings.h5", n=3)
    assert tampered.keys == good.keys and not tampered.passed(0.999)
