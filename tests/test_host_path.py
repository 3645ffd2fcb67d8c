"""The host path: workers send uint8, the device normalises with the same bits, memory per item
is bounded by the model input, precision ``auto`` is resolved and recorded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from encoder_fixtures import real_looking_image
from featcache.encoders import TINY_OPENCLIP, Preprocessor, resolve_spec
from featcache.encoders.preprocess import model_input
from featcache.engine.inference import resolve_precision, to_storage


def _full_resize_then_crop(rgb: np.ndarray, pre: Preprocessor) -> np.ndarray:
    """The plain torchvision order: resize the whole image, then centre-crop."""
    geo = pre.geometry(*rgb.shape[:2])
    h, w = pre.spec.input_size
    img = Image.fromarray(rgb).resize((geo.resized_width, geo.resized_height),
                                      Image.Resampling.BICUBIC)
    return np.asarray(img.crop((geo.offset_x, geo.offset_y, geo.offset_x + w,
                                geo.offset_y + h)))


@pytest.mark.parametrize("shape", [(3, 900), (700, 4), (40, 1200)])
def test_elongated_images_resize_the_crop_window_within_a_few_levels(shape):
    pre = Preprocessor(resolve_spec("open_clip", "ViT-B-16", weights="random"))
    rgb = real_looking_image(*shape, seed=3)
    got = pre.prepare(rgb)
    assert got.dtype == torch.uint8 and tuple(got.shape) == (3, 224, 224)
    want = _full_resize_then_crop(rgb, pre).astype(int)
    diff = np.abs(got.permute(1, 2, 0).numpy().astype(int) - want)
    assert diff.max() <= 4 and diff.mean() < 0.2, (diff.max(), diff.mean())


def test_a_one_pixel_strip_costs_memory_of_the_model_input_only():
    """In a fresh process (peak RSS of this one may already be high from other tests)."""
    import subprocess
    import sys

    code = ("import numpy as np, resource, torch; from featcache.encoders import resolve_spec, "
            "Preprocessor; pre = Preprocessor(resolve_spec('open_clip', 'ViT-B-16', "
            "weights='random')); rgb = np.random.default_rng(0).integers(0, 256, (1, 20000, 3), "
            "np.uint8); b = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; x = pre(rgb); "
            "g = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - b) / 1024; "
            "print(g, tuple(x.shape) == (3, 224, 224) and bool(torch.isfinite(x).all()))")
    grown_mb, ok = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                  check=True).stdout.split()
    # the full resize would be 224 x 4.48M px (~3 GB of uint8 RGB)
    assert ok == "True" and float(grown_mb) < 500, f"peak RSS grew {grown_mb} MB"


def test_prepare_is_uint8_and_the_device_half_gives_the_exact_preprocessing():
    pre = Preprocessor(resolve_spec("open_clip", TINY_OPENCLIP, weights="random"))
    rgb = real_looking_image(230, 310, seed=1)
    wire = pre.prepare(rgb)
    assert wire.dtype == torch.uint8
    x = wire.to(torch.float32).div(255)
    mean = torch.tensor(pre.spec.mean).view(3, 1, 1)
    std = torch.tensor(pre.spec.std).view(3, 1, 1)
    want = (x - mean) / std
    got = model_input(wire[None], pre.spec, torch.device("cpu"))[0]
    assert torch.equal(got, want) and torch.equal(pre(rgb), want)


def test_storage_cast_on_the_device_equals_numpy_astype():
    x = torch.randn(4, 196, 768) * 30
    assert np.array_equal(to_storage(x, "fp16"), x.numpy().astype(np.float16))
    assert to_storage(x, "fp32").dtype == np.float32


def test_precision_auto_is_fp32_on_cpu_and_explicit_values_pass_through():
    cpu = torch.device("cpu")
    assert resolve_precision(cpu, "auto") == "fp32"
    assert resolve_precision(cpu, "bf16") == "bf16"
    if torch.cuda.is_available():
        want = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        assert resolve_precision(torch.device("cuda"), "auto") == want


@pytest.mark.parametrize("bf16, want", [(True, "bf16"), (False, "fp16")])
def test_precision_auto_on_cuda_is_bf16_where_supported_for_every_family(monkeypatch, bf16,
                                                                         want):
    from featcache.stages.extract_sam2 import compute_precision

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    cuda = torch.device("cuda")
    assert resolve_precision(cuda, "auto") == want
    # SAM2 used to pick fp16 whenever it stored fp16; now the device decides, as for the others
    assert compute_precision(cuda, "fp16") == want and compute_precision(cuda, "fp32") == want


def test_the_alpha_mask_of_a_strip_is_windowed_like_the_image(monkeypatch):
    """Above 16:1 the alpha is resized through the model-input window only (bounded memory,
    checked in a fresh process), and agrees with the full resize to within 0.05 per cell."""
    import subprocess
    import sys

    import featcache.stages._grid_geometry as grid_geometry
    from featcache.stages._grid_geometry import alpha_grid

    code = ("import numpy as np, resource; from featcache.encoders import resolve_spec, "
            "Preprocessor; from featcache.stages._grid_geometry import alpha_grid; "
            "pre = Preprocessor(resolve_spec('open_clip', 'ViT-B-16', weights='random')); "
            "a = np.full((1, 20000), 200, np.uint8); "
            "b = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
            "m = alpha_grid(a, (1, 20000), pre, 14); "
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - b) / 1024, m.mean())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert float(out[0]) < 200 and abs(float(out[1]) - 200 / 255) < 1e-6   # full: ~4 GB
    pre = Preprocessor(resolve_spec("open_clip", "ViT-B-16", weights="random"))
    rng = np.random.default_rng(0)
    alpha = (rng.random((12, 400)) * 255).astype(np.uint8)    # 33:1, small enough for both
    windowed = alpha_grid(alpha, alpha.shape, pre, 14)
    monkeypatch.setattr(grid_geometry, "BOX_RESIZE_FACTOR", 10**9)   # the full resize
    full = alpha_grid(alpha, alpha.shape, pre, 14)
    assert np.abs(windowed - full).max() < 0.05   # noise alpha: the window is sub-pixel off
