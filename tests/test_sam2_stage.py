"""extract_sam2 end to end on generated images with sam2.1_hiera_t at its real 1024 input.

A forward of hiera_t at 1024 takes seconds on a CPU, so the module runs the stage few times and
shares the runs between tests: one fp32 run (one shard), one fp16 run with one shard per image
(``shard_mb`` small), one fp16 run killed at its second image and resumed, one run without an
image then with it added, and an npz-layout run that reuses the fp16 run's shards (10 image
forwards in all, the official reference included). The weights are a random SAM2 model saved in
the official checkpoint format, loaded through the ``path`` route, so the reference is the
official build (``scalp: 1``) of the same weights.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from encoder_fixtures import real_looking_image
from featcache.verify.checks import Report
from featcache.verify.npz_checks import check_sam2
from featcache.config import ParamError, SharedParams, load_stage_params
from featcache.engine.shards import SHARDS_DIR, read_index
from featcache.reader import open_features
from featcache.stages.extract_sam2 import (STAGE, Sam2Compute, Sam2Job, Sam2Params, build_sam2_job,
                                     extract_sam2, feature_fields, sam2_item_bytes)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "sam2.1_hiera_t"
GOOD = {"sa_1": (60, 90), "sa_2": (80, 44)}   # stem -> (H, W): landscape and portrait
FLOAT_KEYS = ("P4_S16", "P5_S32")
STORED = ["P4_S16", "P5_S32", "feature_flag"]     # the fields of the shards
SEED_KEYS = sorted(STORED + ["IMAGE_EMB_S16"])     # the seed's <stem>_features.npz
ONE_PER_SHARD = 1.0   # shard_mb below one image's 2.5 MiB (fp16): a shard per image


def write_images(folder: Path) -> None:
    """sa_1.jpg (+ its JSON), sa_1.png (same stem), sa_2.png (no JSON), sa_3.jpg truncated."""
    folder.mkdir(parents=True)
    Image.fromarray(real_looking_image(*GOOD["sa_1"], seed=1)).save(folder / "sa_1.jpg",
                                                                    quality=95)
    (folder / "sa_1.json").write_text('{"image": {}, "annotations": []}')
    Image.fromarray(real_looking_image(20, 20, seed=5)).save(folder / "sa_1.png")
    Image.fromarray(real_looking_image(*GOOD["sa_2"], seed=2)).save(folder / "sa_2.png")
    Image.fromarray(real_looking_image(50, 50, seed=3)).save(folder / "sa_3.jpg")
    data = (folder / "sa_3.jpg").read_bytes()
    (folder / "sa_3.jpg").write_bytes(data[:len(data) // 2])


def official_model(seed: int = 123) -> torch.nn.Module:
    """SAM2.1 hiera_t exactly as the sam2 package builds it (official config, scalp=1)."""
    from sam2.build_sam import build_sam2

    torch.manual_seed(seed)
    return build_sam2(f"configs/sam2.1/{CONFIG}.yaml", None, device="cpu")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """Images, an official-format checkpoint of a random model, and the model itself."""
    root = tmp_path_factory.mktemp("sam2")
    write_images(root / "images")
    model = official_model()
    ckpt = root / "sam2_random.pt"
    state = {k: v for k, v in model.state_dict().items() if k.startswith("image_encoder.")}
    torch.save({"model": state}, ckpt)
    return {"root": root, "images": root / "images", "ckpt": ckpt, "model": model}


def write_params(cwd: Path, section: dict, weights: str = "random") -> None:
    """params.yaml with ``section``; its runtime knobs go to ``runtime.extract_sam2``."""
    cwd.mkdir(parents=True, exist_ok=True)
    knobs = {k: v for k, v in section.items() if k in ("batch_size", "num_workers")}
    method = {k: v for k, v in section.items() if k not in knobs}
    doc = {"weights": weights, "seed": 0, "runtime": {"device": "cpu", STAGE: knobs},
           STAGE: method}
    if weights != "random":  # a checkpoint must lie in a folder the stage depends on
        doc["checkpoints"] = str(Path(weights).parent)
    (cwd / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


def run_in(cwd: Path, world: dict, **section: object):
    """Write params.yaml in ``cwd`` and run the stage there (scratch and metrics land there)."""
    section = {"images": str(world["images"]), "out": "out", "config": CONFIG,
               "batch_size": 2, "num_workers": 0, "max_failures": 2, **section}
    write_params(cwd, section, weights=str(world["ckpt"]))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        shared, params = load_stage_params(STAGE, Sam2Params)
        return extract_sam2(shared, params)


def read_out(folder: Path) -> dict[str, dict[str, np.ndarray]]:
    """Every item of the sharded output, through the public reader."""
    store = open_features(folder)
    assert store.layout == "shards"
    return {key: store[key] for key in sorted(store)}


def read_npz(folder: Path) -> dict[str, dict[str, np.ndarray]]:
    """The npz layout's per-image files, read as the seed's tools read them."""
    out = {}
    for path in sorted(folder.glob("*_features.npz")):
        with np.load(path, allow_pickle=False) as z:
            out[path.name[:-len("_features.npz")]] = {k: z[k] for k in z.files}
    return out


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((folder / SHARDS_DIR).glob("*.h5"))}


@pytest.fixture(scope="module")
def fp32_run(world) -> tuple[Path, object]:
    cwd = world["root"] / "fp32"
    return cwd / "out", run_in(cwd, world, dtype="fp32")


@pytest.fixture(scope="module")
def fp16_run(world) -> tuple[Path, object]:
    cwd = world["root"] / "fp16"
    return cwd / "out", run_in(cwd, world, dtype="fp16", shard_mb=ONE_PER_SHARD)


@pytest.fixture(scope="module")
def npz_run(world, fp16_run) -> tuple[Path, object]:
    """Layout npz over a copy of the fp16 output: its shards are found there, not recomputed."""
    cwd = world["root"] / "npz"
    cwd.mkdir()
    shutil.copytree(fp16_run[0], cwd / "out")
    return cwd / "out", run_in(cwd, world, dtype="fp16", shard_mb=ONE_PER_SHARD, layout="npz")


def test_keys_shapes_dtypes_and_flag(fp32_run, fp16_run) -> None:
    for (out, result), dtype in ((fp32_run, np.float32), (fp16_run, np.float16)):
        items = read_out(out)
        assert sorted(items) == ["sa_1", "sa_2"] and result.records == 2
        assert sorted(p.name for p in out.iterdir()) == ["failures.tsv", "index.h5", "shards"]
        for fields in items.values():
            assert list(fields) == STORED   # IMAGE_EMB_S16 (= P4) is not stored twice
            assert fields["P4_S16"].shape == (256, 64, 64)
            assert fields["P5_S32"].shape == (256, 32, 32)
            assert all(fields[k].dtype == dtype for k in FLOAT_KEYS)
            assert fields["feature_flag"].dtype == np.int64 and fields["feature_flag"] == 1
            assert np.isfinite(fields["P5_S32"]).all() and fields["P5_S32"].std() > 0
        p4 = open_features(out, field="P4_S16")
        np.testing.assert_array_equal(p4["sa_2"], items["sa_2"]["P4_S16"])
    assert fp32_run[1].shards == 1 and fp16_run[1].shards == 4   # one per image at ONE_PER_SHARD
    assert len(list((fp16_run[0] / SHARDS_DIR).glob("*.h5"))) == 4


def test_item_bytes_come_from_params() -> None:
    assert sam2_item_bytes(1024, "fp16") == 256 * 64 * 64 * 2 + 256 * 32 * 32 * 2
    assert sam2_item_bytes(1024, "fp32") == 2 * sam2_item_bytes(1024, "fp16")


def test_npz_layout_writes_the_seed_files_and_reuses_the_shards(npz_run, fp16_run) -> None:
    out, result = npz_run
    assert (result.computed, result.reused) == (0, 4)    # a layout switch costs no forward
    assert shard_bytes(out) == shard_bytes(fp16_run[0])  # the same shards, bit for bit
    files, shards = read_npz(out), read_out(out)
    assert sorted(files) == sorted(shards) == ["sa_1", "sa_2"]
    for stem, z in files.items():
        assert sorted(z) == SEED_KEYS
        assert all(z[k].dtype == np.float16 for k in ("P4_S16", "P5_S32", "IMAGE_EMB_S16"))
        assert z["IMAGE_EMB_S16"].tobytes() == z["P4_S16"].tobytes()
        assert z["feature_flag"].dtype == np.int64 and z["feature_flag"].shape == ()
        assert z["feature_flag"] == 1
        for key in STORED:   # shards and npz files read the same arrays
            assert z[key].dtype == shards[stem][key].dtype
            np.testing.assert_array_equal(z[key], shards[stem][key])
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["layout"] == "npz" and prov["suffix"] == "_features"
    assert prov["aliases"] == {"IMAGE_EMB_S16": "P4_S16"}
    assert open_features(out).provenance["layout"] == "npz"
    assert "IMAGE_EMB_S16" not in open_features(fp16_run[0]).provenance["keys"]


def test_p4_equals_official_backbone_fpn2_of_same_weights(world, fp32_run) -> None:
    from sam2.utils.transforms import SAM2Transforms

    transform = SAM2Transforms(resolution=1024, mask_threshold=0.0)
    stems = sorted(GOOD)
    paths = [world["images"] / n for n in ("sa_1.jpg", "sa_2.png")]
    x = torch.stack([transform(np.asarray(Image.open(p).convert("RGB"))) for p in paths])
    with torch.inference_mode():
        fpn = world["model"].image_encoder(x)["backbone_fpn"]
    assert len(fpn) == 3  # the official build drops the stride-32 level (scalp: 1)
    files = read_out(fp32_run[0])
    assert read_index(fp32_run[0])[0] == stems
    for i, stem in enumerate(stems):
        ref = fpn[2][i].numpy()
        np.testing.assert_allclose(files[stem]["P4_S16"], ref, rtol=1e-5,
                                   atol=1e-5 * np.abs(ref).max())
    # the two images differ, so a swapped batch order could not pass the check above
    assert not np.allclose(files["sa_1"]["P4_S16"], files["sa_2"]["P4_S16"], atol=1e-2)


def test_fp16_agrees_with_fp32_to_fp16_precision(fp32_run, fp16_run) -> None:
    full, half = read_out(fp32_run[0]), read_out(fp16_run[0])
    for stem in GOOD:
        for key in FLOAT_KEYS:
            a, b = full[stem][key], half[stem][key].astype(np.float32)
            np.testing.assert_allclose(b, a, rtol=2 ** -10, atol=1e-6 * np.abs(a).max())


def test_corrupt_and_duplicate_images_are_failure_rows(fp32_run) -> None:
    out, result = fp32_run
    rows = [line.split("\t") for line in (out / "failures.tsv").read_text().splitlines()]
    assert rows[0] == ["output", "item", "error", "message"]
    assert sorted((r[1], r[2]) for r in rows[1:]) == [("sa_1.png", "duplicate_key"),
                                                     ("sa_3.jpg", "bad_image")]
    assert result.failed == 2 and "sa_3" not in open_features(out)


def test_provenance_names_encoder_weights_and_raw_levels(world, fp16_run) -> None:
    prov = open_features(fp16_run[0]).provenance
    assert prov["model"] == CONFIG and prov["family"] == "sam2"
    assert prov["weights_id"].startswith("sha256:") and prov["storage_dtype"] == "fp16"
    assert "dtype" not in prov   # the storage dtype has one key in every output
    assert "conv_s0" in prov["raw_levels"] and "no_mem_embed" in prov["raw_levels"]
    assert prov["preprocessing"]["input_size"] == [1024, 1024]
    assert prov["layout"] == "shards" and prov["stage"] == STAGE
    assert sorted(prov["keys"]) == sorted(STORED)


def test_killed_run_resumes_to_the_same_bytes(world, fp16_run, monkeypatch) -> None:
    """A shard per image; the first run dies at its second model call (sa_2.png). The re-run
    computes only what is missing, and the result equals the uninterrupted fp16 run byte for
    byte."""
    calls: list[int] = []
    real_call = Sam2Compute.__call__
    cwd = world["root"] / "resume"

    def dying_call(self, batch):
        calls.append(len(batch.keys))
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill")
        return real_call(self, batch)

    monkeypatch.setattr(Sam2Compute, "__call__", dying_call)
    with pytest.raises(KeyboardInterrupt):
        run_in(cwd, world, dtype="fp16", batch_size=1, shard_mb=ONE_PER_SHARD)
    assert not (cwd / "out").exists()  # nothing partial at the output path
    assert len(list((cwd / ".featcache" / "scratch").rglob("*.h5"))) == 2  # sa_1.jpg, sa_1.png
    calls.clear()
    monkeypatch.setattr(Sam2Compute, "__call__", lambda self, b: calls.append(1) or
                        real_call(self, b))
    result = run_in(cwd, world, dtype="fp16", batch_size=1, shard_mb=ONE_PER_SHARD)
    assert calls == [1] and (result.computed, result.reused) == (2, 2)  # sa_2 forward, sa_3
    assert tree_bytes(cwd / "out") == tree_bytes(fp16_run[0])
    assert not list((cwd / ".featcache" / "scratch").rglob("*.h5"))  # moved into the output


def test_an_added_image_costs_one_forward_and_equals_a_fresh_run(world, fp16_run,
                                                                 monkeypatch) -> None:
    """sa_2.png missing, then added: the second run computes it alone (the other three
    images, failures included, are reused) and equals the fp16 run on the full folder."""
    cwd = world["root"] / "incremental"
    aside = world["root"] / "sa_2.png"
    os.replace(world["images"] / "sa_2.png", aside)
    try:
        first = run_in(cwd, world, dtype="fp16", shard_mb=ONE_PER_SHARD)
    finally:
        os.replace(aside, world["images"] / "sa_2.png")
    assert (first.items, first.computed, first.records) == (3, 3, 1)
    calls: list[int] = []
    real_call = Sam2Compute.__call__
    monkeypatch.setattr(Sam2Compute, "__call__", lambda self, b: calls.append(len(b.keys)) or
                        real_call(self, b))
    added = run_in(cwd, world, dtype="fp16", shard_mb=ONE_PER_SHARD)
    assert (added.items, added.computed, added.reused) == (4, 1, 3) and len(calls) == 1
    metrics = json.loads((cwd / "metrics" / f"{STAGE}.json").read_text())
    assert (metrics["computed"], metrics["reused"]) == (1, 3)
    assert tree_bytes(cwd / "out") == tree_bytes(fp16_run[0])


def test_verify_checks_pass_on_both_layouts_and_fail_on_wrong_data(world, fp16_run, npz_run,
                                                                   tmp_path) -> None:
    import h5py

    shared = SharedParams(weights=str(world["ckpt"]), checkpoints=str(world["ckpt"].parent),
                          device="cpu")

    def failed(folder: Path) -> list[str]:
        report = Report()
        check_sam2(report, folder, shared)
        assert report.checks["sam2.shapes"].items > 0
        return report.failed

    assert failed(fp16_run[0]) == [] and failed(npz_run[0]) == []
    shards = tmp_path / "shards"
    shutil.copytree(fp16_run[0], shards)
    index = read_index(shards)
    with h5py.File(shards / SHARDS_DIR / index[3][int(index[1][0])], "r+") as f:
        f["feature_flag"][0] = 0
    assert failed(shards) == ["sam2.flags"]
    npz = tmp_path / "npz"
    shutil.copytree(npz_run[0], npz)
    with np.load(npz / "sa_2_features.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays["IMAGE_EMB_S16"] = arrays["IMAGE_EMB_S16"] + np.float16(1)
    np.savez(npz / "sa_2_features.npz", **arrays)
    assert failed(npz) == ["sam2.npz_view"]
    (npz / "sa_1_features.npz").unlink()
    report = Report()
    check_sam2(report, npz, shared)
    assert any("sa_1_features.npz: missing" in p
               for p in report.checks["sam2.npz_view"].first_problems)


def test_job_pickles_and_preprocesses_any_aspect(world) -> None:
    from featcache.encoders import Preprocessor, resolve_spec

    spec = resolve_spec("sam2", CONFIG, weights="random")
    params = Sam2Params(images=str(world["images"]), out="out")
    job = pickle.loads(pickle.dumps(build_sam2_job(params, Preprocessor(spec))))
    assert isinstance(job, Sam2Job)
    assert job.items() == ["sa_1.jpg", "sa_1.png", "sa_2.png", "sa_3.jpg"]
    (piece,) = job.load("sa_2.png")
    assert piece.key == "sa_2" and piece.tensor.shape == (3, 1024, 1024)
    assert piece.tensor.dtype == torch.float32
    (failure,) = job.load("sa_3.jpg")
    assert failure.item == "sa_3.jpg" and failure.error == "bad_image"
    assert "truncated" in failure.message


def test_missing_level_stops_instead_of_writing() -> None:
    p4 = np.zeros((2, 256, 64, 64), np.float32)
    with pytest.raises(RuntimeError, match="P5_S32"):
        feature_fields({"P4_S16": p4}, 1024)
    with pytest.raises(RuntimeError, match="P4_S16"):
        feature_fields({"P4_S16": p4[:, :, :32], "P5_S32": p4[:, :, :32, :32]}, 1024)


@pytest.mark.parametrize("key,value,match", [
    ("config", "sam3_hiera_t", "extract_sam2.config: unknown SAM2 config"),
    ("dtype", "bf16", "extract_sam2.dtype"),
    ("batch_size", 0, "runtime.extract_sam2.batch_size"),
    ("resize", "crop", "extract_sam2.resize: unknown key"),
    ("layout", "hdf5", "extract_sam2.layout"),
])
def test_bad_params_name_the_key(tmp_path, monkeypatch, key, value, match) -> None:
    write_params(tmp_path, {"images": "imgs", "out": "out", key: value})
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ParamError, match=match):
        load_stage_params(STAGE, Sam2Params)


def test_missing_folder_and_weights_fail_before_any_work(tmp_path, monkeypatch) -> None:
    import featcache.encoders as encoders

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(encoders, "load_encoder", lambda *a: pytest.fail("model was built"))
    params = Sam2Params(images="nowhere", out="out")
    shared, _ = _shared(tmp_path, "random")
    with pytest.raises(ParamError, match="extract_sam2.images: folder not found"):
        extract_sam2(shared, params)
    shared, _ = _shared(tmp_path, str(tmp_path / "missing.pt"))
    with pytest.raises(ParamError, match="weights: checkpoint file not found"):
        extract_sam2(shared, params)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".featcache").exists()


def _shared(cwd: Path, weights: str):
    write_params(cwd, {"images": "x", "out": "out"}, weights=weights)
    return load_stage_params(STAGE, Sam2Params)


def test_stage_script_exits_2_naming_the_key(tmp_path) -> None:
    write_params(tmp_path, {"images": "imgs", "out": "out", "config": "sam2.1_hiera_xl"})
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run([sys.executable, str(ROOT / "stages" / f"{STAGE}.py")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "extract_sam2.config" in proc.stderr and "sam2.1_hiera_t" in proc.stderr
