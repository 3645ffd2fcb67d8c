"""One SigLIP (any open_clip model) embedding per COCO panoptic segment (stage ``extract_siglip``).

Per segment, in DataLoader workers: mask ``m`` = PNG pixels whose id is the segment's; crop
box = the mask's bounding box, padded on each side by ``round(pad_ratio * w)`` pixels left and
right and ``round(pad_ratio * h)`` top and bottom (halves round up), clipped to the image; a box
narrower or shorter than ``min_crop`` grows to ``min_crop`` around the mask's centre (shifted to
stay inside the image, never beyond the image size); inside the box the background is blended
``out = m*img + (1-m)*(bg_alpha*img + (1-bg_alpha)*fill)`` in float and rounded to uint8
(``fill`` is an RGB triple in 0..255; the default ``[124, 116, 104]`` is the ImageNet mean, a
neutral grey-brown); then the model's own preprocessing (:class:`~featcache.encoders.Preprocessor`).
In the main process, crops from many images are batched; the embedding is the model's pooled
output (``encode_image``), L2-normalised, stored as fp16 ``(D,)``, D = the model's ``embed_dim``.

Outputs in ``out`` (keys ``<image_id:012d>_<segment_id>``, rows in JSON order of images and
segments):

- ``layout: shards`` (default): the sharded folder (``index.h5``, ``shards/*.h5``) with fields
  ``embeddings (D,) float16``, ``image_id`` and ``segment_id`` (int64), ``iscrowd`` (uint8), and
  ``inst2feat.tsv`` whose ``feat_file`` is ``shards/<shard>.h5#<row>``;
- ``layout: hdf5``: also ``embeddings.h5``, a packed view of the shards (``embeddings (N, D)``,
  ``image_id (N,)``, ``segment_id (N,)``, ``iscrowd (N,)``, ``keys (N,)``; HDF5 virtual datasets,
  no copy) and ``inst2feat.tsv`` whose ``feat_file`` is ``embeddings.h5#<row>``;
- ``layout: npy``: also ``<key>.npy`` ``(D,) float16`` per segment, the engine's ``index.tsv``
  and ``inst2feat.tsv`` whose ``feat_file`` is ``<key>.npy`` (the seed's layout);
- ``failures.tsv``: one row per image or segment that gave no embedding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from featcache.config import ParamError, SharedParams, require
from featcache.datasets.coco_panoptic import (
    PanopticEntry,
    PanopticError,
    PanopticSplit,
    read_ids_and_image,
    read_panoptic_split,
    segment_key,
)
from featcache.encoders import Preprocessor, resolve_device
from featcache.encoders.openclip import load_openclip, resolve_openclip_spec
from featcache.encoders.preprocess import model_input
from featcache.encoders.weights import resolve_stage_spec
from featcache.engine import WriterOptions, file_signature, finish_stage, run_job
from featcache.engine.atomic import write_text
from featcache.engine.distributed import init_distributed, rank_device
from featcache.engine.inference import autocast_for, resolve_precision, to_storage
from featcache.engine.shards import SHARDS_DIR, read_index
from featcache.engine.types import Batch, Failure, ModelParams, Piece, RunResult
from featcache.failures import FailureCode
from featcache.provenance import CropSettings, SiglipProvenance, encoder_facts

if TYPE_CHECKING:
    import torch

    from featcache.encoders import Encoder, EncoderSpec, Preprocessor

log = logging.getLogger(__name__)

STAGE = "extract_siglip"
H5_NAME = "embeddings.h5"
INDEX_NAME = "inst2feat.tsv"
INDEX_HEADER = "image_id\tsegment_id\tfeat_file"
SEGMENTS_PER_IMAGE = 8   # COCO panoptic averages about 7 segments an image: sizes the shards
Box = tuple[int, int, int, int]  # x0, y0, x1, y1: pixel columns/rows, end exclusive


@dataclass(frozen=True, kw_only=True)
class SiglipParams(ModelParams):
    """The ``extract_siglip`` section of params.yaml (see the module docstring).

    ``coco``: COCO root; ``split``: e.g. ``val2017``; ``out``: output folder; ``model``: any
    open_clip model name; ``bg_alpha`` in [0, 1] (1 = no blending); ``pad_ratio`` in [0, 10];
    ``fill``: RGB in 0..255; ``min_crop``: smallest crop side in pixels (>= 1).
    """

    coco: str
    split: str
    out: str
    model: str = "ViT-B-16-SigLIP"
    bg_alpha: float = 0.3
    pad_ratio: float = 0.1
    fill: tuple[int, ...] = (124, 116, 104)
    min_crop: int = 32
    layout: Literal["shards", "hdf5", "npy"] = "shards"

    def validate(self) -> None:
        super().validate()
        for key in ("coco", "split", "out", "model"):
            require(bool(getattr(self, key).strip()), key, "must not be empty")
        require(0.0 <= self.bg_alpha <= 1.0, "bg_alpha", f"must be in [0, 1], got {self.bg_alpha}")
        require(0.0 <= self.pad_ratio <= 10.0, "pad_ratio",
                f"must be in [0, 10] (a fraction of the mask's width/height), got {self.pad_ratio}")
        require(len(self.fill) == 3 and all(0 <= v <= 255 for v in self.fill), "fill",
                f"must be an RGB triple of integers in 0..255, got {list(self.fill)}")
        require(self.min_crop >= 1, "min_crop", f"must be >= 1 pixel, got {self.min_crop}")


def mask_bbox(mask: np.ndarray) -> Box | None:
    """Bounding box ``(x0, y0, x1, y1)`` (end exclusive) of a bool ``(H, W)`` mask, or None."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _span(lo: int, hi: int, size: int, pad_ratio: float, min_len: int) -> tuple[int, int]:
    """Pad ``[lo, hi)`` by ``round(pad_ratio * (hi - lo))`` each side, clip to ``[0, size)``,
    then grow to ``min(min_len, size)`` around the centre, shifted to stay inside."""
    pad = int(pad_ratio * (hi - lo) + 0.5)
    a, b = max(lo - pad, 0), min(hi + pad, size)
    n = min(min_len, size)
    if b - a >= n:
        return a, b
    start = int(np.floor((lo + hi) / 2 - n / 2))
    start = min(max(start, 0), size - n)
    return start, start + n


def crop_box(bbox: Box, height: int, width: int, pad_ratio: float, min_crop: int) -> Box:
    """The crop of a mask bounding box in an ``height x width`` image (see module docstring).
    The result always contains ``bbox``."""
    x0, x1 = _span(bbox[0], bbox[2], width, pad_ratio, min_crop)
    y0, y1 = _span(bbox[1], bbox[3], height, pad_ratio, min_crop)
    return x0, y0, x1, y1


def blend_background(rgb: np.ndarray, mask: np.ndarray, bg_alpha: float,
                     fill: tuple[int, int, int]) -> np.ndarray:
    """``out = m*img + (1-m)*(bg_alpha*img + (1-bg_alpha)*fill)``, rounded to ``uint8``.

    ``rgb``: ``uint8 (H, W, 3)``; ``mask``: bool ``(H, W)``; mask pixels are returned unchanged.
    """
    img = rgb.astype(np.float32)
    background = bg_alpha * img + (1.0 - bg_alpha) * np.asarray(fill, np.float32)
    out = np.where(mask[..., None], img, background)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def segment_crop(rgb: np.ndarray, mask: np.ndarray, box: Box, crop: CropSettings) -> np.ndarray:
    """The blended ``uint8 (h, w, 3)`` crop of one segment; ``box`` from :func:`crop_box`."""
    x0, y0, x1, y1 = box
    return blend_background(rgb[y0:y1, x0:x1], mask[y0:y1, x0:x1], crop.bg_alpha, crop.fill)


class SiglipJob:
    """Engine job: one item per panoptic annotation (image), one piece per segment.

    Each piece's ``tensor`` is the preprocessed crop ``[3, H_in, W_in] float32``; its
    ``arrays`` hold ``image_id``/``segment_id`` (int64) and ``iscrowd`` (uint8) scalars.
    """

    def __init__(self, split: PanopticSplit, preprocess: Preprocessor, crop: CropSettings,
                 ) -> None:
        self.split, self.preprocess, self.crop = split, preprocess, crop
        self._entries = {e.item: e for e in split.entries}

    def items(self) -> list[str]:
        return [e.item for e in self.split.entries]

    def signature(self, item: str) -> str:
        """The image, its panoptic PNG and its annotation (segments, ids, boxes) as parsed."""

        entry = self._entries[item]
        if entry.image is None:
            return file_signature([self.split.json_path], extra=f"{item}\t{entry.error}")
        return file_signature([self.split.image_dir / entry.image.image_file,
                               self.split.png_dir / entry.image.png_file],
                              extra=repr(entry.image))

    def load(self, item: str) -> list[Piece | Failure]:
        entry: PanopticEntry = self._entries[item]
        if entry.error is not None:
            return [Failure(item, entry.error.code, str(entry.error))]
        image = entry.image
        out: list[Piece | Failure] = [Failure(name, e.code, str(e))
                                      for name, e in image.bad_segments]
        if not image.segments:
            return out
        try:
            ids, rgb = read_ids_and_image(self.split, image)
        except PanopticError as e:
            return out + [Failure(item, e.code, str(e))]
        for seg in image.segments:
            mask = ids == seg.id
            bbox = mask_bbox(mask)
            key = segment_key(image.image_id, seg.id)
            if bbox is None:
                out.append(Failure(key, FailureCode.EMPTY_MASK,
                                   f"segment {seg.id} is in the JSON but "
                                   f"has no pixel in {image.png_file}"))
                continue
            box = crop_box(bbox, *ids.shape, self.crop.pad_ratio, self.crop.min_crop)
            tensor = self.preprocess.prepare(segment_crop(rgb, mask, box, self.crop))
            out.append(Piece(key, tensor, {"image_id": np.int64(image.image_id),
                                           "segment_id": np.int64(seg.id),
                                           "iscrowd": np.uint8(seg.iscrowd)}))
        return out


class SiglipCompute:
    """``Batch -> {"embeddings": float32 [B, D] unit-norm, + the id fields}`` on the CPU.

    ``with_ids`` adds ``image_id``/``segment_id`` ``int64 [B]`` and ``iscrowd`` ``uint8 [B]``
    (the shards and hdf5 layouts); the npy layout stores the embedding alone.
    """

    def __init__(self, encoder: Encoder, device: torch.device, with_ids: bool = True,
                 precision: str = "auto", dtype: str | None = None) -> None:
        self.encoder, self.device, self.with_ids = encoder, device, with_ids
        self.precision, self.dtype = precision, dtype   # dtype: cast on the device (fp16)

    def __call__(self, batch: Batch) -> dict[str, np.ndarray]:


        x = model_input(batch.inputs, self.encoder.spec, self.device)
        with autocast_for(self.device, self.precision):
            pooled = self.encoder(x).pooled
        emb_t = torch.nn.functional.normalize(pooled.float(), dim=-1)
        bad = (~((emb_t.norm(dim=1) - 1.0).abs() < 1e-3)).cpu().numpy()  # NaN/inf, zero pooled
        emb = to_storage(emb_t, self.dtype)
        if bad.any():  # stop rather than store a wrong feature
            raise FloatingPointError(f"pooled output not normalisable for "
                                     f"{np.asarray(batch.keys)[bad].tolist()}")
        out = {"embeddings": emb}
        if self.with_ids:
            out.update({name: np.stack(batch.arrays[name])
                        for name in ("image_id", "segment_id", "iscrowd")})
        return out

    def item_bytes(self) -> int:
        """Bytes one image stores: ``SEGMENTS_PER_IMAGE`` fp16 embeddings plus their ids (the
        embedding size from one forward of a blank input: from the model, not the data)."""

        h, w = self.encoder.spec.input_size
        with torch.inference_mode():
            pooled = self.encoder(torch.zeros(1, 3, h, w, device=self.device)).pooled
        return SEGMENTS_PER_IMAGE * (pooled.shape[-1] * 2 + 17)


def write_index(out: Path, layout: str) -> int:
    """Write ``<out>/inst2feat.tsv`` from the output's index; returns its number of rows."""

    if layout in ("shards", "hdf5"):
        keys, shard, row, names, _ = read_index(out)
        files = ([f"{H5_NAME}#{r}" for r in range(len(keys))] if layout == "hdf5" else
                 [f"{SHARDS_DIR}/{names[s]}#{r}" for s, r in zip(shard, row)])
    else:  # the npy writer's index.tsv: key, field, file
        cells = [ln.split("\t") for ln in
                 (out / "index.tsv").read_text(encoding="utf-8").splitlines()[1:]]
        keys, files = [c[0] for c in cells], [c[2] for c in cells]
    rows = [INDEX_HEADER]
    for key, feat_file in zip(keys, files):
        image, segment = key.split("_", 1)
        rows.append("\t".join(_tsv_cell(c) for c in (image, segment, feat_file)))
    write_text(out / INDEX_NAME, "\n".join(rows) + "\n")
    return len(rows) - 1


def _tsv_cell(text: str) -> str:
    """``text`` with backslash, tab, newline and carriage return written as two-character
    backslash escapes, so one row stays one line of three cells whatever a name holds."""
    return (text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")
            .replace("\r", "\\r"))


def build_siglip_job(params: SiglipParams, spec: EncoderSpec) -> SiglipJob:
    """Read the split (cheap, main process); a missing or unreadable COCO root, JSON or PNG
    folder raises :class:`ParamError` naming ``extract_siglip.coco``."""

    try:
        split = read_panoptic_split(params.coco, params.split)
    except (FileNotFoundError, PanopticError) as e:
        raise ParamError(f"{STAGE}.coco: {e} (split {params.split!r})") from None
    if not split.entries:
        log.warning("%s: no annotations in %s", STAGE, split.json_path)
    return SiglipJob(split, Preprocessor(spec), crop_settings(params))


def crop_settings(params: SiglipParams) -> CropSettings:
    """The crop settings of the params (what the job uses and the provenance records)."""
    return CropSettings(params.bg_alpha, params.pad_ratio, tuple(params.fill), params.min_crop)


def siglip_provenance(params: SiglipParams, encoder: Encoder) -> SiglipProvenance:
    """What the embeddings depend on (HDF5 attributes or ``provenance.json``)."""

    return SiglipProvenance(
        **encoder_facts(encoder), coco=params.coco, split=params.split,
        crop=crop_settings(params), key="<image_id:012d>_<segment_id>",
        embedding="encode_image of the blended, padded segment crop, L2-normalised",
        png_ids="R + 256*G + 256^2*B",
        compute_precision=resolve_precision(next(encoder.parameters()).device,
                                            params.precision))


def failed_images(failures: list[Failure]) -> int:
    """Distinct images with at least one failure (segment items start with the image key)."""
    return len({f.item.split("_", 1)[0] for f in failures})


def run_siglip(job: SiglipJob, compute: SiglipCompute, params: SiglipParams,
               provenance: dict[str, Any], fingerprint: dict[str, Any]) -> RunResult:
    """Run the engine into ``params.out`` and write ``inst2feat.tsv`` (rank 0).

    ``result.failed`` counts images with any failure (an image or one of its segments).
    """

    out = Path(params.out)
    result = run_job(job, compute, stage=STAGE, out=out,
                     writer="hdf5_packed" if params.layout == "hdf5" else params.layout,
                     writer_options=WriterOptions(dtype="fp16"), provenance=provenance,
                     fingerprint=fingerprint, params=params, device=compute.device,
                     item_bytes=compute.item_bytes(), view=out / H5_NAME)
    if result.finalized and init_distributed().is_main:
        rows = write_index(out, params.layout)
        if rows != result.records:
            raise RuntimeError(f"{INDEX_NAME} has {rows} rows for {result.records} embeddings")
    result.failed = failed_images(result.failures)
    return result


def extract_siglip(shared: SharedParams, params: SiglipParams) -> RunResult:
    """Embed every segment of ``params.coco``/``params.split`` into ``params.out``.

    Bad params (model, weights, device, paths) raise :class:`ParamError` before any work.
    Also writes ``<out>/failures.tsv`` and ``metrics/extract_siglip.json``, then raises
    ``TooManyFailures`` when more than ``max_failures`` images failed.
    """

    spec = resolve_stage_spec(resolve_openclip_spec, params.model, stage=STAGE,
                              shared=shared, key=f"{STAGE}.model")
    device = rank_device(resolve_device(shared.device), init_distributed())
    job = build_siglip_job(params, spec)
    encoder = load_openclip(spec, device)
    compute = SiglipCompute(encoder, device, with_ids=params.layout != "npy",
                            precision=params.precision, dtype="fp16")
    # where the split lives and where the output goes choose the items, not their rows: the
    # items' content signatures stand for them, so a moved dataset reuses its shards
    method = {k: v for k, v in params.method_params().items()
              if k not in ("coco", "split", "out")}
    fingerprint = {"params": method, "spec": spec.to_dict(), "weights_id": encoder.weights_id}
    result = run_siglip(job, compute, params, siglip_provenance(params, encoder).to_dict(),
                        fingerprint)
    if init_distributed().is_main:  # other ranks hold no assembled counts
        log.info("%s: %d images, %d embeddings, %d images with failures", STAGE,
                 result.items, result.records, result.failed)
    finish_stage(STAGE, params.out, [result], params,
                 extra={"embeddings": result.records, "failure_rows": len(result.failures)})
    return result
