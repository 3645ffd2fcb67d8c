"""The ``fast`` and ``gpu_decode`` preprocessing paths: close to ``exact`` (and not equal where
they differ), DCT downscaling only at >= 2x the resized size, EXIF and non-JPEG inputs right,
corrupt bytes a failure, the path in the params, the cache key and the provenance."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from encoder_fixtures import real_looking_image, tiny_encoder, tiny_spec
from PIL import Image

from featcache.datasets.images import ImageDecodeError, load_image, read_jpeg
from featcache.encoders import Preprocessor, resolve_spec
from featcache.encoders.device_input import device_model_input
from featcache.encoders.preprocess import model_input, prepare_file

CPU = torch.device("cpu")


def _jpeg(path: Path, rgb: np.ndarray, orientation: int = 1, quality: int = 90) -> Path:
    img = Image.fromarray(rgb)
    exif = img.getexif()
    if orientation != 1:
        exif[0x0112] = orientation
    img.save(path, "JPEG", quality=quality, exif=exif.tobytes())
    return path


def _input(file: Path, pre: Preprocessor, pad_to: int = 0) -> torch.Tensor:
    """The normalised model input of one file along ``pre.path`` (device half on the CPU)."""
    got = prepare_file(file, pre, lambda image: image.rgb)
    if got.tensor is not None:
        return model_input(got.tensor[None], pre.spec, CPU)
    return device_model_input({k: [v] for k, v in got.arrays.items()}, pre.spec, CPU, pad_to)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Smallest per-row cosine of two ``[B, ...]`` batches."""
    return float(torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).min())


@pytest.fixture(scope="module")
def clip_spec():
    return resolve_spec("open_clip", "ViT-B-16", weights="random")


@pytest.mark.parametrize(("size", "drafted"), [((640, 480), (320, 240)), ((896, 448), (448, 224)),
                                               ((894, 446), None), ((400, 300), None)])
def test_draft_only_when_the_image_is_twice_the_resized_size(tmp_path, clip_spec, size, drafted):
    pre = Preprocessor(clip_spec, "fast")
    w, h = size
    path = _jpeg(tmp_path / "a.jpg", real_looking_image(h, w))
    image = load_image(path, draft=pre.draft_size)
    assert image.size == (drafted or size)
    assert image.draft_from == (size if drafted else None)
    assert load_image(path).size == size and load_image(path).draft_from is None
    # the reduced decode never falls below the resized size: the last resample downsamples
    if drafted:
        geo = pre.geometry(h, w)
        assert image.size[0] >= geo.resized_width and image.size[1] >= geo.resized_height


def test_draft_of_an_exif_rotated_jpeg_is_asked_in_stored_orientation(tmp_path, clip_spec):
    pre = Preprocessor(clip_spec, "fast")
    path = _jpeg(tmp_path / "r.jpg", real_looking_image(480, 960), orientation=6)  # shown 480x960
    image = load_image(path, draft=pre.draft_size)
    assert image.draft_from == (480, 960) and image.size == (240, 480)


@pytest.mark.parametrize("path_name", ["fast", "gpu_decode"])
@pytest.mark.parametrize("orientation", [1, 6, 3])
def test_fast_paths_are_close_to_exact_and_not_equal(tmp_path, clip_spec, path_name,
                                                     orientation):
    file = _jpeg(tmp_path / "a.jpg", real_looking_image(480, 640, seed=orientation),
                 orientation)
    exact = _input(file, Preprocessor(clip_spec))
    got = _input(file, Preprocessor(clip_spec, path_name), pad_to=3)
    assert got.shape == (3, 3, 224, 224) and bool((got[1:] == model_input(
        torch.zeros(2, 3, 224, 224, dtype=torch.uint8), clip_spec, CPU)).all())   # zero padding
    assert _cosine(got[:1], exact) > 0.995
    assert not torch.equal(got[:1], exact)


def test_sam2_fast_without_draft_is_the_exact_float_resize(tmp_path):
    """1500x2250 is under 2x SAM2's 1024 input: no draft, and the device resize is the exact
    path's own float resize, moved from the worker (same bits on the CPU)."""
    spec = tiny_spec("sam2", image_size=64)
    file = _jpeg(tmp_path / "s.jpg", real_looking_image(150, 225))
    pre = Preprocessor(spec, "fast")
    assert pre.draft_size(225, 150) is not None    # 2x of 64: drafted at this tiny size
    big = Preprocessor(resolve_spec("sam2", "sam2.1_hiera_b+", weights="random"), "fast")
    assert big.draft_size(2250, 1500) is None and big.draft_size(2048, 2048) == (1024, 1024)
    file = _jpeg(tmp_path / "s2.jpg", real_looking_image(100, 120))   # < 2x 64 on one side
    assert torch.equal(_input(file, pre), _input(file, Preprocessor(spec)))


def test_gpu_decode_takes_the_exact_path_for_anything_but_a_plain_jpeg(tmp_path, clip_spec):
    rgb = real_looking_image(300, 400)
    png = tmp_path / "a.png"
    Image.fromarray(rgb).save(png)
    cmyk = tmp_path / "c.jpg"
    Image.fromarray(rgb).convert("CMYK").save(cmyk, "JPEG")
    jpg = _jpeg(tmp_path / "t.jpg", rgb)
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(jpg.read_bytes()[:-600])
    assert read_jpeg(png) is None and read_jpeg(cmyk) is None and read_jpeg(truncated) is None
    assert read_jpeg(jpg) is not None
    pre = Preprocessor(clip_spec, "gpu_decode")
    for file in (png, cmyk):   # exact decode and preprocessing, so the exact bits
        assert torch.equal(_input(file, pre), _input(file, Preprocessor(clip_spec)))
    with pytest.raises(ImageDecodeError):   # the stage's bad_image row
        prepare_file(truncated, pre, lambda image: image.rgb)


def test_corrupt_jpeg_bytes_raise_on_the_device(tmp_path, clip_spec):
    data = bytearray(_jpeg(tmp_path / "a.jpg", real_looking_image(64, 64)).read_bytes())
    table = data.find(b"\xff\xc4")            # a Huffman table: header fine, data undecodable
    data[table + 5:table + 13] = b"\xff" * 8
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(bytes(data))
    got = prepare_file(bad, Preprocessor(clip_spec, "gpu_decode"), lambda image: image.rgb)
    assert "jpeg" in got.arrays
    with pytest.raises(RuntimeError, match="JPEG"):
        device_model_input({k: [v] for k, v in got.arrays.items()}, clip_spec, CPU)


def test_fast_features_are_close_to_exact(tmp_path):
    encoder = tiny_encoder("clip")
    files = [_jpeg(tmp_path / f"{i}.jpg", real_looking_image(480, 640, seed=i)) for i in range(3)]
    feats = {}
    for path in ("exact", "fast", "gpu_decode"):
        pre = Preprocessor(encoder.spec, path)
        x = torch.cat([_input(f, pre) for f in files])
        with torch.inference_mode():
            feats[path] = encoder(x).grid
    for path in ("fast", "gpu_decode"):
        assert _cosine(feats[path], feats["exact"]) > 0.99
        assert not torch.equal(feats[path], feats["exact"])


def test_unknown_path_is_refused(clip_spec):
    with pytest.raises(ValueError, match="gpu_decode"):
        Preprocessor(clip_spec, "turbo")  # type: ignore[arg-type]


def test_decode_order_in_a_mixed_batch(tmp_path, clip_spec):
    """Device-decoded and host-decoded items in one batch keep their rows."""
    pre = Preprocessor(clip_spec, "gpu_decode")
    jpg = _jpeg(tmp_path / "a.jpg", real_looking_image(480, 640, seed=1))
    png = tmp_path / "b.png"
    Image.fromarray(real_looking_image(240, 320, seed=2)).save(png)
    items = [prepare_file(f, pre, lambda image: image.rgb) for f in (png, jpg, png)]
    arrays = {k: [it.arrays.get(k) for it in items]
              for k in ("pixels", "jpeg", "orientation", "geometry")}
    x = device_model_input(arrays, clip_spec, CPU)
    assert torch.equal(x[0], x[2]) and torch.equal(x[1], _input(jpg, pre)[0])
    assert torch.equal(x[0], _input(png, Preprocessor(clip_spec))[0])


def test_jpeg_bytes_read_in_display_orientation(tmp_path):
    file = _jpeg(tmp_path / "r.jpg", real_looking_image(40, 90), orientation=8)
    got = read_jpeg(file)
    assert (got.width, got.height, got.orientation) == (40, 90, 8)
    buf = io.BytesIO(got.data.tobytes())
    assert Image.open(buf).size == (90, 40)


# ---------------------------------------------------------------- the stages
def _stage_folder(root: Path) -> Path:
    """640x480 JPEGs (one EXIF-rotated), a PNG, a truncated and an undecodable JPEG."""
    folder = root / "imgs"
    folder.mkdir()
    for i in range(3):
        _jpeg(folder / f"{i + 1:012d}.jpg", real_looking_image(480, 640, seed=i),
              orientation=6 if i == 2 else 1)
    Image.fromarray(real_looking_image(200, 260, seed=7)).save(folder / "p.png")
    (folder / "cut.jpg").write_bytes((folder / "000000000001.jpg").read_bytes()[:3000])
    data = bytearray((folder / "000000000002.jpg").read_bytes())
    table = data.find(b"\xff\xc4")
    data[table + 5:table + 13] = b"\xff" * 8
    (folder / "000000000009.jpg").write_bytes(bytes(data))
    return folder


def _run_clip(root: Path, out: str, **overrides):
    from featcache.config import SharedParams, build_dataclass
    from featcache.encoders import TINY_OPENCLIP
    from featcache.stages.extract_clip_grid import (
        STAGE,
        ClipGridParams,
        extract_clip_grid,
    )

    values = {"root": str(root), "out": str(root / out), "num_workers": 0, "batch_size": 2,
              "splits": [{"name": "val", "images": "imgs"}], "max_failures": 0.9,
              "dtype": "fp32", **overrides}
    params = build_dataclass(ClipGridParams, values, STAGE)
    shared = SharedParams(model=TINY_OPENCLIP, weights="random", device="cpu", seed=0)
    return extract_clip_grid(shared, params)[0], root / out / "val"


def _grids(out: Path) -> dict[str, np.ndarray]:
    from featcache import open_features

    store = open_features(out)
    return {k: np.asarray(store[k]) for k in store.keys()}


def _provenance(out: Path) -> dict:
    import json

    import h5py

    with h5py.File(out / "index.h5", "r") as f:
        return json.loads(f.attrs["provenance"])


def test_bad_preprocess_value_names_the_key():
    from featcache.config import ParamError, build_dataclass
    from featcache.stages.extract_clip_grid import STAGE, ClipGridParams
    from featcache.stages.extract_sam2 import STAGE as SAM2
    from featcache.stages.extract_sam2 import Sam2Params

    with pytest.raises(ParamError, match=r"extract_clip_grid\.preprocess.*'exact', 'fast', "
                                         r"'gpu_decode'"):
        build_dataclass(ClipGridParams, {"root": ".", "out": "o", "preprocess": "turbo",
                                         "splits": [{"name": "v", "images": "i"}]}, STAGE)
    with pytest.raises(ParamError, match=r"extract_sam2\.preprocess"):
        build_dataclass(Sam2Params, {"images": ".", "out": "o", "preprocess": "gpu"}, SAM2)


def test_stage_paths_provenance_cache_key_and_failures(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _stage_folder(tmp_path)
    _, exact_out = _run_clip(tmp_path, "exact")
    assert _provenance(exact_out)["preprocess"] == "exact"
    again, _ = _run_clip(tmp_path, "exact")       # the default is reused as it is
    assert again.reused == again.items and again.computed == 0
    fast, fast_out = _run_clip(tmp_path, "exact", preprocess="fast")   # same out: recomputes
    assert fast.computed == fast.items and fast.reused == 0
    gpu, gpu_out = _run_clip(tmp_path, "gpu", preprocess="gpu_decode")
    assert _provenance(fast_out)["preprocess"] == "fast"
    assert _provenance(gpu_out)["preprocess"] == "gpu_decode"
    assert "decode_jpeg" in _provenance(gpu_out)["host_path"]
    fast_grids, gpu_grids = _grids(fast_out), _grids(gpu_out)
    exact_grids = _grids(_run_clip(tmp_path, "exact2")[1])
    assert sorted(exact_grids) == ["1", "2", "3", "p"]
    for key in ("1", "2", "3"):
        for got in (fast_grids[key], gpu_grids[key]):
            cos = float(np.dot(got.ravel(), exact_grids[key].ravel()) /
                        np.linalg.norm(got) / np.linalg.norm(exact_grids[key]))
            assert cos > 0.99 and not np.array_equal(got, exact_grids[key])
    assert np.array_equal(gpu_grids["p"], exact_grids["p"])   # a PNG: the exact path
    rows = (gpu_out.parent / "failures.tsv").read_text().splitlines()
    assert "val\tcut.jpg\tbad_image" in "\n".join(rows)          # truncated: exact decode
    assert any(r.startswith("val\t9\tcompute_error\tRuntimeError: JPEG decode on cpu failed") for r in rows)
    assert sorted(gpu_grids) == ["1", "2", "3", "p"] and gpu.failed == 2
