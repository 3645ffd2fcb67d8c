"""Shared machinery of the two patch-grid stages (``extract_clip_grid``, ``extract_dinov2``).

Both stages read image folders (one per split), composite transparent images over a solid
``background`` colour, run an encoder that returns a patch grid ``[B, C, g, g]`` and store one
array per image. This module holds what they share: the params, the split's job (a
:class:`~featcache.stages._image_folder.ImageFolderJob`), the compute and the run loop;
:mod:`featcache.stages._grid_geometry` pools the grid and averages the alpha mask per cell. The
stage modules only resolve their encoder spec.

Conventions:

- **Image keys.** ``image_id`` rule (shards and HDF5 layouts): a COCO file name (``000000000139.jpg`` or
  ``COCO_val2014_000000000139.jpg``) or any all-digit stem (ScanNet frame ``3.jpg``) gives the
  integer without zero padding (``"139"``, ``"3"``), as the seed's reader expects
  (``f'{image_id}_grids'``); any other file gives its stem. ``stem`` rule (NPY layout): the stem.
  Two files with the same key in one split: the later one (by name) is a failure row.
- **Array layouts.** ``tokens``: ``(g*g, C)``, row ``i*g + j`` is the patch at row ``i`` (y, down)
  and column ``j`` (x, right). ``chw``: ``(C, g, g)`` indexed ``[c, i, j]``.
- **Pooling** (:func:`pool_grid`): the stored side ``t`` must divide the native side ``g``;
  ``t x t`` cells each average a ``(g/t) x (g/t)`` block (``avg_pool2d``, no overlap, no
  padding). ``t = 0`` or ``t = g`` stores the native grid unchanged. A ``t`` that does not divide
  ``g`` (e.g. 7 for ViT-L/14's 16x16) is a :class:`ParamError` before any work: uneven
  adaptive windows would silently mix patches of different sizes.
- **Alpha.** RGBA/LA/transparent-palette images are composited over ``background`` (straight
  alpha, ``featcache.datasets.images.composite_alpha``) before preprocessing. The ``mask`` field is the
  alpha in ``[0, 1]`` averaged over each stored cell: the alpha goes through the model's own
  geometry (``cv2.INTER_AREA`` resize to the resized size, the same centre crop), then the mean
  over each patch, then the same pooling as the features. Opaque images get no mask.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from PIL import Image

from featcache.config import ParamError, SharedParams, require
from featcache.datasets.frames import frame_number
from featcache.datasets.images import (
    IMAGE_EXTENSIONS,
    composite_alpha,
    list_images,
    survey_folder,
)
from featcache.encoders import Preprocessor, load_encoder, resolve_device
from featcache.encoders.device_input import batch_model_input
from featcache.encoders.preprocess import (
    PREPROCESS_DESCRIPTIONS,
    FileInput,
    PreprocessPath,
    prepare_file,
)
from featcache.engine import WriterOptions, finish_stage, run_job
from featcache.engine.atomic import write_text
from featcache.engine.distributed import init_distributed, rank_device
from featcache.engine.inference import autocast_for, resolve_precision, to_storage
from featcache.engine.types import Failure, ModelParams, Piece, Precision, RunResult
from featcache.provenance import GridProvenance, encoder_facts, library_versions
from featcache.stages._grid_geometry import ArrayLayout, alpha_grid, arrange_grid
from featcache.stages._image_folder import ImageFolderJob, index_folder

if TYPE_CHECKING:
    from featcache.encoders.base import Encoder, EncoderSpec

log = logging.getLogger(__name__)

KeyRule = Literal["image_id", "stem"]
_COCO_NAME = re.compile(r"^COCO_[A-Za-z0-9]+_(\d+)$")
_SAFE_SPLIT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True, kw_only=True)
class SplitSpec:
    """One split: ``name`` (output folder ``<out>/<name>/``, plus ``<out>/<name>.h5`` with the
    hdf5 layout) and ``images``, its image folder relative to the stage's ``root``."""

    name: str
    images: str


@dataclass(frozen=True, kw_only=True)
class GridParams(ModelParams):
    """Params shared by the grid stages (see the README for each key)."""

    root: str
    out: str
    splits: list[SplitSpec]
    layout: Literal["shards", "hdf5", "npy"] = "shards"
    dtype: Literal["fp16", "fp32"] = "fp16"
    compression: Literal["none", "lzf", "gzip"] = "none"
    save_meta: bool = False
    background: tuple[int, int, int] = (255, 255, 255)
    preprocess: PreprocessPath = "exact"   # exact | fast | gpu_decode (README "Fast preprocessing")

    def validate(self) -> None:
        super().validate()
        require(bool(self.root.strip()), "root", "must name the folder the splits are in")
        require(bool(self.out.strip()), "out", "must name the output folder")
        require(len(self.splits) > 0, "splits", "must list at least one {name, images} split")
        names = [s.name for s in self.splits]
        require(len(set(names)) == len(names), "splits", f"split names repeat: {names}")
        for i, s in enumerate(self.splits):
            require(bool(_SAFE_SPLIT.match(s.name)), f"splits[{i}].name",
                    f"{s.name!r} must be a file name (letters, digits, . _ -)")
        require(len(self.background) == 3 and all(0 <= c <= 255 for c in self.background),
                "background", f"must be [r, g, b] in 0..255, got {list(self.background)}")
        require(self.compression == "none" or self.layout != "npy", "compression",
                "applies to the shards and hdf5 layouts; the npy layout writes plain .npy "
                "files")
        require(not self.save_meta or self.layout == "npy", "save_meta",
                "per-image JSON is written by the npy layout only; the other layouts keep "
                "their metadata in the index's provenance")


def image_key(name: str, rule: KeyRule) -> str:
    """The output key of image file ``name`` under ``rule`` (see the module docstring)."""
    stem = Path(name).stem
    if rule == "stem":
        return stem

    match = _COCO_NAME.match(stem)
    number = frame_number(match.group(1) if match else stem)
    return stem if number is None else str(number)


def list_splits(params: GridParams, stage: str) -> dict[str, tuple[Path, list[Path]]]:
    """``{split: (folder, image paths)}``; a missing or empty split is a :class:`ParamError`."""
    root = Path(params.root)
    if not root.is_dir():
        raise ParamError(f"{stage}.root: folder not found: {root}")
    found = {}
    for i, split in enumerate(params.splits):
        folder = root / split.images
        key = f"{stage}.splits[{i}].images"
        if not folder.is_dir():
            raise ParamError(f"{key}: split {split.name!r}: folder not found: {folder}")
        paths = list_images(folder)
        if not paths:
            raise ParamError(f"{key}: split {split.name!r}: no images in {folder}")
        found[split.name] = (folder, paths)
    return found


@dataclass(frozen=True)
class GridJob(ImageFolderJob[FileInput]):
    """Engine job of one split: one item per image file name in ``folder``, one piece each.

    Decoding, alpha compositing, preprocessing and the alpha mask run in DataLoader workers.
    ``keys`` maps file name -> output key (:func:`image_key`); ``duplicates`` file name -> the
    earlier file with the same key (a failure row).
    """

    preprocessor: Preprocessor
    background: tuple[int, int, int]
    mask_target: int | None = None   # stored grid side when the job produces ``mask``

    def signature_extra(self, item: str) -> str:
        return self.keys[item]

    def decode(self, item: str) -> FileInput:
        """The file along the preprocessor's path (:func:`prepare_file`), composited over
        ``background``: the exact path's tensor, or the device paths' arrays and no tensor."""
        return prepare_file(self.folder / item, self.preprocessor, lambda image:
                            composite_alpha(image.rgb, image.alpha, self.background))

    def prepare(self, item: str, decoded: FileInput) -> list[Piece | Failure]:
        """One piece: the model input, plus ``mask`` for an image with alpha (when the job
        produces masks and the host decoded the image)."""
        image, arrays = decoded.image, dict(decoded.arrays)
        if self.mask_target is not None and image is not None and image.alpha is not None:
            arrays["mask"] = alpha_grid(image.alpha, image.rgb.shape[:2], self.preprocessor,
                                        self.mask_target)
        return [Piece(key=self.keys[item], tensor=decoded.tensor, arrays=arrays)]


def build_grid_job(folder: Path, paths: list[Path], rule: KeyRule, preprocessor: Preprocessor,
                   background: tuple[int, int, int], mask_target: int | None) -> GridJob:
    """The :class:`GridJob` of one listed split folder."""
    names, keys, dupes = index_folder([p.name for p in paths], lambda n: image_key(n, rule))
    return GridJob(folder, names, keys, dupes, preprocessor, tuple(background), mask_target)


@dataclass
class GridCompute:
    """Engine ``compute``: ``Batch.inputs [B,3,H,W]`` -> ``grids`` (pooled to ``target``, in
    ``array_layout``), optional ``global [B, D]`` (the encoder's pooled embedding) and the
    ``mask`` the job produced, on the CPU. ``Batch.inputs`` are the workers' uint8 (see
    :func:`~featcache.encoders.preprocess.model_input`): normalisation happens on the device,
    and with ``dtype`` (``fp16``/``fp32``) the features are cast there too, so only storage
    bytes come back (``None``: float32, the writer casts)."""

    encoder: Encoder
    device: torch.device
    target: int
    array_layout: ArrayLayout
    save_global: bool = False
    precision: Precision = "auto"
    dtype: str | None = None
    pad_to: int = 0   # rows of every model call on the device paths (the engine's batch_size)

    def __call__(self, batch: Any) -> dict[str, np.ndarray]:
        x = batch_model_input(batch.inputs, batch.arrays, self.encoder.spec, self.device,
                              self.pad_to)
        with autocast_for(self.device, self.precision):
            out = self.encoder(x)
        grid = arrange_grid(out.grid.float(), self.target, self.array_layout)
        result = {"grids": to_storage(grid, self.dtype)}
        if self.save_global:
            if out.pooled is None:
                raise ValueError(f"{self.encoder.spec.name} has no pooled embedding")
            result["global"] = to_storage(out.pooled.float(), self.dtype)
        if "mask" in batch.arrays:  # images with alpha only: None for the others
            result["mask"] = batch.arrays["mask"]
        return result

    def item_bytes(self, dtype: str) -> int:
        """Bytes one image stores (grid, pooled embedding), from one forward of a blank
        input: the shard size depends on the model, never on the data."""
        h, w = self.encoder.spec.input_size
        blank = torch.zeros(1, 3, h, w, device=self.device)
        with torch.inference_mode():
            out = self.encoder(blank)
        grid = arrange_grid(out.grid.float(), self.target, self.array_layout)
        values = grid.numel() + (out.pooled.numel() if self.save_global else 0)
        return values * (2 if dtype == "fp16" else 4)


@dataclass(frozen=True)
class GridPlan:
    """What a grid stage extracts: ``grid`` is the stored side ``t`` (already checked against
    the spec's native grid), ``array_layout`` how one image's array is laid out."""

    stage: str
    spec: EncoderSpec
    grid: int
    array_layout: ArrayLayout
    save_global: bool = False
    load: Callable[..., Encoder] | None = None  # the family's loader (its module's load_*)


def run_grid_stage(plan: GridPlan, shared: SharedParams, params: GridParams) -> list[RunResult]:
    """Extract every split of ``params``: ``<out>/<split>.h5`` (layout ``hdf5``) or
    ``<out>/<split>/`` (layout ``npy``), then ``<out>/failures.tsv`` and the stage metrics.

    Raises :class:`ParamError` for a missing/empty split before loading the model, and
    ``TooManyFailures`` (after writing everything) when failures exceed ``max_failures``.
    """
    splits = list_splits(params, plan.stage)
    inputs = survey_splits(plan.stage, splits)
    device = rank_device(resolve_device(shared.device), init_distributed())
    encoder = load_encoder(plan.spec, device)
    compute = GridCompute(encoder, device, plan.grid, plan.array_layout, plan.save_global,
                          params.precision, dtype=params.dtype, pad_to=params.batch_size)
    results = [run_split(plan, params, name, folder, paths, compute)
               for name, (folder, paths) in splits.items()]
    finish_stage(plan.stage, params.out, results, params, extra={"inputs": inputs})
    return results


def survey_splits(stage: str, splits: dict[str, tuple[Path, list[Path]]],
                  ) -> dict[str, dict[str, int]]:
    """Per split: ``image_files`` listed, plus :func:`featcache.datasets.images.survey_folder`'s counts
    (files that are not images, sub-folders, 16-bit files with a low range), logged when
    non-zero: the metrics' ``inputs`` entry."""
    inputs = {}
    for name, (folder, paths) in splits.items():
        counts = {"image_files": len(paths), **survey_folder(folder, paths)}
        if counts["non_image_files"] or counts["sub_folders"]:
            log.warning("%s %s: %d files that are not images (extensions %s) and %d "
                        "sub-folders in %s are not read", stage, name,
                        counts["non_image_files"], " ".join(IMAGE_EXTENSIONS),
                        counts["sub_folders"], folder)
        if counts["low_range_16bit"]:
            log.warning("%s %s: %d 16-bit images use under 12 bits and do not say how many "
                        "are significant: they are nearly black", stage, name,
                        counts["low_range_16bit"])
        inputs[name] = counts
    return inputs


def run_split(plan: GridPlan, params: GridParams, split: str, folder: Path, paths: list[Path],
              compute: GridCompute) -> RunResult:
    """Run the engine on one split folder and write its output (see :func:`run_grid_stage`)."""
    npy = params.layout == "npy"
    rule: KeyRule = "stem" if npy else "image_id"
    job = build_grid_job(folder, paths, rule, Preprocessor(plan.spec, params.preprocess),
                         params.background, plan.grid if npy else None)
    out = Path(params.out) / split
    prov = grid_provenance(plan, params, split, folder, rule, compute.encoder)
    result = run_job(job, compute, stage=plan.stage, out=out, writer=params.layout,
                     writer_options=WriterOptions(dtype=params.dtype,
                                                  compression=params.compression),
                     provenance=prov.to_dict(), fingerprint=method_identity(prov),
                     params=params,
                     device=compute.device, item_bytes=compute.item_bytes(params.dtype))
    log.info("%s %s: %d images, %d computed, %d reused, %d written, %d failed", plan.stage,
             split, result.items, result.computed, result.reused, result.records,
             result.failed)
    if params.save_meta and result.finalized and init_distributed().is_main:
        write_meta_files(out, job, prov)
    return result


def method_identity(provenance: GridProvenance) -> dict[str, Any]:
    """What a grid depends on besides its image: the provenance without the split's name and
    folder (they choose the images; each image's content signature stands for it), so a split
    moved or renamed reuses its shards; and the library versions (a new library version
    recomputes the grids)."""
    kept = {k: v for k, v in provenance.to_dict().items() if k not in ("split", "images")}
    return {**kept, "library_versions": library_versions()}


def grid_provenance(plan: GridPlan, params: GridParams, split: str, folder: Path, rule: KeyRule,
                    encoder: Encoder) -> GridProvenance:
    """Provenance of one split's output: the encoder's own (model, weights, weights_id,
    preprocessing = the full spec) plus the grid, layout, key rule and alpha handling."""
    shape = "(g*g, C)" if plan.array_layout == "tokens" else "(C, g, g)"
    native = plan.spec.grid_size[0]
    return GridProvenance(
        **encoder_facts(encoder), grid=plan.grid, native_grid=native,
        pooling="none" if plan.grid == native else
        f"avg_pool2d kernel {native // plan.grid} (non-overlapping blocks)",
        array_layout=plan.array_layout, array_shape=shape, split=split,
        images=folder.as_posix(), key_rule=rule, background=tuple(params.background),
        alpha="composited over background before encoding; mask = alpha averaged per cell",
        precision=params.precision,
        compute_precision=_compute_precision(encoder, params.precision),
        host_path=PREPROCESS_DESCRIPTIONS[params.preprocess] if params.preprocess != "exact"
        else HOST_PATH, preprocess=params.preprocess,
    )


HOST_PATH = ("workers: decode, resize, crop -> uint8; device: /255, normalise, forward, cast to "
             "the storage dtype")


def _compute_precision(encoder: Encoder, precision: Precision) -> str:
    """The precision ``auto`` resolves to on the encoder's device (bf16 where supported)."""
    return resolve_precision(next(encoder.parameters()).device, precision)


def image_header(path: Path) -> dict[str, Any]:
    """Display size, PIL mode and transparency of an image file, read from its header only."""
    with Image.open(path) as img:
        width, height = img.size
        if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF orientations that transpose
            width, height = height, width
        alpha = img.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info
        return {"width": width, "height": height, "source_mode": img.mode, "has_alpha": alpha}


def write_meta_files(out: Path, job: GridJob, prov: GridProvenance) -> int:
    """``<out>/<stem>.json`` for every written image (the seed's ``--save_meta``): the image,
    its size and mode, the arrays' files and shape, the model and preprocessing."""
    common = {"model": prov.model, "weights": prov.weights, "weights_id": prov.weights_id,
              "grid": prov.grid, "array_shape": prov.array_shape,
              "background": list(prov.background),
              "input_size": list(prov.preprocessing.input_size),
              "resize": prov.preprocessing.resize}
    written = 0
    for name in job.names:
        key = job.keys[name]
        features = out / f"{key}.npy"
        if name in job.duplicates or not features.is_file() or key == "provenance":
            continue
        mask = out / f"{key}_mask.npy"
        meta = {**common, **image_header(job.folder / name), "image": name, "key": key,
                "features": features.name, "mask": mask.name if mask.is_file() else None,
                "shape": list(np.load(features, mmap_mode="r").shape)}
        write_text(out / f"{key}.json", json.dumps(meta, sort_keys=True, indent=2) + "\n")
        written += 1
    return written
