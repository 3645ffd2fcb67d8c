"""sample_point_feats: CLIP grid features sampled at each point's pixel in each frame.

For every frame of the uv index (:mod:`featcache.stages.build_uv_index`, read with ``open_features`` in any
of its layouts), the frame's CLIP grid from extract_clip_grid (the split of the scene,
``<clip_grid>/<scene>/``, key = the frame's image id, field ``grids``; or, failing that folder,
a ``<clip_grid>/<scene>.h5`` with datasets ``{key}_grids``) becomes a map ``(width, g, g)``
(``(g*g, width)`` row-major tokens or ``(width, g, g)`` as stored), is upsampled with
``PixelShuffle(upscale)`` (2: ``(768,14,14) -> (192,28,28)``) and is sampled bilinearly
(``grid_sample``, ``align_corners=False``, border padding) at each point's pixel.

Coordinates: ``uv_idx`` is in colour-image pixels (x right, y down, pixel centres at
integers). The grid covers the *model input*, so ``u`` is first mapped through the encoder's
resize (and centre crop for ``shortest_crop``), read from the grid output's provenance:
``x_in = (u + 0.5) * scale_x - offset_x - 0.5``, then normalised as
``x_norm = (x_in + 0.5) / W_in * 2 - 1`` (same for y with H). Points whose pixel falls outside
the model input (cropped away) are not valid. One record per frame, key ``<scene>/frame_<idx>``:

- ``pts_feat (N, C) float16``: ``C = width / upscale²``; zeros where not valid;
- ``uv_idx (N,2) float32`` (copied), ``valid (N,) bool`` (uv valid and inside the model input),
  ``conf_2d (N,) float32`` (the uv index's, zero where not valid).

Layouts: ``shards`` (default: ``<out>/index.h5`` + ``<out>/shards/``) or ``npz`` (also the
seed's ``<out>/<scene>/frame_<idx>.npz`` files, in the same folder).

The seed's trainable layers (Conv1x1 to 256-d, Linear 256->128) belong to the user's model and
are not applied here.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import h5py
import numpy as np

from featcache.config import ParamError, require
from featcache.datasets.frames import frame_number, parse_frame_key
from featcache.encoders.base import EncoderSpec
from featcache.engine import WriterOptions, file_signature, finish_stage, run_job
from featcache.engine.shards import INDEX_NAME, SHARDS_DIR, ShardReader, read_index
from featcache.engine.types import EngineParams, Failure, Piece, RunResult
from featcache.failures import FailureCode
from featcache.provenance import (
    GridProvenance,
    GridSource,
    PointFeatsProvenance,
    ProvenanceError,
)
from featcache.reader import FeatureStore, open_features
from featcache.stages._point_sampling import (
    GridError,
    grid_tokens,
    sample_point_features,
)

log = logging.getLogger(__name__)

STAGE = "sample_point_feats"
GRID_FIELD = "grids"   # extract_clip_grid's field (dataset ``{key}_grids`` in its hdf5 view)
# Shard size from params only: a ScanNet-sized cloud and a ViT-B/16 grid width are assumed.
ASSUMED_POINTS = 150_000
ASSUMED_WIDTH = 768


@dataclass(frozen=True, kw_only=True)
class PointFeatsParams(EngineParams):
    """The ``sample_point_feats`` section: inputs (the uv index output folder; extract_clip_grid's
    output folder, one split per scene), the output folder, the PixelShuffle factor,
    ``compression`` (``gzip`` deflates the stored arrays) and ``layout`` (``shards``, or
    ``npz`` for the seed's per-frame files as well)."""

    uv_index: str
    clip_grid: str
    out: str
    upscale: int = 2
    compression: Literal["none", "gzip"] = "none"
    layout: Literal["shards", "npz"] = "shards"

    def validate(self) -> None:
        super().validate()
        require(self.upscale >= 1, "upscale", f"must be >= 1 (1 = no PixelShuffle), "
                f"got {self.upscale}")


def grid_source(clip_grid: Path, scene: str) -> Path | None:
    """Where scene ``scene``'s CLIP grids are: the split folder ``<clip_grid>/<scene>/`` (any
    extract_clip_grid layout writes it), else a ``<clip_grid>/<scene>.h5`` file with datasets
    ``{key}_grids`` (the hdf5 layout's view, or a seed-style file on its own), else None."""
    folder = clip_grid / scene
    if folder.is_dir():
        return folder
    view = clip_grid / f"{scene}.h5"
    return view if view.is_file() else None


def frame_index(item: str) -> tuple[str, int]:
    """``(scene, frame index)`` of a uv-index key ``<scene>/frame_<idx>``
    (:func:`featcache.datasets.frames.parse_frame_key`); ``ValueError`` for another key."""
    parsed = parse_frame_key(item)
    if parsed is None:
        raise ValueError(f"{item!r} is not a uv-index frame key <scene>/frame_<idx>")
    return parsed


def _stamp(path: Path) -> tuple[int, int, int]:
    """Changes whenever ``path`` is rewritten (outputs are replaced, never edited)."""
    target = path / INDEX_NAME if path.is_dir() else path
    st = target.stat()
    return st.st_mtime_ns, st.st_size, st.st_ino


def record_identities(folder: Path) -> dict[str, str]:
    """``key -> identity`` of every record of a sharded output: the identity of the member
    item that made it (method, code and that item's input signature; see
    :func:`featcache.engine.shards.member_identity`). Read from the shards' small
    ``member``/``member_id`` datasets, once per version of the output."""
    return _record_identities(str(folder), _stamp(folder))


@lru_cache(maxsize=64)
def _record_identities(folder: str, stamp: tuple[int, int, int]) -> dict[str, str]:
    keys, shard, row, names, _ = read_index(folder)
    members: list[tuple[list[str], np.ndarray]] = []
    for name in names:
        with ShardReader(Path(folder) / SHARDS_DIR / name) as r:
            members.append((r.member_ids(), r.member_of_rows()))
    return {k: members[s][0][members[s][1][r]] for k, s, r in zip(keys, shard, row)}


def grid_records(source: Path) -> dict[int, tuple[str, str]]:
    """``frame index -> (grid key, record identity)`` of one scene's grids. Keys are the
    frames' image ids (``"3"``; or the stem, e.g. ``"000003"``, with the npy layout's stem
    rule): any all-digit key is the frame of that number (:func:`featcache.datasets.frames.frame_number`,
    the rule that also keys the uv index and the grid stages' image ids, so ``000011.jpg`` and
    ``11.jpg`` both meet frame 11). For a lone ``.h5`` file (no
    sharded folder to take identities from) the identity is the file's content digest."""
    return _grid_records(str(source), _stamp(source))


@lru_cache(maxsize=64)
def _grid_records(source: str, stamp: tuple[int, int, int]) -> dict[int, tuple[str, str]]:

    path = Path(source)
    if path.is_dir():
        ids = record_identities(path)
    else:
        check_view_sources(path)
        digest = file_signature([path])
        ids = {k: digest for k in open_features(path, field=GRID_FIELD)}
    found: dict[int, tuple[str, str]] = {}
    for key in sorted(ids, key=lambda k: (len(k), k)):   # "3" before "003"
        number = frame_number(key)
        if number is not None:
            found.setdefault(number, (key, ids[key]))
    return found


def check_view_sources(path: Path) -> None:
    """Raise :class:`GridError` when ``path`` is a view (virtual datasets) whose source
    files are gone: HDF5 would read them as zeros, a silently wrong feature."""

    with h5py.File(path, "r") as f:
        sources = {s.file_name for name in f if isinstance(f[name], h5py.Dataset)
                   and f[name].is_virtual for s in f[name].virtual_sources()}
    missing = sorted(s for s in sources if not (path.parent / s).is_file())
    if missing:
        raise GridError(FailureCode.BAD_GRID, f"{path} is a view of files that are missing (e.g. "
                                              f"{missing[0]}): its output folder is gone")


@lru_cache(maxsize=16)
def _store(path: str, field: str | None, stamp: tuple[int, int, int]) -> FeatureStore:
    return open_features(path, field=field)


def open_store(path: Path, field: str | None = None) -> FeatureStore:
    """``open_features(path, field)``, opened once per process and version of the output."""
    return _store(str(path), field, _stamp(path))


def grid_provenance(store: FeatureStore) -> GridProvenance:
    """A grid store's provenance, typed; :class:`GridError` ``bad_provenance`` naming the key
    when it is not an extract_clip_grid provenance."""
    try:
        return GridProvenance.from_dict(store.provenance)
    except ProvenanceError as e:
        raise GridError(FailureCode.BAD_PROVENANCE, f"{store.path}: {e}") from None


def read_grid(clip_grid: Path, scene: str, index: int) -> tuple[np.ndarray, EncoderSpec]:
    """The tokens ``(g*g, width)`` of frame ``index`` of ``scene`` and the spec that made
    them; :class:`GridError` when there are none."""
    source = grid_source(clip_grid, scene)
    if source is None:
        raise GridError(FailureCode.MISSING_GRID, f"no grids for scene {scene}: neither "
                        f"{clip_grid / scene}/ nor {clip_grid / scene}.h5")
    try:
        record = grid_records(source).get(index)
        if record is None:
            raise GridError(FailureCode.MISSING_GRID, f"{source} has no grid for frame {index}")
        store = open_store(source, GRID_FIELD)
        tokens = grid_tokens(np.asarray(store[record[0]]))
    except (OSError, KeyError, ValueError) as e:
        if isinstance(e, GridError):
            raise
        raise GridError(FailureCode.BAD_GRID, f"{source}: {type(e).__name__}: {e}") from None
    return tokens, grid_provenance(store).preprocessing


@dataclass(frozen=True)
class PointFeatsJob:
    """Model-free engine job: one item per uv-index record (``<scene>/frame_<idx>``)."""

    params: PointFeatsParams

    def items(self) -> list[str]:
        return sorted(read_index(self.params.uv_index)[0])

    def signature(self, item: str) -> str:
        """What the item reads, by identity: the uv record and the grid record.

        Each record is named by the identity of the member that made it, read from the
        shards' ``member_id`` (:func:`record_identities`). That identity hashes the producing
        stage's method, its code and the member's own input files, and a shard's bytes are a
        function of its members' identities, so it names the record's content exactly: one
        changed frame or grid re-samples that frame alone. Cheaper than hashing the arrays
        (megabytes a frame, read twice) and finer than the shard file's name (which changes
        with any neighbour in the shard).
        """

        scene, index = frame_index(item)
        uv = record_identities(Path(self.params.uv_index)).get(item, "missing")
        source = grid_source(Path(self.params.clip_grid), scene)
        try:
            grid = grid_records(source).get(index) if source is not None else None
            where = "missing" if grid is None else f"{source.name}\t{grid[0]}\t{grid[1]}"
        except (OSError, KeyError, ValueError) as e:   # load() reports it as bad_grid
            where = f"unreadable\t{source}\t{type(e).__name__}: {e}"
        return file_signature([], extra=f"uv\t{uv}\ngrid\t{where}")

    def load(self, item: str) -> list[Piece | Failure]:
        uv_record = open_store(Path(self.params.uv_index))[item]
        uv, valid, conf = uv_record["uv_idx"], uv_record["valid"], uv_record["conf_2d"]
        size = tuple(int(s) for s in uv_record["image_size"])
        try:
            tokens, spec = read_grid(Path(self.params.clip_grid), *frame_index(item))
            feats, keep = sample_point_features(tokens, uv, valid, size, spec,
                                                self.params.upscale)
        except GridError as e:
            return [Failure(item, e.code, str(e))]
        arrays = {"pts_feat": feats, "uv_idx": uv, "valid": keep,
                  "conf_2d": np.where(keep, conf, 0).astype(np.float32)}
        return [Piece(key=item, arrays=arrays)]


def grid_sources(params: PointFeatsParams, items: list[str]) -> dict[str, GridSource]:
    """Per scene, what made its CLIP grids (model, weights identity, preprocessing, grid), read
    from the grid output's provenance, so the point features record their origin."""
    sources: dict[str, GridSource] = {}
    for scene in sorted({item.split("/")[0] for item in items}):
        source = grid_source(Path(params.clip_grid), scene)
        if source is None:
            continue
        try:
            prov = grid_provenance(open_store(source, GRID_FIELD))
        except (OSError, KeyError, ValueError) as e:   # each frame reports it as a failure
            log.warning("%s: grids of %s unreadable: %s", STAGE, scene, e)
            continue
        sources[scene] = GridSource.of(prov, source.name)
    return sources


def check_inputs(params: PointFeatsParams) -> None:
    """Fail before any work, naming the key, when an input is missing: the uv index (a
    build_uv_index output, any layout), the grid folder, or every scene's grids."""
    for key in ("uv_index", "clip_grid"):
        if not Path(getattr(params, key)).is_dir():
            raise ParamError(f"{STAGE}.{key}: folder not found: {getattr(params, key)}")
    uv = Path(params.uv_index)
    if not (uv / INDEX_NAME).is_file():
        raise ParamError(f"{STAGE}.uv_index: {uv} has no {INDEX_NAME}: not a build_uv_index "
                         "output (every layout writes the sharded index); re-run that stage")
    scenes = sorted({key.split("/")[0] for key in read_index(uv)[0]})
    clip_grid = Path(params.clip_grid)
    if scenes and not any(grid_source(clip_grid, s) is not None for s in scenes):
        raise ParamError(f"{STAGE}.clip_grid: no grids for any scene of the uv index in "
                         f"{clip_grid}: looked for <clip_grid>/<scene>/ (or <scene>.h5), e.g. "
                         f"{clip_grid / scenes[0]}; extract_clip_grid needs one split per "
                         "scene, named like the scene")
    check_upscale(params, scenes)


def grid_width(source: Path) -> tuple[int, str] | None:
    """``(width, model)`` of a scene's stored grids (one grid read: ``(g*g, width)`` tokens or
    ``(width, g, g)``), or ``None`` when there is no readable grid."""
    try:
        store = open_store(source, GRID_FIELD)
        key = next(iter(store), None)
        if key is None:
            return None
        grid = store[key]
        model = grid_provenance(store).model
    except (OSError, KeyError, ValueError):   # each frame reports it as a failure
        return None
    return (int(grid.shape[1]) if grid.ndim == 2 else int(grid.shape[0])), model


def check_upscale(params: PointFeatsParams, scenes: list[str]) -> None:
    """``upscale`` must divide the grids' channels into ``upscale²`` (PixelShuffle): checked on
    every scene's stored grids before any work, naming the valid values."""
    for scene in scenes:
        source = grid_source(Path(params.clip_grid), scene)
        found = grid_width(source) if source is not None else None
        if found is None or found[0] % params.upscale ** 2 == 0:
            continue
        width, model = found
        valid = [u for u in range(1, math.isqrt(width) + 1) if width % (u * u) == 0]
        raise ParamError(f"{STAGE}.upscale: {params.upscale} does not fit the {width}-channel "
                         f"grids of {model} (scene {scene}): PixelShuffle needs the channels "
                         f"divisible by upscale²; use one of {valid}")


def method_params(params: PointFeatsParams) -> dict[str, object]:
    """The params recorded in the provenance (engine knobs such as ``num_workers`` excluded)."""
    return params.method_params()


def fingerprint_params(params: PointFeatsParams) -> dict[str, object]:
    """The params that determine a frame's record: :func:`method_params` less where the
    output goes and its layout (the records' inputs come from each item's signature)."""
    return {k: v for k, v in method_params(params).items() if k not in ("out", "layout")}


def sample_point_feats(params: PointFeatsParams) -> RunResult:
    """Run the stage: the output folder ``params.out`` in ``params.layout`` (with
    ``failures.tsv``) and the metrics JSON (``params.metrics``, default
    ``metrics/sample_point_feats.json``), relative to the working directory.

    Raises ``TooManyFailures`` (after writing) when more than ``max_failures`` frames failed.
    """

    check_inputs(params)
    job = PointFeatsJob(params)
    provenance = PointFeatsProvenance(params=method_params(params), notes=__doc__,
                                      clip_grid=grid_sources(params, job.items()))
    result = run_job(job, None, stage=STAGE, out=params.out, writer=params.layout,
                     writer_options=WriterOptions(compression=params.compression),
                     provenance=provenance.to_dict(),
                     fingerprint={"params": fingerprint_params(params)},
                     params=params, item_bytes=item_bytes(params))
    if not result.finalized:   # compute-only run (shard range): no output to summarise yet
        finish_stage(STAGE, params.out, [result], params)
        return result
    log.info("%s: %d frames written (%d computed, %d reused), %d failed", STAGE,
             result.records, result.computed, result.reused, result.failed)
    finish_stage(STAGE, params.out, [result], params, extra=summarise(Path(params.out)))
    return result


def item_bytes(params: PointFeatsParams) -> int:
    """Bytes one frame stores, from params only (the shard size must not depend on the
    data): an assumed ScanNet-sized cloud of 150,000 points and a ViT-B grid (width 768),
    each point ``pts_feat`` fp16 + ``uv_idx`` 8 + ``valid`` 1 + ``conf_2d`` 4 bytes."""
    return ASSUMED_POINTS * (2 * (ASSUMED_WIDTH // params.upscale ** 2) + 8 + 1 + 4)


def summarise(out: Path) -> dict[str, float]:
    """Metrics over a written output (any layout): frames, feature channels, fraction of
    points sampled."""
    valid = open_features(out, field="valid")
    keys = sorted(valid)
    channels = int(open_features(out, field="pts_feat")[keys[0]].shape[1]) if keys else 0
    sampled = [float(v.mean()) if v.size else 0.0 for v in (valid[k] for k in keys)]
    return {"frames": len(keys), "channels": channels,
            "sampled_fraction_mean": float(np.mean(sampled)) if sampled else 0.0}
