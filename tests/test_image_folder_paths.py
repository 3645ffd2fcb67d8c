"""The model stages' jobs (grid, SAM2) on every preprocessing path go through one decode hook
(``ImageFolderJob.decode`` -> ``prepare_file``): a file that does not decode is one
``bad_image`` row whatever the path, the exact path's piece carries the tensor, the device
paths' pieces carry arrays and no tensor, and the grid job's alpha mask is the same on every
host-decoded path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from encoder_fixtures import real_looking_image
from PIL import Image

from featcache.datasets.images import list_images
from featcache.encoders import TINY_OPENCLIP, Preprocessor, resolve_spec
from featcache.engine.types import Failure, Piece
from featcache.failures import FailureCode
from featcache.stages._grids import build_grid_job
from featcache.stages._image_folder import index_folder
from featcache.stages.extract_sam2 import Sam2Job

PATHS = ("exact", "fast", "gpu_decode")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A JPEG big enough to be DCT-downscaled, a truncated copy, bytes that are no image, and
    a PNG with alpha."""
    folder = tmp_path_factory.mktemp("imgs")
    Image.fromarray(real_looking_image(960, 1280, seed=1)).save(folder / "big.jpg", quality=90)
    (folder / "cut.jpg").write_bytes((folder / "big.jpg").read_bytes()[:3000])
    (folder / "junk.jpg").write_bytes(b"not an image")
    alpha = np.linspace(0, 255, 120 * 160).reshape(120, 160).astype(np.uint8)
    Image.fromarray(np.dstack([real_looking_image(120, 160, seed=2), alpha]), "RGBA").save(
        folder / "alpha.png")
    return folder


def _jobs(folder: Path, path: str) -> dict:
    paths = list_images(folder)
    clip = Preprocessor(resolve_spec("open_clip", TINY_OPENCLIP, weights="random"), path)
    sam2 = Preprocessor(resolve_spec("sam2", "sam2.1_hiera_t", weights="random"), path)
    return {"grid": build_grid_job(folder, paths, "stem", clip, (255, 255, 255), 7),
            "sam2": Sam2Job(folder, *index_folder([p.name for p in paths]), sam2)}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("stage", ["grid", "sam2"])
def test_a_file_that_does_not_decode_is_one_bad_image_row(folder, stage, path) -> None:
    job = _jobs(folder, path)[stage]
    for item, reason in (("cut.jpg", "truncated"), ("junk.jpg", "")):
        (row,) = job.load(item)
        assert isinstance(row, Failure), (item, row)
        assert (row.item, row.error) == (item, FailureCode.BAD_IMAGE)
        assert reason in row.message


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("stage", ["grid", "sam2"])
def test_exact_pieces_carry_the_tensor_device_paths_the_arrays(folder, stage, path) -> None:
    (piece,) = _jobs(folder, path)[stage].load("big.jpg")
    assert isinstance(piece, Piece) and piece.key == "big"
    if path == "exact":
        assert piece.tensor is not None and piece.arrays == {}
    else:
        assert piece.tensor is None
        assert set(piece.arrays) == ({"jpeg", "orientation", "geometry"} if path == "gpu_decode"
                                     else {"pixels", "geometry"})


def test_the_grid_mask_is_the_same_on_every_path(folder) -> None:
    masks = {}
    for path in PATHS:
        (piece,) = _jobs(folder, path)["grid"].load("alpha.png")
        masks[path] = piece.arrays["mask"]
        assert masks[path].shape == (7, 7)
    np.testing.assert_array_equal(masks["fast"], masks["exact"])
    np.testing.assert_array_equal(masks["gpu_decode"], masks["exact"])
