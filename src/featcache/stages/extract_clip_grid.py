"""Stage ``extract_clip_grid``: last-layer patch grids of an open_clip ViT, per image.

The model is the top-level ``model`` of params.yaml (``dvc exp run -S model=ViT-L-14``), with the
section's ``weights`` (default: the top-level ``weights``) and the top-level ``seed``. Per image: the tokens of the last block after the tower's
final norm, CLS (and any register tokens) excluded, NOT projected (width = transformer width:
768 for ViT-B-16, 1024 for ViT-L-14), optionally average-pooled to ``grid x grid``.

Output per split: the sharded folder ``<out>/<split>/`` (layout ``shards``, the default) with,
per image key ``{image_id}``, the field ``grids`` ``(t*t, width)`` (``(196, 768)`` for ViT-B-16
at 224, ``(49, 768)`` with ``grid: 7``) and, with ``save_global``, ``global`` ``(embed_dim,)``
(the model's ``encode_image`` embedding, unnormalised). Layout ``hdf5`` adds the FSGR seed's
file ``<out>/<split>.h5`` with ``{image_id}_grids`` / ``{image_id}_global`` datasets (virtual:
views of the shards, no copy). Layout ``npy`` (seed 004) adds ``<out>/<split>/<stem>.npy``
``(width, t, t)``, ``<stem>_mask.npy`` ``(t, t)``, ``<stem>_global.npy``, ``<stem>.json`` with
``save_meta``. Keys, pooling, alpha handling: :mod:`featcache.stages._grids`.
"""

from __future__ import annotations

from dataclasses import dataclass

from featcache.config import SharedParams, require
from featcache.encoders.openclip import load_openclip, resolve_openclip_spec
from featcache.encoders.weights import resolve_stage_spec
from featcache.engine.types import RunResult
from featcache.stages._grid_geometry import check_target_grid
from featcache.stages._grids import GridParams, GridPlan, run_grid_stage

STAGE = "extract_clip_grid"


@dataclass(frozen=True, kw_only=True)
class ClipGridParams(GridParams):
    """The ``extract_clip_grid`` section. ``grid``: stored side (0 = the model's native grid,
    else a divisor of it); ``save_global``: also store the pooled embedding."""

    grid: int = 0
    save_global: bool = True

    def validate(self) -> None:
        super().validate()
        require(self.grid >= 0, "grid", f"must be 0 (native) or a positive side, got {self.grid}")


def plan_clip_grid(shared: SharedParams, params: ClipGridParams) -> GridPlan:
    """Resolve the open_clip spec (no model built) and check ``grid`` against it.

    Raises :class:`ParamError` naming ``model``/``weights`` or ``extract_clip_grid.grid``.
    """

    spec = resolve_stage_spec(resolve_openclip_spec, shared.model, stage=STAGE,
                              shared=shared)
    grid = check_target_grid(spec.grid_size, params.grid, key=f"{STAGE}.grid")
    layout = "chw" if params.layout == "npy" else "tokens"
    return GridPlan(STAGE, spec, grid, layout, save_global=params.save_global,
                    load=load_openclip)


def extract_clip_grid(shared: SharedParams, params: ClipGridParams) -> list[RunResult]:
    """Write the CLIP grids of every split (see the module docstring); one result per split."""
    return run_grid_stage(plan_clip_grid(shared, params), shared, params)
