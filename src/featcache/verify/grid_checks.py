"""Checks of the grid stages' outputs (``extract_clip_grid``, ``extract_dinov2``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from featcache.config import SharedParams
from featcache.datasets.images import list_images
from featcache.provenance import GridProvenance
from featcache.reader import FeatureStore, open_features
from featcache.stages._grids import image_key
from featcache.verify.checks import (
    Check,
    Report,
    check_coverage,
    check_provenance,
    expect_array,
    model_dims,
    problems_to,
    read_failures,
    read_provenance,
)


def grid_outputs(folder: Path) -> list[tuple[Path, str | None]]:
    """A grid stage's outputs as ``(path, layout)``: every sharded ``<split>/`` folder, and
    each of its views: the ``<split>.h5`` file (layout ``hdf5``) and the per-image files of
    the npy layout (the folder read as ``npy``)."""
    found: list[tuple[Path, str | None]] = []
    for split in sorted(p for p in folder.iterdir() if (p / "index.h5").is_file()):
        found.append((split, None))
        if split.with_suffix(".h5").is_file():
            found.append((split.with_suffix(".h5"), None))
        if (split / "index.tsv").is_file():
            found.append((split, "npy"))
    return found


def check_grid_stage(report: Report, kind: str, folder: Path, shared: SharedParams,
                     model: str | None = None) -> list[FeatureStore]:
    """Checks of one grid stage's outputs; returns the stores that opened (for spot checks)."""
    readable = report(f"{kind}.readable")
    if not readable.expect(folder.is_dir(), f"{folder}: not found"):
        return []
    paths = grid_outputs(folder)
    readable.expect(bool(paths), f"{folder}: no <split>/ output folder")
    failed = read_failures(folder, report(f"{kind}.coverage"))
    stores = []
    for path, layout in paths:
        with problems_to(readable, path.name):
            store = open_features(path, layout=layout)
            prov = read_provenance(report(f"{kind}.provenance"), path.name, store,
                                   GridProvenance)
            if prov is None:
                continue
            check_provenance(report(f"{kind}.provenance"), path.name, prov, shared, model)
            check_grid_file(report, kind, store, prov)
            with problems_to(report(f"{kind}.coverage"), path.name):
                check_grid_coverage(report(f"{kind}.coverage"), store, prov,
                                    failed.get(path.name.removesuffix(".h5"), set()))
            if layout is None and path.is_dir():   # spot checks and pictures: the shards
                stores.append(store)
    return stores


def check_grid_file(report: Report, kind: str, store: FeatureStore,
                    prov: GridProvenance) -> None:
    """Shapes of every ``grids`` (and ``global``) array of one split output."""

    shapes = report(f"{kind}.shapes")
    t, native = prov.grid, prov.preprocessing.grid_size[0]
    shapes.expect(native % t == 0, f"{store.path.name}: grid {t} does not divide {native}")
    width, embed = model_dims(prov.family, prov.model)
    dtype = {"fp16": np.float16, "fp32": np.float32}[prov.storage_dtype]
    want = (t * t, width) if prov.array_layout == "tokens" else (width, t, t)
    fields = {"grids": want} | ({"global": (embed,)} if "global" in store.fields() else {})
    for name, shape in fields.items():
        arrays = store if name == store.field else open_features(store.path, field=name,
                                                                  layout=store.layout)
        seen = set()
        for key in arrays:
            report(f"{kind}.readable").items += 1
            with problems_to(report(f"{kind}.readable"), f"{store.path.name}[{key}]"):
                array = arrays[key]
                shapes.items += 1
                expect_array(shapes, f"{store.path.name}[{key}] {name}", array, shape, dtype)
                seen.add(array.shape)
        shapes.expect(len(seen) <= 1, f"{store.path.name}: {name} shapes differ: {sorted(seen)}")


def check_grid_coverage(check: Check, store: FeatureStore, prov: GridProvenance,
                        failed: set[str]) -> None:
    """Every image of the split folder recorded in the provenance has a key or a failure row."""

    expected = [(image_key(p.name, prov.key_rule), (p.name,))
                for p in list_images(Path(prov.images))]
    check_coverage(check, expected, set(store), failed)
