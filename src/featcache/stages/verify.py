"""Stage ``verify``: open every output, check it against what made it, and draw pictures of it.

The output paths are the stages' own ``out`` keys (the loader reads them from their sections,
:data:`featcache.config.LINKS`). Each check is one entry of ``reports/verify.json`` (``passed``, the number of ``items`` it
looked at, its numbers, and the first problems when it failed); the report's ``passed`` is true
when every check passed. What a file should look like comes from the params and the model that
made it, as recorded in the file's provenance (the other stages' sections are not verify's
params; their outputs are its dependencies):

- ``<output>.readable``: the output exists, every file opens and every array reads.
- ``<output>.shapes``: shapes and dtypes, finite values. clip_grid ``(t*t, width)`` (``t`` the
  stored grid, width the open_clip model's transformer width), dinov2 ``(hidden, t, t)``,
  siglip ``(N, D)`` fp16 (``D`` = the model's ``embed_dim``), sam2 ``P4_S16 (256, S/16, S/16)``,
  ``P5_S32 (256, S/32, S/32)`` (``S`` = the input size), edges ``(s, s)`` uint8 per recorded
  size, uv index ``(N, 2)``/``(N,)`` arrays, point features ``(N, width / upscale**2)`` fp16.
- ``<output>.coverage``: every input of the output (split images, panoptic segments, selected
  ScanNet frames, uv-index frames) has its key or a row in the output's ``failures.tsv``
  (nothing silently missing), and no key lacks an input.
- ``<output>.provenance``: made with the weights of its stage (``<stage>.weights``, default the
  top-level ``weights``; clip_grid: and ``model``).
- ``<output>.records``: per output the records written and the items failed (and the stage's
  items and reused, from its metrics); fails an output with no records, a stage with more
  failures than its ``max_failures`` allows, failures from a key mismatch with an upstream
  output (:mod:`featcache.verify.outputs`).
- ``<output>.params``: the provenance agrees with params.yaml (model, weights identity, crop
  settings, layout, ...); a stale output names the param (:mod:`featcache.verify.expected`).
- ``siglip.unit_norm`` (``|norm - 1| <= norm_tolerance``), ``siglip.index`` (``inst2feat.tsv``
  rows and embeddings one-to-one), ``sam2.flags`` (``feature_flag == 1``, ``IMAGE_EMB_S16 ==
  P4_S16``), ``edges.binary`` (only 0 and 1), ``edges.flags`` (``edge_flag == 1``,
  ``edge_version == 'B_v1'``), ``uv_index.reprojection`` (every frame's ``reproj_err_px`` and
  the stage metric ``reprojection_max_px`` below ``max_reprojection_px``), ``point_feats.valid``
  (the uv index's points, features zero where not valid).
- ``<grid output>.spot_check``: ``spot_check`` random items of every grid file recomputed live
  (:func:`featcache.verify.spotcheck.spot_check`), min cosine >= ``min_cosine``; ``siglip.spot_check``
  likewise for segment embeddings (:func:`featcache.verify.spotcheck.spot_check_segments`).

The checks of each output family live in :mod:`featcache.verify.checks`; pictures
(:mod:`featcache.verify.pictures`) go to ``reports/verify/``. Any failed check makes the stage raise
:class:`VerificationFailed` after the report and the pictures are written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from featcache.config import SharedParams, StageError, require
from featcache.encoders import resolve_device
from featcache.encoders.registry import load_encoder
from featcache.engine.atomic import write_text
from featcache.provenance import GridProvenance
from featcache.reader import FeatureStore
from featcache.verify.checks import Report, problems_to
from featcache.verify.expected import load_expectations
from featcache.verify.grid_checks import check_grid_stage
from featcache.verify.npz_checks import (
    check_edges,
    check_point_feats,
    check_sam2,
    check_uv_index,
)
from featcache.verify.outputs import (
    Expectation,
    OutputCount,
    check_params,
    check_records,
)
from featcache.verify.pictures import PictureInputs, draw_pictures
from featcache.verify.siglip_checks import check_siglip
from featcache.verify.spotcheck import spot_check, spot_check_segments

log = logging.getLogger(__name__)

STAGE = "verify"
OUTPUT_KINDS = ("clip_grid", "dinov2", "siglip", "sam2", "edges", "uv_index", "point_feats")


class VerificationFailed(StageError):
    """At least one check failed (``reports/verify.json`` says which and why)."""


@dataclass(frozen=True, kw_only=True)
class VerifyParams:
    """The ``verify`` section: the output paths (the same values as the stages' ``out``),
    ``raw`` (the download folder: a DVC dependency only, since the inputs each output lists are
    read from the paths in its provenance), ``uv_metrics`` (build_uv_index's metrics file),
    ``report`` and ``pictures`` (verify's own outputs), and the thresholds: ``spot_check``
    items per grid file (0 = off), ``min_cosine``, ``norm_tolerance`` of the unit-norm check,
    ``max_reprojection_px``, ``picture_items`` per picture (0 = no pictures)."""

    raw: str
    clip_grid: str
    dinov2: str
    siglip: str
    sam2: str
    edges: str
    uv_index: str
    uv_metrics: str
    point_feats: str
    report: str
    pictures: str
    metrics: str = ""    # the compact DVC metric: passed, failed_checks, checks ("" = none)
    outputs: str = ""    # per-output records table, a DVC plot ("" = none)
    spot_check: int = 2
    min_cosine: float = 0.999
    norm_tolerance: float = 1e-3
    max_reprojection_px: float = 1.0
    picture_items: int = 3

    def validate(self) -> None:
        require(self.spot_check >= 0, "spot_check", "must be >= 0 items per grid file (0 = off)")
        require(0 < self.min_cosine <= 1, "min_cosine", f"must be in (0, 1], got {self.min_cosine}")
        require(self.norm_tolerance > 0, "norm_tolerance", "must be > 0")
        require(self.max_reprojection_px > 0, "max_reprojection_px", "must be > 0 pixels")
        require(self.picture_items >= 0, "picture_items", "must be >= 0 (0 = no pictures)")
        require(bool(self.report.strip()) and self.report.endswith(".json"), "report",
                f"must name a .json file, got {self.report!r}")
        for key in ("metrics", "outputs"):
            value = getattr(self, key)
            require(value == "" or value.endswith(".json"), key,
                    f"must name a .json file (or be empty), got {value!r}")


def verify(shared: SharedParams, params: VerifyParams,
           expected: dict[str, Expectation] | None = None) -> Report:
    """Check every output, write ``params.report``, ``params.metrics``, ``params.outputs`` and
    the pictures in ``params.pictures``.

    ``expected`` (default: read from ``params.yaml`` in the working directory, when there is
    one) says per output kind what params.yaml says it was made with and its failure budget
    (:func:`featcache.verify.expected.load_expectations`). Raises :class:`VerificationFailed`
    (after writing everything) when a check failed. Paths are relative to the working
    directory (the repository root under ``dvc repro``).
    """

    start = time.perf_counter()
    expected = load_expectations() if expected is None else expected
    report = Report()

    def made_by(kind: str) -> SharedParams:  # the weights the output's own stage uses
        weights = expected[kind].weights if kind in expected else None
        return dataclasses.replace(shared, weights=weights) if weights else shared

    grids = {"clip_grid": check_grid_stage(report, "clip_grid", Path(params.clip_grid),
                                           made_by("clip_grid"), model=shared.model),
             "dinov2": check_grid_stage(report, "dinov2", Path(params.dinov2),
                                        made_by("dinov2"))}
    check_siglip(report, Path(params.siglip), made_by("siglip"), params.norm_tolerance)
    check_sam2(report, Path(params.sam2), made_by("sam2"))
    check_edges(report, Path(params.edges))
    check_uv_index(report, Path(params.uv_index), Path(params.uv_metrics),
                   params.max_reprojection_px)
    check_point_feats(report, Path(params.point_feats), Path(params.uv_index))
    counts = []
    for kind in OUTPUT_KINDS:
        folder = Path(getattr(params, kind))
        counts += check_records(report, kind, folder, expected.get(kind))
        check_params(report, kind, folder, expected.get(kind))
    checked = time.perf_counter()
    run_spot_checks(report, grids, shared, params)
    run_segment_spot_check(report, Path(params.siglip), shared, params)
    spotted = time.perf_counter()
    pictures = draw_pictures(picture_inputs(params), grids) if params.picture_items else []
    write_report(Path(params.report), report, pictures)
    write_summaries(params, report, counts)
    log.info("%s: %d checks in %.1f s (+ %.1f s spot checks, %.1f s pictures); wrote %s and "
             "%d pictures", STAGE, len(report.checks), checked - start, spotted - checked,
             time.perf_counter() - spotted, params.report, len(pictures))
    for name in report.failed:
        check = report.checks[name]
        log.error("%s FAILED (%d problems): %s", name, check.problems,
                  "; ".join(check.first_problems))
    if report.failed:
        raise VerificationFailed(f"{len(report.failed)} of {len(report.checks)} checks failed: "
                                 f"{', '.join(report.failed)}; see {params.report}")
    return report


def picture_inputs(params: VerifyParams) -> PictureInputs:
    """The output folders the pictures are drawn from, and where they go."""
    return PictureInputs(folder=Path(params.pictures), items=params.picture_items,
                         edges=Path(params.edges), uv_index=Path(params.uv_index),
                         point_feats=Path(params.point_feats), siglip=Path(params.siglip))


def run_spot_checks(report: Report, grids: dict[str, list[FeatureStore]], shared: SharedParams,
                    params: VerifyParams) -> None:
    """``<kind>.spot_check``: ``params.spot_check`` random items (``seed``) of every grid file
    recomputed live; one model load per distinct encoder spec."""
    if params.spot_check == 0:
        return

    device = resolve_device(shared.device)
    encoders: dict[Any, Any] = {}
    for kind, stores in grids.items():
        check = report(f"{kind}.spot_check")
        cosines, diffs = [], []
        for store in (s for s in stores if len(s)):
            name = store.path.name
            with problems_to(check, name):
                spec = GridProvenance.from_dict(store.provenance).preprocessing
                if spec not in encoders:
                    encoders[spec] = load_encoder(spec, device)
                result = spot_check(store.path, params.spot_check, seed=shared.seed,
                                    encoder=encoders[spec])
                check.items += len(result.keys) + len(result.errors)
                for key, reason in result.errors:
                    check.expect(False, f"{name}[{key}]: {reason}")
                if result.keys:
                    cosines.append(result.min_cosine)
                    diffs.append(result.max_abs_diff)
                    check.expect(result.min_cosine >= params.min_cosine,
                                 f"{name}: min cosine {result.min_cosine:.6f} < "
                                 f"{params.min_cosine} over {list(result.keys)}")
        if cosines:
            check.numbers.update(min_cosine=round(min(cosines), 6),
                                 max_abs_diff=round(max(diffs), 6))


def run_segment_spot_check(report: Report, path: Path, shared: SharedParams,
                           params: VerifyParams) -> None:
    """``siglip.spot_check``: ``params.spot_check`` random segment embeddings (``seed``)
    recomputed live from the COCO split their provenance names (read through the shards)."""
    if params.spot_check == 0 or not (path / "index.h5").is_file():
        return

    check = report("siglip.spot_check")
    with problems_to(check, path.name):
        result = spot_check_segments(path, params.spot_check, seed=shared.seed,
                                     device=shared.device)
        check.items += len(result.keys) + len(result.errors)
        for key, reason in result.errors:
            check.expect(False, f"{key}: {reason}")
        if result.keys:
            check.numbers.update(min_cosine=round(result.min_cosine, 6),
                                 max_abs_diff=round(result.max_abs_diff, 6))
            check.expect(result.min_cosine >= params.min_cosine,
                         f"min cosine {result.min_cosine:.6f} < {params.min_cosine} over "
                         f"{list(result.keys)}")


def write_summaries(params: VerifyParams, report: Report, counts: list[OutputCount]) -> None:
    """The compact metric (``passed``, ``failed_checks``, ``checks``: what ``dvc exp show``
    compares) and the per-output records table (a DVC plot), both without times."""

    if params.metrics:
        doc = {"passed": not report.failed, "failed_checks": len(report.failed),
               "checks": len(report.checks)}
        write_text(Path(params.metrics), json.dumps(doc, indent=2, sort_keys=True) + "\n")
    if params.outputs:
        rows = [c.to_dict() for c in counts]
        write_text(Path(params.outputs), json.dumps(rows, indent=2, sort_keys=True) + "\n")


def write_report(path: Path, report: Report, pictures: list[str]) -> None:
    """``reports/verify.json``: sorted keys, no times, so equal outputs give equal bytes."""

    doc = _finite(report.to_json(pictures))
    write_text(path, json.dumps(doc, indent=2, sort_keys=True) + "\n")


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: such numbers become None (their check has failed)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
