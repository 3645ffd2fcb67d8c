"""What params.yaml says each output was made with, for verify's ``<kind>.params`` and
``<kind>.records`` checks (:class:`~featcache.verify.outputs.Expectation` per output kind).

Each stage's section is loaded with that stage's own dataclass (so the values are the ones the
stage would use: data root joined, per-stage weights resolved), then the provenance fields the
stage records are paired with the param keys that set them. The weights identity is what the
stage would record now: ``random(seed=N)``, or ``sha256:<hex>`` of a checkpoint path (a file
replaced in place makes the output stale); a tag is compared by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from featcache.config import (
    PARAMS_FILE,
    SharedParams,
    load_stage_params,
    read_params_file,
)
from featcache.encoders import weights as W
from featcache.stages.build_uv_index import UvIndexParams
from featcache.stages.edge_maps_methodB import EdgeParams
from featcache.stages.extract_clip_grid import ClipGridParams
from featcache.stages.extract_dinov2 import Dinov2Params
from featcache.stages.extract_sam2 import Sam2Params
from featcache.stages.extract_siglip import SiglipParams
from featcache.stages.sample_point_feats import PointFeatsParams
from featcache.verify.outputs import Expectation

# verify's output kinds and the stage that makes each
KIND_STAGES = {"clip_grid": "extract_clip_grid", "dinov2": "extract_dinov2",
               "siglip": "extract_siglip", "sam2": "extract_sam2", "edges": "edge_maps_methodB",
               "uv_index": "build_uv_index", "point_feats": "sample_point_feats"}


def weights_identity(shared: SharedParams) -> dict[str, tuple[str, Any]]:
    """``weights`` and, where it can be known without loading a model, ``weights_id``."""

    found: dict[str, tuple[str, Any]] = {"weights": (shared.weights_key, shared.weights)}
    if W.is_random(shared.weights):
        found["weights_id"] = ("seed", W.random_weights_id(shared.seed))
    elif W.looks_like_path(shared.weights) and Path(shared.weights).expanduser().exists():
        found["weights_id"] = (shared.weights_key, W.sha256_path(Path(shared.weights).expanduser()))
    return found


def made_with(kind: str, stage: str, shared: SharedParams, p: Any) -> dict[str, tuple[str, Any]]:
    """Provenance path -> (param key, value) for one output kind."""
    def own(*names: str, at: str = "") -> dict[str, tuple[str, Any]]:
        return {f"{at}{n}": (f"{stage}.{n}", getattr(p, n)) for n in names}

    layout = {"layout": (f"{stage}.layout", p.layout)}
    if kind == "clip_grid":
        found = {"model": ("model", shared.model), "storage_dtype": (f"{stage}.dtype", p.dtype),
                 **layout, **weights_identity(shared)}
        if p.grid:
            found["grid"] = (f"{stage}.grid", p.grid)
        return found
    if kind == "dinov2":
        return {**own("model"), "storage_dtype": (f"{stage}.dtype", p.dtype), **layout,
                "preprocessing.input_size": (f"{stage}.size", [p.size, p.size]),
                **weights_identity(shared)}
    if kind == "siglip":
        return {**own("model", "split"), **own("bg_alpha", "pad_ratio", "fill", "min_crop",
                                               at="crop."),
                "layout": (f"{stage}.layout", "hdf5_packed" if p.layout == "hdf5" else p.layout),
                **weights_identity(shared)}
    if kind == "sam2":
        return {**own("config"), "storage_dtype": (f"{stage}.dtype", p.dtype), **layout,
                **weights_identity(shared)}
    if kind == "edges":
        return {**own("kernel_size", "sizes"), **layout}
    if kind == "uv_index":
        return {**own("frames_per_scene", "frame_stride", at="params."), **layout}
    return {**own("upscale", at="params."), **layout}   # point_feats


def stage_classes() -> dict[str, type]:

    return {"extract_clip_grid": ClipGridParams, "extract_dinov2": Dinov2Params,
            "extract_siglip": SiglipParams, "extract_sam2": Sam2Params,
            "edge_maps_methodB": EdgeParams, "build_uv_index": UvIndexParams,
            "sample_point_feats": PointFeatsParams}


def load_expectations(path: str | Path = PARAMS_FILE) -> dict[str, Expectation]:
    """One :class:`Expectation` per output kind whose stage has a section in ``path``
    ({} when the file is missing: verify then checks records without budgets)."""
    if not Path(path).is_file():
        return {}
    data = read_params_file(path)
    classes = stage_classes()
    found = {}
    for kind, stage in KIND_STAGES.items():
        if stage not in data:
            continue
        shared, p = load_stage_params(stage, classes[stage], path)
        found[kind] = Expectation(stage=stage, max_failures=p.max_failures,
                                  metrics=p.metrics or f"metrics/{stage}.json",
                                  weights=shared.weights,
                                  made_with=made_with(kind, stage, shared, p))
    return found
