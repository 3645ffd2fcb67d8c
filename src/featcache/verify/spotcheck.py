"""Spot check: recompute a few cached features live and compare them with the cache.

The seed's answer to "how do I know the features are right?" made exact: pick ``n`` random keys
of a grid output (``extract_clip_grid`` or ``extract_dinov2``), rebuild the encoder named in the
file's provenance (model, weights, seed and the full preprocessing spec), run the same decode /
alpha compositing / preprocessing / pooling / layout on the source images, and compare::

    result = spot_check("data/features/clip_grid/coco_val2017.h5", n=4)
    assert result.passed(min_cosine=0.999), result

:func:`spot_check_segments` does the same for ``extract_siglip``'s segment embeddings.

Cosine similarity is taken per feature vector (each token's channel vector for grids, the whole
vector for ``global``); ``max_abs_diff`` is over every element. The live features are computed
in float32; the cache may be fp16, so expect ``max_abs_diff`` of about ``|x| * 2**-11``.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from featcache.datasets.coco_panoptic import (
    PanopticError,
    read_panoptic_split,
    segment_key,
)
from featcache.datasets.images import list_images
from featcache.encoders import Preprocessor, load_encoder, resolve_device
from featcache.engine import Failure, Piece, make_batch
from featcache.provenance import GridProvenance, SiglipProvenance
from featcache.reader import open_features
from featcache.stages._grids import GridCompute, build_grid_job
from featcache.stages.extract_siglip import SiglipCompute, SiglipJob

if TYPE_CHECKING:
    from featcache.encoders.base import Encoder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpotCheckResult:
    """Outcome of :func:`spot_check`.

    ``keys``: the keys compared; ``max_abs_diff``: largest ``|cached - live|`` element;
    ``min_cosine``: smallest cosine between a cached and a live feature vector;
    ``errors``: ``(key, reason)`` for sampled keys that could not be recomputed.
    """

    path: str
    keys: tuple[str, ...]
    max_abs_diff: float
    min_cosine: float
    errors: tuple[tuple[str, str], ...] = ()

    def passed(self, min_cosine: float = 0.999) -> bool:
        """True when every sampled key was recomputed and agrees to ``min_cosine``."""
        return bool(self.keys) and not self.errors and self.min_cosine >= min_cosine


def spot_check(path: str | Path, n: int = 4, *, images: str | Path | None = None,
               field: str = "grids", seed: int = 0, device: str = "cpu",
               encoder: Encoder | None = None) -> SpotCheckResult:
    """Recompute ``n`` random keys of the grid output ``path`` and compare with the cache.

    ``images`` overrides the image folder recorded in the provenance (relative paths there are
    relative to the directory the stage ran in); ``field`` is ``grids`` or ``global``; ``seed``
    picks the keys (sorted keys, ``random.Random(seed).sample``). ``encoder``: an already
    loaded encoder of the file's recorded spec, to check several files with one model load
    (``ValueError`` if its spec differs from the file's); None loads it.
    """
    store = open_features(path, field=field)
    prov = GridProvenance.from_dict(store.provenance)
    folder = Path(images if images is not None else prov.images)
    keys = random.Random(seed).sample(sorted(store), min(n, len(store)))
    live, errors = recompute(prov, folder, keys, field, device, encoder)
    diffs, cosines = [], []
    for key, value in live.items():
        cached = np.asarray(store[key], dtype=np.float32)
        diffs.append(float(np.abs(cached - value).max()))
        cosines.append(float(_cosines(cached, value, _channel_axis(prov, field)).min()))
    result = SpotCheckResult(str(path), tuple(live), max(diffs, default=float("nan")),
                             min(cosines, default=float("nan")), tuple(errors))
    log.info("spot check %s: %d keys, max |diff| %.3g, min cosine %.6f, %d errors", path,
             len(live), result.max_abs_diff, result.min_cosine, len(errors))
    return result


def recompute(prov: GridProvenance, folder: Path, keys: list[str], field: str,
              device: str = "cpu", encoder: Encoder | None = None,
              ) -> tuple[dict[str, np.ndarray], list[tuple[str, str]]]:
    """Live float32 arrays of ``keys`` (as stored under ``field``) and ``(key, reason)`` errors;
    ``encoder`` as in :func:`spot_check`."""


    if not folder.is_dir():
        return {}, [(key, f"image folder not found: {folder}") for key in keys]
    spec = prov.preprocessing
    mask_target = prov.grid if field == "mask" else None
    job = build_grid_job(folder, list_images(folder), prov.key_rule, Preprocessor(spec),
                         prov.background, mask_target)
    by_key = {job.keys[name]: name for name in job.names if name not in job.duplicates}
    if encoder is None:
        encoder = load_encoder(spec, resolve_device(device))
    elif encoder.spec != spec:
        raise ValueError(f"the encoder given is {encoder.spec}, the file was made by {spec}")
    torch_device = next(encoder.parameters()).device
    compute = GridCompute(encoder, torch_device, prov.grid,
                          prov.array_layout, save_global=field == "global")
    live, errors = {}, []
    for key in keys:
        if key not in by_key:
            errors.append((key, f"no image in {folder} has key {key!r}"))
            continue
        loaded = job.load(by_key[key])
        if isinstance(loaded[0], Failure):
            errors.append((key, f"{loaded[0].error}: {loaded[0].message}"))
            continue
        with torch.inference_mode():
            out = compute(make_batch(loaded))
        live[key] = np.asarray(out[field][0], dtype=np.float32)
    return live, errors


def spot_check_segments(path: str | Path, n: int = 4, *, coco: str | Path | None = None,
                        seed: int = 0, device: str = "cpu") -> SpotCheckResult:
    """Recompute ``n`` random segment embeddings of an ``extract_siglip`` output (packed HDF5
    ``embeddings.h5``) from the COCO split named in its provenance (``coco`` overrides the
    root) with the same crop, blend, preprocessing and model, and compare (cosine per
    embedding; both are unit-norm)."""
    store = open_features(path)
    prov = SiglipProvenance.from_dict(store.provenance)
    keys = random.Random(seed).sample(sorted(store), min(n, len(store)))
    live, errors = recompute_segments(prov, Path(coco or prov.coco), keys, device)
    diffs = [float(np.abs(np.asarray(store[k], np.float32) - v).max()) for k, v in live.items()]
    cosines = [float(_cosines(np.asarray(store[k], np.float32), v, -1)) for k, v in live.items()]
    result = SpotCheckResult(str(path), tuple(live), max(diffs, default=float("nan")),
                             min(cosines, default=float("nan")), tuple(errors))
    log.info("spot check %s: %d segments, max |diff| %.3g, min cosine %.6f, %d errors", path,
             len(live), result.max_abs_diff, result.min_cosine, len(errors))
    return result


def recompute_segments(prov: SiglipProvenance, coco: Path, keys: list[str], device: str = "cpu",
                       ) -> tuple[dict[str, np.ndarray], list[tuple[str, str]]]:
    """Live float32 embeddings of the segment ``keys`` and ``(key, reason)`` errors."""


    spec = prov.preprocessing
    try:
        split = read_panoptic_split(coco, prov.split)
    except (FileNotFoundError, PanopticError) as e:
        return {}, [(key, f"cannot read the COCO split: {e}") for key in keys]
    job = SiglipJob(split, Preprocessor(spec), prov.crop)
    item_of = {segment_key(e.image.image_id, seg.id): e.item for e in split.entries
               if e.image is not None for seg in e.image.segments}
    encoder = load_encoder(spec, resolve_device(device))
    compute = SiglipCompute(encoder, next(encoder.parameters()).device, with_ids=False)
    live, errors = {}, []
    for key in keys:
        pieces = [p for p in job.load(item_of[key]) if isinstance(p, Piece) and p.key == key] \
            if key in item_of else []
        if not pieces:
            errors.append((key, f"segment {key} could not be recomputed from {coco}"))
            continue
        with torch.inference_mode():
            live[key] = np.asarray(compute(make_batch(pieces))["embeddings"][0], np.float32)
    return live, errors


def _channel_axis(prov: GridProvenance, field: str) -> int | None:
    if field == "global":
        return -1
    if field == "mask":
        return None
    return -1 if prov.array_layout == "tokens" else 0


def _cosines(a: np.ndarray, b: np.ndarray, axis: int | None) -> np.ndarray:
    """Cosine similarity of matching vectors along ``axis`` (None: the whole arrays)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    if axis is None:
        a, b, axis = a.ravel(), b.ravel(), -1
    num = (a * b).sum(axis=axis)
    den = np.linalg.norm(a, axis=axis) * np.linalg.norm(b, axis=axis)
    return num / np.maximum(den, 1e-12)
