"""SAM2 / SAM2.1 image-encoder features per image (stage ``extract_sam2``).

Input: a flat folder of images (SA-1B style, ``sa_<n>.jpg`` beside ``sa_<n>.json``, or any image
folder; JSON files are not read, so the stage depends on the images only). Each image is decoded
by :func:`featcache.datasets.images.load_image` (EXIF orientation applied, alpha ignored as PIL's
``convert("RGB")`` does), squashed to the encoder's square input (1024) by SAM2's own transform
and encoded in batches across images; any size and aspect ratio works.

Output: the sharded folder ``<out>/`` (``index.h5``, ``shards/*.h5``; read it with
``featcache.open_features(out, field="P4_S16")[stem]``), one item per image keyed by its stem:

- ``P4_S16``: ``backbone_fpn[2]``, ``(256, 64, 64)``, stride 16 (the map to read);
- ``P5_S32``: ``backbone_fpn[3]``, ``(256, 32, 32)``, stride 32 (the encoder is built with
  ``scalp=0``; the official configs' ``scalp: 1`` drops this level, P4 is the same either way);
- ``feature_flag``: int64 scalar ``1``.

``layout: npz`` also writes the seed's ``<out>/<stem>_features.npz`` per image (and
``<out>/provenance.json``), with the keys above plus ``IMAGE_EMB_S16``, the seed's compatibility
key: a byte copy of ``P4_S16``, written into the NPZ files only (never stored twice in the
shards; read ``P4_S16``).

Float maps are stored in ``dtype`` (fp16 by default, or fp32); rows are ``y`` (down), columns
``x`` (right) of the squashed input. These are the raw ``backbone_fpn`` levels: SAM2's predictor
applies ``conv_s0``/``conv_s1`` and ``no_mem_embed`` on top, the cache does not (recorded in the
output's provenance). A file that cannot be decoded is a ``<out>/failures.tsv`` row, never an
item.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from featcache.config import ParamError, SharedParams, require
from featcache.datasets.images import list_images
from featcache.encoders import Preprocessor, resolve_device
from featcache.encoders.device_input import batch_model_input
from featcache.encoders.preprocess import (
    PREPROCESS_DESCRIPTIONS,
    FileInput,
    PreprocessPath,
    prepare_file,
)
from featcache.encoders.sam2 import CONFIGS, load_sam2, resolve_sam2_spec
from featcache.encoders.weights import resolve_stage_spec
from featcache.engine import WriterOptions, finish_stage, run_job
from featcache.engine.distributed import init_distributed, rank_device
from featcache.engine.inference import autocast_for, resolve_precision, to_storage
from featcache.engine.types import Batch, Failure, ModelParams, Piece, RunResult
from featcache.provenance import Sam2Provenance, encoder_facts
from featcache.stages._image_folder import ImageFolderJob, index_folder

if TYPE_CHECKING:
    import torch

    from featcache.encoders import Encoder

log = logging.getLogger(__name__)

STAGE = "extract_sam2"
OUTPUT_SUFFIX = "_features"
FEATURE_FLAG = 1
LEVELS = ("P4_S16", "P5_S32")  # (256, 64, 64) and (256, 32, 32) at the 1024 input
NPZ_ALIASES = {"IMAGE_EMB_S16": "P4_S16"}  # the seed's copy of P4, in the npz layout only


def known_configs() -> tuple[str, ...]:
    """SAM2 configs the encoder can build (``sam2.1_hiera_t`` ... ``sam2_hiera_l``)."""

    return CONFIGS


@dataclass(frozen=True, kw_only=True)
class Sam2Params(ModelParams):
    """The ``extract_sam2`` section of params.yaml.

    ``images``: folder of images; ``out``: the output folder (sharded); ``config``: SAM2
    config name (``sam2.1_hiera_t``, ``sam2.1_hiera_b+``, ...); ``dtype``: storage dtype of the
    float maps; ``layout``: ``shards`` (default) or ``npz`` (also the seed's
    ``<stem>_features.npz`` per image in ``out``). The weights and seed are the shared
    top-level ``weights`` and ``seed``.
    """

    images: str
    out: str
    config: str = "sam2.1_hiera_t"
    dtype: Literal["fp16", "fp32"] = "fp16"
    layout: Literal["shards", "npz"] = "shards"
    preprocess: PreprocessPath = "exact"   # exact | fast | gpu_decode (README "Fast preprocessing")

    def validate(self) -> None:
        super().validate()
        require(bool(self.images.strip()), "images", "must name the folder of images")
        require(bool(self.out.strip()), "out", "must name the output folder")
        configs = known_configs()
        require(self.config in configs, "config",
                f"unknown SAM2 config {self.config!r}; known: {', '.join(configs)}")


@dataclass(frozen=True)
class Sam2Job(ImageFolderJob[FileInput]):
    """Engine job: one item per image file name in ``folder``, one piece per image, keyed by
    its stem (two images with one stem: the later is a failure row). Picklable: holds the
    preprocessor, never the model."""

    preprocess: Preprocessor

    @property
    def input_bytes(self) -> int:
        """Bytes of one exact-path model input (float32 ``[3, S, S]``, 12.6 MB at 1024): the
        engine hands these over through shared slots (:mod:`featcache.engine.slots`)."""
        h, w = self.preprocess.spec.input_size
        return 3 * h * w * 4

    def decode(self, item: str) -> FileInput:
        """The file's RGB (alpha ignored) along the preprocessor's path
        (:func:`prepare_file`)."""
        return prepare_file(self.folder / item, self.preprocess, lambda image: image.rgb)

    def prepare(self, item: str, decoded: FileInput) -> list[Piece | Failure]:
        """One piece: ``tensor [3, S, S]`` (the exact path's model input) or, on the device
        paths, no tensor and the device's arrays."""
        return [Piece(key=self.keys[item], tensor=decoded.tensor, arrays=decoded.arrays)]


def build_sam2_job(params: Sam2Params, preprocess: Preprocessor) -> Sam2Job:
    """List ``params.images`` once; raises :class:`ParamError` if it is not a folder."""
    folder = Path(params.images)
    if not folder.is_dir():
        raise ParamError(f"{STAGE}.images: folder not found: {folder}")
    names = [p.name for p in list_images(folder)]
    if not names:
        log.warning("no images in %s", folder)
    return Sam2Job(folder, *index_folder(names), preprocess)


def compute_precision(device: torch.device, dtype: str, requested: str = "auto") -> str:
    """``requested`` unless ``auto``; under ``auto``: bf16 autocast on a CUDA device that
    supports it (as SAM2's own code; fp16 can overflow in its encoder with real weights), else
    fp16 on CUDA, fp32 on the CPU (:func:`~featcache.engine.inference.resolve_precision`).
    ``dtype`` (the storage dtype) does not change the choice."""

    return resolve_precision(device, requested)


class Sam2Compute:
    """Batch of preprocessed images -> the stored fields of each image, on the CPU.

    Runs the encoder under :func:`autocast_for` with ``precision`` (see
    :func:`compute_precision`).
    """

    def __init__(self, encoder: Encoder, device: torch.device,
                 precision: str, dtype: str | None = None, pad_to: int = 0) -> None:
        self.encoder, self.device, self.precision = encoder, device, precision
        self.dtype = dtype   # the storage dtype, cast on the device (None: float32)
        self.pad_to = pad_to   # rows of every model call on the device paths (batch_size)

    def __call__(self, batch: Batch) -> dict[str, np.ndarray]:

        x = batch_model_input(batch.inputs, batch.arrays, self.encoder.spec, self.device,
                              self.pad_to)
        with autocast_for(self.device, self.precision):
            levels = self.encoder(x).levels
        return feature_fields({k: to_storage(levels[k].float(), self.dtype)
                               for k in LEVELS if k in levels},
                              self.encoder.spec.input_size[0])


def feature_fields(levels: Mapping[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """``{"P4_S16": [B,256,S/16,S/16], "P5_S32": [B,256,S/32,S/32]}`` float32 -> the stored
    fields (the two levels and ``feature_flag`` int64 ``[B]`` of ones; ``IMAGE_EMB_S16`` is
    added by the npz layout's writer, see :data:`NPZ_ALIASES`).

    Raises ``RuntimeError`` if a level is missing or mis-shaped (an encoder built with
    ``scalp=1`` has no P5): a wrong build must stop the run, not write wrong files.
    """
    for name, stride in (("P4_S16", 16), ("P5_S32", 32)):
        arr = levels.get(name)
        want = (256, size // stride, size // stride)
        if arr is None or arr.ndim != 4 or tuple(arr.shape[1:]) != want:
            got = None if arr is None else tuple(arr.shape)
            raise RuntimeError(f"SAM2 encoder level {name}: expected [B, *{want}], got {got}")
    p4, p5 = levels["P4_S16"], levels["P5_S32"]
    flag = np.full(len(p4), FEATURE_FLAG, dtype=np.int64)
    return {"P4_S16": p4, "P5_S32": p5, "feature_flag": flag}


def sam2_item_bytes(size: int, dtype: str) -> int:
    """Bytes one image stores at input ``size`` (P4 + P5 in the storage dtype; from params,
    never from the data): 256*64*64*2 + 256*32*32*2 for fp16 at 1024."""
    itemsize = 2 if dtype == "fp16" else 4
    return 256 * ((size // 16) ** 2 + (size // 32) ** 2) * itemsize


def sam2_provenance(encoder: Encoder, params: Sam2Params, precision: str) -> Sam2Provenance:
    """The output's provenance: the encoder's, plus what each stored key is (the storage
    dtype is the engine's ``storage_dtype``, as in every output)."""
    keys = {
        "P4_S16": "image_encoder(x)['backbone_fpn'][2], (256, S/16, S/16); read this one",
        "P5_S32": "image_encoder(x)['backbone_fpn'][3], (256, S/32, S/32), built with scalp=0",
        "feature_flag": "int64 1",
    }
    if params.layout == "npz":
        keys["IMAGE_EMB_S16"] = ("npz files only: a byte copy of P4_S16 (the seed's "
                                 "compatibility key); not stored in the shards")
    return Sam2Provenance(
        **encoder_facts(encoder),
        config=params.config, images=params.images,
        compute_precision=precision, keys=keys,
        raw_levels="raw backbone_fpn levels: SAM2's conv_s0/conv_s1 (mask decoder) and "
                   "no_mem_embed are NOT applied",
        input="load_image RGB (EXIF applied, alpha ignored), squashed to S x S "
              "as SAM2Transforms (bilinear, antialiased), ImageNet mean/std"
              + ("" if params.preprocess == "exact"
                 else f"; {PREPROCESS_DESCRIPTIONS[params.preprocess]}"),
        preprocess=params.preprocess,
    )


def sam2_fingerprint(params: Sam2Params, encoder: Encoder, precision: str) -> dict[str, Any]:
    """Everything but the images that determines the features (the shards' identity): the
    method params (not the engine knobs, nor ``out`` and ``layout``, which decide where the
    rows go and which view is added, not their bits), spec, weights identity, device type,
    precision. Each image's content enters through :meth:`Sam2Job.signature`."""
    method = {k: v for k, v in params.method_params().items() if k not in ("out", "layout")}
    return {"params": method,
            "spec": encoder.spec.to_dict(), "weights_id": encoder.weights_id,
            "device": next(encoder.parameters()).device.type, "precision": precision}


def extract_sam2(shared: SharedParams, params: Sam2Params) -> RunResult:
    """Write the sharded output ``params.out`` (one item per image of ``params.images``; with
    ``layout: npz`` also ``<out>/<stem>_features.npz`` and ``<out>/provenance.json``).

    Also writes ``<out>/failures.tsv`` and the metrics JSON (``params.metrics``), then raises
    ``TooManyFailures`` if more than ``max_failures`` images failed. Every parameter problem
    (config, weights, device, images folder) raises :class:`ParamError` before the model is
    built. Images whose content, params and weights match an earlier run's are reused, not
    recomputed (a killed run resumes, an added image costs one forward).
    """

    spec = resolve_stage_spec(resolve_sam2_spec, params.config, stage=STAGE,
                              shared=shared, key=f"{STAGE}.config")
    device = rank_device(resolve_device(shared.device), init_distributed())
    job = build_sam2_job(params, Preprocessor(spec, params.preprocess))
    encoder = load_sam2(spec, device)
    precision = compute_precision(device, params.dtype, params.precision)
    # the same options in both layouts, so that switching the layout reuses every shard
    options = WriterOptions(dtype=params.dtype, suffix=OUTPUT_SUFFIX, aliases=NPZ_ALIASES)
    result = run_job(job, Sam2Compute(encoder, device, precision, params.dtype,
                                         params.batch_size), stage=STAGE,
                     out=params.out, writer=params.layout, writer_options=options,
                     provenance=sam2_provenance(encoder, params, precision).to_dict(),
                     fingerprint=sam2_fingerprint(params, encoder, precision),
                     params=params, device=device,
                     item_bytes=sam2_item_bytes(spec.input_size[0], params.dtype))
    log.info("%s: %d images, %d computed, %d reused, %d written, %d failed", STAGE,
             result.items, result.computed, result.reused, result.records, result.failed)
    finish_stage(STAGE, params.out, [result], params)
    return result
