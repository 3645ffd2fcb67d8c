"""Stage ``extract_dinov2``: last-layer patch tokens of a transformers ``Dinov2Model``.

``model`` (in the section) is ``facebook/dinov2-small|base|large|giant`` (or a
``-with-registers-`` variant); ``weights`` is the section's (default: the top-level one),
``seed`` the top-level key. Images are resized
(short side to ``size``, bicubic), centre-cropped to ``size x size`` and normalised with the
ImageNet mean/std; ``size`` must be a multiple of 14, and g = size / 14 (16 at 224).

Per image: ``(hidden, g, g)`` in every layout (hidden 384/768/1024/1536 for
small/base/large/giant), CLS and register tokens excluded, after the final layernorm.
Layout ``shards`` (default): the sharded folder ``<out>/<split>/``, field ``grids`` per image
key; ``hdf5`` adds the view file ``<out>/<split>.h5`` with ``{image_id}_grids``; ``npy`` adds
``<out>/<split>/<stem>.npy`` plus ``<stem>_mask.npy`` ``(g, g)`` and, with ``save_meta``,
``<stem>.json``. Keys and alpha handling: :mod:`featcache.stages._grids`.
"""

from __future__ import annotations

from dataclasses import dataclass

from featcache.config import SharedParams, require
from featcache.encoders.dinov2 import load_dinov2, resolve_dinov2_spec
from featcache.encoders.weights import resolve_stage_spec
from featcache.engine.types import RunResult
from featcache.stages._grids import GridParams, GridPlan, run_grid_stage

STAGE = "extract_dinov2"
PATCH = 14


@dataclass(frozen=True, kw_only=True)
class Dinov2Params(GridParams):
    """The ``extract_dinov2`` section: ``model`` (HF name) and input ``size`` (multiple of 14)."""

    model: str = "facebook/dinov2-small"
    size: int = 224

    def validate(self) -> None:
        super().validate()
        require(self.size > 0 and self.size % PATCH == 0, "size",
                f"must be a positive multiple of {PATCH} (the patch size), got {self.size}")


def plan_dinov2(shared: SharedParams, params: Dinov2Params) -> GridPlan:
    """Resolve the DINOv2 spec (no model built); ParamError names ``extract_dinov2.model``."""

    spec = resolve_stage_spec(resolve_dinov2_spec, params.model, stage=STAGE,
                              shared=shared, image_size=params.size, key=f"{STAGE}.model")
    return GridPlan(STAGE, spec, spec.grid_size[0], "chw", load=load_dinov2)


def extract_dinov2(shared: SharedParams, params: Dinov2Params) -> list[RunResult]:
    """Write the DINOv2 grids of every split (see the module docstring); one result per split."""
    return run_grid_stage(plan_dinov2(shared, params), shared, params)
