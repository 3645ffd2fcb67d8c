"""extract_sam2 end to end on generated images with sam2.1_hiera_t at its real 1024 input.

A forward of hiera_t at 1024 takes seconds on a CPU, so the module runs the stage few times and
shares the runs between tests: one fp32 run, one fp16 run, and one fp16 run killed after its
first image and resumed (8 image forwards in all, the official reference included). The weights
are a random SAM2 model saved in the official checkpoint format, loaded through the ``path``
route, so the reference is the official build (``scalp: 1``) of the same weights.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from encoder_fixtures import real_looking_image
from featcache.config import ParamError, load_stage_params
from featcache.sam2_features import (STAGE, Sam2Compute, Sam2Job, Sam2Params, build_sam2_job,
                                     extract_sam2, feature_fields)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "sam2.1_hiera_t"
GOOD = {"sa_1": (60, 90), "sa_2": (80, 44)}   # stem -> (H, W): landscape and portrait
FLOAT_KEYS = ("P4_S16", "P5_S32", "IMAGE_EMB_S16")


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
    cwd.mkdir(parents=True, exist_ok=True)
    doc = {"weights": weights, "seed": 0, "device": "cpu", STAGE: section}
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
    out = {}
    for path in sorted(folder.glob("*_features.npz")):
        with np.load(path, allow_pickle=False) as z:
            out[path.name[:-len("_features.npz")]] = {k: z[k] for k in z.files}
    return out


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def fp32_run(world) -> tuple[Path, object]:
    cwd = world["root"] / "fp32"
    return cwd / "out", run_in(cwd, world, dtype="fp32")


@pytest.fixture(scope="module")
def fp16_run(world) -> tuple[Path, object]:
    cwd = world["root"] / "fp16"
    return cwd / "out", run_in(cwd, world, dtype="fp16")


def test_keys_shapes_dtypes_and_flag(fp32_run, fp16_run) -> None:
    for (out, result), dtype in ((fp32_run, np.float32), (fp16_run, np.float16)):
        files = read_out(out)
        assert sorted(files) == ["sa_1", "sa_2"] and result.records == 2
        for fields in files.values():
            assert list(fields) == ["P4_S16", "P5_S32", "IMAGE_EMB_S16", "feature_flag"]
            assert fields["P4_S16"].shape == (256, 64, 64)
            assert fields["P5_S32"].shape == (256, 32, 32)
            assert all(fields[k].dtype == dtype for k in FLOAT_KEYS)
            np.testing.assert_array_equal(fields["IMAGE_EMB_S16"], fields["P4_S16"])
            assert fields["feature_flag"].dtype == np.int64 and fields["feature_flag"] == 1
            assert np.isfinite(fields["P5_S32"]).all() and fields["P5_S32"].std() > 0


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
    assert sorted((r[1], r[2]) for r in rows[1:]) == [("sa_1.png", "duplicate_stem"),
                                                     ("sa_3.jpg", "bad_image")]
    assert result.failed == 2 and not (out / "sa_3_features.npz").exists()


def test_provenance_names_encoder_weights_and_raw_levels(world, fp16_run) -> None:
    import json

    prov = json.loads((fp16_run[0] / "provenance.json").read_text())
    assert prov["model"] == CONFIG and prov["family"] == "sam2"
    assert prov["weights_id"].startswith("sha256:") and prov["storage_dtype"] == "fp16"
    assert "conv_s0" in prov["raw_levels"] and "no_mem_embed" in prov["raw_levels"]
    assert prov["preprocessing"]["input_size"] == [1024, 1024]


def test_killed_run_resumes_to_the_same_bytes(world, fp16_run, monkeypatch) -> None:
    """Chunks of one image; the first run dies at its second model call. The re-run computes
    only what is missing, and the result equals the uninterrupted fp16 run byte for byte."""
    import featcache.engine.runner as runner

    monkeypatch.setattr(runner, "CHUNK_ITEMS", 1)
    calls: list[int] = []
    real_call = Sam2Compute.__call__
    cwd = world["root"] / "resume"

    def dying_call(self, batch):
        calls.append(len(batch.keys))
        if len(calls) == 2:
            wait_for(lambda: any((cwd / ".featcache").rglob("chunk_000000.npz")))
            raise KeyboardInterrupt("simulated kill")
        return real_call(self, batch)

    monkeypatch.setattr(Sam2Compute, "__call__", dying_call)
    with pytest.raises(KeyboardInterrupt):
        run_in(cwd, world, dtype="fp16", batch_size=1)
    assert not (cwd / "out").exists()  # nothing partial at the output path
    calls.clear()
    monkeypatch.setattr(Sam2Compute, "__call__", lambda self, b: calls.append(1) or
                        real_call(self, b))
    result = run_in(cwd, world, dtype="fp16", batch_size=1)
    assert calls == [1] and result.resumed == 2  # sa_1.jpg and sa_1.png came from scratch
    assert tree_bytes(cwd / "out") == tree_bytes(fp16_run[0])
    assert not any((cwd / ".featcache").rglob("chunk_*.npz"))  # scratch removed after success


def wait_for(condition, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "the background chunk writer never finished"
        time.sleep(0.05)


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
    ("batch_size", 0, "extract_sam2.batch_size"),
    ("resize", "crop", "extract_sam2.resize: unknown key"),
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
