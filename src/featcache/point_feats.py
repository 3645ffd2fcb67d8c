"""sample_point_feats: CLIP grid features sampled at each point's pixel in each frame.

For every frame of the uv index (:mod:`featcache.uv_index`), the frame's CLIP grid from
extract_clip_grid (``<clip_grid>/<scene>.h5``, dataset ``{frame}_grids``, ``(g*g, width)``
row-major tokens) becomes a map ``(width, g, g)``, is upsampled with
``PixelShuffle(upscale)`` (2: ``(768,14,14) -> (192,28,28)``) and is sampled bilinearly
(``grid_sample``, ``align_corners=False``, border padding) at each point's pixel.

Coordinates: ``uv_idx`` is in colour-image pixels (x right, y down, pixel centres at
integers). The grid covers the *model input*, so ``u`` is first mapped through the encoder's
resize (and centre crop for ``shortest_crop``), read from the grid file's provenance:
``x_in = (u + 0.5) * scale_x - offset_x - 0.5``, then normalised as
``x_norm = (x_in + 0.5) / W_in * 2 - 1`` (same for y with H). Points whose pixel falls outside
the model input (cropped away) are not valid. One ``<scene>/frame_<idx>.npz`` per frame:

- ``pts_feat (N, C) float16``: ``C = width / upscale²``; zeros where not valid;
- ``uv_idx (N,2) float32`` (copied), ``valid (N,) bool`` (uv valid and inside the model input),
  ``conf_2d (N,) float32`` (the uv index's, zero where not valid).

The seed's trainable layers (Conv1x1 to 256-d, Linear 256->128) belong to the user's model and
are not applied here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from featcache.config import ParamError, require
from featcache.engine.types import EngineParams, Failure, Piece, RunResult

if TYPE_CHECKING:
    import torch

    from featcache.encoders.base import EncoderSpec

log = logging.getLogger(__name__)

STAGE = "sample_point_feats"


class GridError(ValueError):
    """A missing or unusable CLIP grid; ``code`` names the failure in ``failures.tsv``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, kw_only=True)
class PointFeatsParams(EngineParams):
    """The ``sample_point_feats`` section: input folders (uv index npz folder, CLIP grid
    folder with one ``<scene>.h5`` per scene), the output folder, the PixelShuffle factor and
    ``compression`` (``gzip`` deflates the NPZ entries)."""

    uv_index: str
    clip_grid: str
    out: str
    upscale: int = 2
    compression: Literal["none", "gzip"] = "none"

    def validate(self) -> None:
        super().validate()
        require(self.upscale >= 1, "upscale", f"must be >= 1 (1 = no PixelShuffle), "
                f"got {self.upscale}")


def tokens_to_map(tokens: np.ndarray, upscale: int) -> torch.Tensor:
    """``(g*g, width)`` row-major tokens -> ``PixelShuffle(upscale)`` map
    ``(width / upscale², g*upscale, g*upscale)`` float32."""
    import torch

    n, width = tokens.shape
    side = math.isqrt(n)
    if side * side != n:
        raise GridError("bad_grid", f"{n} tokens do not form a square grid")
    if width % (upscale * upscale):
        raise GridError("bad_grid", f"width {width} is not divisible by upscale² = {upscale**2}")
    grid = torch.from_numpy(np.asarray(tokens, dtype=np.float32)).T.reshape(width, side, side)
    return torch.nn.functional.pixel_shuffle(grid[None], upscale)[0]


def spec_from_provenance(provenance: dict[str, Any]) -> EncoderSpec:
    """The :class:`EncoderSpec` recorded in a grid file's ``preprocessing`` provenance entry."""
    from featcache.encoders.base import EncoderSpec

    pre = provenance.get("preprocessing")
    if not isinstance(pre, dict):
        raise GridError("bad_provenance", "grid file provenance has no 'preprocessing' entry")
    names = {f.name for f in dataclasses.fields(EncoderSpec)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in pre.items() if k in names}
    try:
        return EncoderSpec(**values)
    except TypeError as e:
        raise GridError("bad_provenance", f"preprocessing entry incomplete: {e}") from None


def input_coords(uv: np.ndarray, image_size: tuple[int, int], spec: EncoderSpec) -> np.ndarray:
    """Colour-image pixels ``(N,2)`` (x, y; centres at integers) of a ``(W, H)`` image ->
    model-input pixels ``(N,2)`` float64, same convention, via the encoder's resize geometry."""
    from featcache.encoders.preprocess import Preprocessor

    width, height = image_size
    geo = Preprocessor(spec).geometry(height, width)
    x_in, y_in = geo.to_input(uv[:, 0].astype(np.float64), uv[:, 1].astype(np.float64))
    return np.stack([x_in, y_in], axis=1)


def normalise_coords(xy_in: np.ndarray, input_size: tuple[int, int]) -> tuple[np.ndarray,
                                                                              np.ndarray]:
    """Model-input pixels ``(N,2)`` (x, y) of an ``(H_in, W_in)`` input -> ``grid_sample``
    coordinates ``(N,2)`` in [-1, 1] (``align_corners=False``) and ``(N,)`` bool: inside the
    input, i.e. ``-0.5 <= x_in <= W_in - 0.5`` (pixel edges), same for y."""
    h_in, w_in = input_size
    extent = np.array([w_in, h_in], dtype=np.float64)
    norm = (xy_in + 0.5) / extent * 2 - 1
    inside = np.isfinite(norm).all(1) & (np.abs(norm) <= 1 + 1e-9).all(1)
    return norm, inside


def sample_map(feature_map: torch.Tensor, coords: np.ndarray) -> np.ndarray:
    """Bilinear samples of a ``(C, h, w)`` map at ``grid_sample`` coords ``(N,2)`` (x, y in
    [-1, 1], ``align_corners=False``; border padding so the outer half cell is not blended
    with zeros) -> ``(N, C)`` float32."""
    import torch

    grid = torch.from_numpy(np.asarray(coords, dtype=np.float32)).view(1, 1, -1, 2)
    out = torch.nn.functional.grid_sample(feature_map[None].float(), grid, mode="bilinear",
                                          padding_mode="border", align_corners=False)
    return out[0, :, 0, :].T.contiguous().numpy()


def sample_point_features(tokens: np.ndarray, uv: np.ndarray, valid: np.ndarray,
                          image_size: tuple[int, int], spec: EncoderSpec, upscale: int,
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Features of N points in one frame: ``(pts_feat (N, C) float16, valid (N,) bool)``.

    ``tokens (g*g, width)`` is the frame's grid, ``uv (N,2)`` colour pixels (centres at
    integers) of an image of ``image_size = (W, H)``, ``valid (N,)`` the uv index's mask.
    """
    feature_map = tokens_to_map(tokens, upscale)
    coords, inside = normalise_coords(input_coords(uv, image_size, spec), spec.input_size)
    keep = np.asarray(valid, dtype=bool) & inside
    feats = np.zeros((len(uv), feature_map.shape[0]), dtype=np.float16)
    if keep.any():
        feats[keep] = sample_map(feature_map, coords[keep]).astype(np.float16)
    return feats, keep


def read_grid(h5_path: Path, frame: str) -> tuple[np.ndarray, EncoderSpec]:
    """The tokens ``(g*g, width)`` of colour frame ``frame`` and the spec that made them."""
    import h5py

    if not h5_path.is_file():
        raise GridError("missing_grid", f"grid file not found: {h5_path}")
    with h5py.File(h5_path, "r") as f:
        name = f"{frame}_grids"
        if name not in f:
            raise GridError("missing_grid", f"{h5_path.name} has no dataset {name}")
        tokens = f[name][()]
        provenance = json.loads(f.attrs.get("provenance", "{}"))
    if tokens.ndim != 2:
        raise GridError("bad_grid", f"{name}: shape {tokens.shape}, expected (g*g, width)")
    return tokens, spec_from_provenance(provenance)


@dataclass(frozen=True)
class PointFeatsJob:
    """Model-free engine job: one item per uv-index frame (``<scene>/frame_<idx>``)."""

    params: PointFeatsParams

    def items(self) -> list[str]:
        root = Path(self.params.uv_index)
        return sorted(p.relative_to(root).with_suffix("").as_posix()
                      for p in root.rglob("*.npz"))

    def grid_file(self, item: str) -> Path:
        return Path(self.params.clip_grid) / f"{item.split('/')[0]}.h5"

    def load(self, item: str) -> list[Piece | Failure]:
        with np.load(Path(self.params.uv_index) / f"{item}.npz") as npz:
            uv, valid, conf = npz["uv_idx"], npz["valid"], npz["conf_2d"]
            frame, size = str(npz["frame"]), tuple(int(s) for s in npz["image_size"])
        try:
            tokens, spec = read_grid(self.grid_file(item), frame)
            feats, keep = sample_point_features(tokens, uv, valid, size, spec,
                                                self.params.upscale)
        except GridError as e:
            return [Failure(item, e.code, str(e))]
        arrays = {"pts_feat": feats, "uv_idx": uv, "valid": keep,
                  "conf_2d": np.where(keep, conf, 0).astype(np.float32)}
        return [Piece(key=item, arrays=arrays)]


def grid_sources(params: PointFeatsParams, items: list[str]) -> dict[str, Any]:
    """Per scene, what made its CLIP grids (model, weights identity, preprocessing, grid), read
    from the grid files' provenance, so the point features record their origin."""
    import h5py

    keep = ("model", "weights", "weights_id", "preprocessing", "grid", "code_version")
    sources: dict[str, Any] = {}
    for scene in sorted({item.split("/")[0] for item in items}):
        path = Path(params.clip_grid) / f"{scene}.h5"
        if path.is_file():
            with h5py.File(path, "r") as f:
                prov = json.loads(f.attrs.get("provenance", "{}"))
            sources[scene] = {k: prov[k] for k in keep if k in prov}
    return sources


def check_inputs(params: PointFeatsParams) -> None:
    """Fail before any work, naming the key, when an input folder is missing."""
    for key in ("uv_index", "clip_grid"):
        if not Path(getattr(params, key)).is_dir():
            raise ParamError(f"{STAGE}.{key}: folder not found: {getattr(params, key)}")
    if not any(Path(params.clip_grid).glob("*.h5")):
        raise ParamError(f"{STAGE}.clip_grid: no <scene>.h5 in {params.clip_grid}; "
                         "extract_clip_grid must use layout: hdf5 with one split per scene")


def method_params(params: PointFeatsParams) -> dict[str, object]:
    """The params that determine the result (engine knobs such as ``num_workers`` excluded)."""
    return params.method_params()


def sample_point_feats(params: PointFeatsParams) -> RunResult:
    """Run the stage: the npz folder ``params.out`` (with ``provenance.json`` and
    ``failures.tsv``) and ``metrics/sample_point_feats.json`` (relative to the working
    directory).

    Raises ``TooManyFailures`` (after writing) when more than ``max_failures`` frames failed.
    """
    from featcache.engine import WriterOptions, file_signature, finish_stage, run_job

    check_inputs(params)
    job = PointFeatsJob(params)
    items = job.items()
    inputs = sorted({Path(params.uv_index) / f"{i}.npz" for i in items}
                    | {job.grid_file(i) for i in items})
    provenance = {"params": method_params(params), "notes": __doc__,
                  "clip_grid": grid_sources(params, items)}
    fingerprint = {"params": method_params(params), "inputs": file_signature(inputs)}
    result = run_job(job, None, stage=STAGE, out=params.out, writer="npz",
                     writer_options=WriterOptions(compression=params.compression),
                     provenance=provenance, fingerprint=fingerprint, params=params)
    log.info("%s: %d frames written, %d failed", STAGE, result.records, result.failed)
    finish_stage(STAGE, params.out, [result], params,
                 extra=summarise(Path(params.out)))
    return result


def summarise(out: Path) -> dict[str, float]:
    """Metrics over a written output: frames, feature channels, fraction of points sampled."""
    frames, channels, sampled = 0, 0, []
    for path in sorted(out.rglob("*.npz")):
        with np.load(path) as npz:
            frames += 1
            channels = int(npz["pts_feat"].shape[1])
            sampled.append(float(npz["valid"].mean()) if npz["valid"].size else 0.0)
    return {"frames": frames, "channels": channels,
            "sampled_fraction_mean": float(np.mean(sampled)) if sampled else 0.0}
