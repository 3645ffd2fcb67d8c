"""Checks of ``extract_siglip``'s output: embeddings, ``inst2feat.tsv``, panoptic coverage."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from featcache.config import SharedParams
from featcache.datasets.coco_panoptic import (
    PanopticError,
    read_panoptic_split,
    segment_key,
)
from featcache.engine.shards import SHARDS_DIR, read_index
from featcache.provenance import SiglipProvenance
from featcache.reader import FeatureStore, open_features
from featcache.stages.extract_siglip import H5_NAME, INDEX_HEADER, INDEX_NAME
from featcache.verify.checks import (
    Check,
    Report,
    all_failed,
    check_coverage,
    check_provenance,
    expect_array,
    model_dims,
    problems_to,
    read_failures,
    read_provenance,
)


def check_siglip(report: Report, folder: Path, shared: SharedParams, tolerance: float) -> None:
    """Shapes, unit norms, ``inst2feat.tsv`` and coverage of extract_siglip's output."""

    readable = report("siglip.readable")
    path = folder / H5_NAME if (folder / H5_NAME).is_file() else folder
    if not readable.expect(path.exists(), f"{folder}: not found"):
        return
    with problems_to(readable, path.name):
        store = open_features(path)
        prov = read_provenance(report("siglip.provenance"), path.name, store, SiglipProvenance)
        if prov is None:
            return
        keys, embeddings = read_embeddings(store, report)
        readable.items += len(keys)
        check_provenance(report("siglip.provenance"), path.name, prov, shared)
        _, dim = model_dims(prov.family, prov.model)
        shapes = report("siglip.shapes")
        shapes.items += len(keys)
        expect_array(shapes, f"{path.name} embeddings", embeddings, (len(keys), dim), np.float16)
        norms = np.linalg.norm(embeddings.astype(np.float32), axis=-1).reshape(-1)
        error = np.abs(norms - 1.0)
        unit = report("siglip.unit_norm")
        unit.items += len(keys)
        unit.numbers["max_norm_error"] = round(float(error.max(initial=0.0)), 6)
        for i in np.flatnonzero(~(error <= tolerance)):  # NaN norms fail too
            unit.expect(False, f"{keys[i]}: norm {norms[i]:.5f}, expected 1 +- {tolerance}")
        with problems_to(report("siglip.index"), "inst2feat.tsv"):
            check_index(report("siglip.index"), folder, keys, prov.layout or store.layout)
        coverage = report("siglip.coverage")
        failed = all_failed(read_failures(folder, coverage))
        with problems_to(coverage, "panoptic split"):
            check_siglip_coverage(coverage, prov, set(keys), failed)


def read_embeddings(store: FeatureStore, report: Report) -> tuple[list[str], np.ndarray]:
    """Keys and ``(N, D)`` embeddings in stored order; the id columns are checked too."""
    if store.layout == "hdf5_packed":

        with h5py.File(store.path, "r") as f:
            keys = [k.decode() if isinstance(k, bytes) else str(k) for k in f["keys"][()]]
            embeddings = f["embeddings"][()]
            ids = f["image_id"][()], f["segment_id"][()]
    else:
        keys = list(store)
        rows = [store[k] for k in keys]
        embeddings = np.stack(rows) if rows else np.zeros((0, 0), np.float16)
        if store.layout != "shards" or "image_id" not in store.fields():
            return keys, embeddings
        ids = tuple(np.asarray([open_features(store.path, field=name)[k] for k in keys],
                               np.int64).reshape(-1) for name in ("image_id", "segment_id"))
    shapes = report("siglip.shapes")
    for name, column in zip(("image_id", "segment_id"), ids):
        expect_array(shapes, f"{store.path.name} {name}", column, (len(keys),), np.int64)
    if len(ids[0]) == len(ids[1]) == len(keys):
        named = [f"{i:012d}_{s}" for i, s in zip(*ids)]
        bad = [k for k, n in zip(keys, named) if k != n]
        shapes.expect(not bad, f"keys disagree with image_id/segment_id, e.g. {bad[:3]}")
    return keys, embeddings


def check_index(check: Check, folder: Path, keys: list[str], layout: str) -> None:
    """``inst2feat.tsv``: the header, one row per embedding, each pointing at its embedding."""

    lines = (folder / INDEX_NAME).read_text(encoding="utf-8").splitlines()
    check.expect(bool(lines) and lines[0] == INDEX_HEADER,
                 f"{INDEX_NAME}: header {lines[:1]}, expected {INDEX_HEADER!r}")
    if layout == "shards":

        index_keys, shard, row, names, _ = read_index(folder)
        where = {k: f"{SHARDS_DIR}/{names[s]}#{r}" for k, s, r in zip(index_keys, shard, row)}
    else:
        where = {k: f"{H5_NAME}#{i}" if layout == "hdf5_packed" else f"{k}.npy"
                 for i, k in enumerate(keys)}
    seen: set[str] = set()
    for n, line in enumerate(lines[1:], start=2):
        check.items += 1
        cells = line.split("\t")
        if not check.expect(len(cells) == 3, f"{INDEX_NAME}:{n}: {len(cells)} columns"):
            continue
        key = f"{cells[0]}_{cells[1]}"
        check.expect(key not in seen, f"{INDEX_NAME}:{n}: {key} listed again")
        seen.add(key)
        if check.expect(key in where, f"{INDEX_NAME}:{n}: {key} has no embedding"):
            check.expect(cells[2] == where[key], f"{INDEX_NAME}:{n}: {key} points at "
                                                 f"{cells[2]}, its embedding is {where[key]}")
    for key in sorted(set(keys) - seen):
        check.expect(False, f"{key}: embedding without a row in {INDEX_NAME}")


def check_siglip_coverage(check: Check, prov: SiglipProvenance, present: set[str],
                          failed: set[str]) -> None:
    """Every segment of the panoptic JSON recorded in the provenance has an embedding or a
    failures row (its own, or its image's); bad JSON entries have their rows."""

    try:
        split = read_panoptic_split(prov.coco, prov.split)
    except PanopticError as e:
        check.expect(False, f"{prov.coco} {prov.split}: {e}")
        return
    expected: list[tuple[str | None, tuple[str, ...]]] = []
    for entry in split.entries:
        if entry.image is None:
            expected.append((None, (entry.item,)))
            continue
        image = entry.image
        expected += [(None, (name,)) for name, _ in image.bad_segments]
        expected += [(segment_key(image.image_id, s.id),
                      (segment_key(image.image_id, s.id), entry.item)) for s in image.segments]
    check_coverage(check, expected, present, failed)
