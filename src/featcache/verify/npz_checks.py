"""Checks of the per-item outputs (sharded folders, and their per-item NPZ files where the
layout writes them): ``extract_sam2``, ``edge_maps_methodB``, ``build_uv_index`` and
``sample_point_feats``."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from itertools import chain
from pathlib import Path

import numpy as np

from featcache.config import SharedParams, build_dataclass
from featcache.datasets.images import list_images
from featcache.datasets.scannet import principal_point_offset
from featcache.provenance import (
    EdgeProvenance,
    PointFeatsProvenance,
    Sam2Provenance,
    UvIndexProvenance,
)
from featcache.reader import FeatureStore, open_features
from featcache.stages.build_uv_index import STAGE as UV_STAGE
from featcache.stages.build_uv_index import UvIndexJob, UvIndexParams
from featcache.stages.edge_maps_methodB import EDGE_VERSION, edge_key
from featcache.stages.edge_maps_methodB import OUTPUT_SUFFIX as EDGES_SUFFIX
from featcache.stages.extract_sam2 import NPZ_ALIASES
from featcache.stages.extract_sam2 import OUTPUT_SUFFIX as SAM2_SUFFIX
from featcache.stages.sample_point_feats import STAGE as POINT_STAGE
from featcache.stages.sample_point_feats import PointFeatsParams
from featcache.verify.checks import (
    READ_ERRORS,
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


def open_npz_output(report: Report, kind: str, folder: Path,
                    ) -> tuple[FeatureStore | None, dict[str, set[str]]]:
    """An output folder (sharded, or an NPZ folder) as a store (None when it is missing or
    unreadable) and its failure rows."""
    readable = report(f"{kind}.readable")
    if not readable.expect(folder.is_dir(), f"{folder}: not found"):
        return None, {}
    failed = read_failures(folder, report(f"{kind}.coverage"))
    with problems_to(readable, folder.name):
        return open_features(folder), failed
    return None, failed


def npz_items(report: Report, kind: str, store: FeatureStore,
              ) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """``(key, arrays)`` of every file that reads; the others are ``readable`` problems."""
    readable = report(f"{kind}.readable")
    for key in store:
        readable.items += 1
        try:
            arrays = store[key]
        except READ_ERRORS as e:
            readable.expect(False, f"{key}: {type(e).__name__}: {e}")
            continue
        yield key, arrays


def image_coverage(check: Check, store: FeatureStore, images: Path, failed: set[str]) -> None:
    """One ``<stem>`` key or failure row per image file of ``images``."""

    check_coverage(check, [(p.stem, (p.name,)) for p in list_images(images)], set(store),
                   failed)


def npz_view_items(report: Report, kind: str, folder: Path, store: FeatureStore, suffix: str,
                   aliases: Mapping[str, str] | None = None, excused: set[str] = frozenset(),
                   ) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """Layout ``npz``: ``(file name, arrays)`` of every ``<key><suffix>.npz`` in ``folder``.

    ``<kind>.npz_view`` checks that the files are exactly the store's keys and that each
    holds the store's arrays (same dtype and bits), plus each alias as a copy of its source
    field and nothing else; the caller runs its own per-item checks on what is yielded too.
    A key in ``excused`` (it has a failures row, e.g. a name no file can have) may lack a file.
    """
    view_check, readable = report(f"{kind}.npz_view"), report(f"{kind}.readable")
    aliases = aliases or {}
    view = None
    with problems_to(readable, f"{folder.name} (npz files)"):
        view = open_features(folder, layout="npz", suffix=suffix)
    if view is None:
        return
    for key in sorted((set(store) - excused) ^ set(view)):
        view_check.expect(False, f"{key}{suffix}.npz: " + (
            "missing" if key in store else "a file for a key the output does not have"))
    for key in sorted(set(store) & set(view)):
        view_check.items += 1
        name = f"{key}{suffix}.npz"
        try:
            arrays, stored = view[key], store[key]
        except READ_ERRORS as e:
            readable.expect(False, f"{name}: {type(e).__name__}: {e}")
            continue
        for field, value in stored.items():
            got = arrays.get(field)
            view_check.expect(got is not None and got.dtype == value.dtype
                              and np.array_equal(got, value),
                              f"{name}: {field} differs from the shards' {field}")
        for alias, source in aliases.items():
            view_check.expect(alias in arrays
                              and np.array_equal(arrays[alias], stored.get(source)),
                              f"{name}: {alias} is not a copy of {source}")
        extra = sorted(set(arrays) - set(stored) - set(aliases))
        view_check.expect(not extra, f"{name}: entries {extra} the shards do not have")
        yield name, arrays


def check_sam2(report: Report, folder: Path, shared: SharedParams) -> None:
    """extract_sam2: P4/P5 shapes at the recorded input size and dtype, flags, coverage; with
    the npz layout also every ``<stem>_features.npz`` (the shards' arrays, ``IMAGE_EMB_S16``
    a copy of ``P4_S16``)."""

    store, failed = open_npz_output(report, "sam2", folder)
    if store is None:
        return
    prov = read_provenance(report("sam2.provenance"), folder.name, store, Sam2Provenance)
    if prov is None:
        return
    with problems_to(report("sam2.shapes"), "provenance"):
        size = prov.preprocessing.input_size[0]
        dtype = {"fp16": np.float16, "fp32": np.float32}[prov.storage_dtype]
        check_provenance(report("sam2.provenance"), folder.name, prov, shared)
        shapes, flags = report("sam2.shapes"), report("sam2.flags")
        p4, p5 = (256, size // 16, size // 16), (256, size // 32, size // 32)
        items = npz_items(report, "sam2", store)
        if prov.layout == "npz":
            items = chain(items, npz_view_items(report, "sam2", folder, store, SAM2_SUFFIX,
                                                 NPZ_ALIASES, all_failed(failed)))
        for key, arrays in items:
            shapes.items += 1
            for name, shape in (("P4_S16", p4), ("P5_S32", p5)):
                expect_array(shapes, f"{key} {name}", arrays.get(name), shape, dtype)
            flags.items += 1
            flag = arrays.get("feature_flag")
            flags.expect(flag is not None and flag.shape == () and int(flag) == 1,
                         f"{key}: feature_flag is {flag!r}, expected 1")
        with problems_to(report("sam2.coverage"), "images"):
            image_coverage(report("sam2.coverage"), store, Path(prov.images),
                           all_failed(failed))


def check_edges(report: Report, folder: Path) -> None:
    """edge_maps_methodB: one uint8 0/1 map per recorded size, flags, coverage; with the npz
    layout also every ``<stem>_edges.npz`` (the shards' arrays)."""

    store, failed = open_npz_output(report, "edges", folder)
    if store is None:
        return
    shapes, binary, flags = report("edges.shapes"), report("edges.binary"), report("edges.flags")
    prov = read_provenance(shapes, "provenance", store, EdgeProvenance)
    if prov is None:
        return
    with problems_to(shapes, "provenance"):
        sizes = list(prov.sizes)
        flags.expect(prov.edge_version == EDGE_VERSION,
                     f"provenance: edge_version {prov.edge_version!r}")
        items = npz_items(report, "edges", store)
        if prov.layout == "npz":
            items = chain(items, npz_view_items(report, "edges", folder, store, EDGES_SUFFIX,
                                                 excused=all_failed(failed)))
        for key, arrays in items:
            shapes.items += 1
            binary.items += 1
            for size in sizes:
                edge = arrays.get(edge_key(size))
                if expect_array(shapes, f"{key} {edge_key(size)}", edge, (size, size), np.uint8):
                    binary.expect(bool((edge <= 1).all()), f"{key} {edge_key(size)}: values "
                                                           f"{np.unique(edge)[:5].tolist()}")
            flags.items += 1
            flag, version = arrays.get("edge_flag"), arrays.get("edge_version")
            flags.expect(flag is not None and flag.shape == () and int(flag) == 1,
                         f"{key}: edge_flag is {flag!r}, expected 1")
            flags.expect(version is not None and str(version) == EDGE_VERSION,
                         f"{key}: edge_version is {version!r}, expected {EDGE_VERSION!r}")
        with problems_to(report("edges.coverage"), "images"):
            image_coverage(report("edges.coverage"), store, Path(prov.sa1b),
                           all_failed(failed))


def check_uv_index(report: Report, folder: Path, metrics: Path, max_px: float) -> None:
    """build_uv_index: per-frame arrays (finite), points inside the image, re-projection and
    the frame checks that can fail (depth agreement, depth pixels inside the colour image,
    principal point near the image centre; thresholds from the output's params), coverage;
    with the npz layout also every ``<scene>/frame_<idx>.npz`` (the shards' arrays).
    No frame: no error figure (``max_px`` is None) and the re-projection check fails."""

    store, failed = open_npz_output(report, "uv_index", folder)
    if store is None:
        return
    shapes, reproj = report("uv_index.shapes"), report("uv_index.reprojection")
    frames = report("uv_index.frame_checks")
    params = None
    prov = read_provenance(frames, "provenance", store, UvIndexProvenance)
    with problems_to(frames, "provenance"):
        params = build_dataclass(UvIndexParams, prov.params, UV_STAGE) if prov else None
    worst: float | None = None
    for key, a in npz_items(report, "uv_index", store):
        shapes.items += 1
        n = len(a["uv_idx"]) if isinstance(a.get("uv_idx"), np.ndarray) else None
        ok = all([expect_array(shapes, f"{key} uv_idx", a.get("uv_idx"), (n, 2), np.float32),
                  expect_array(shapes, f"{key} valid", a.get("valid"), (n,), np.bool_),
                  expect_array(shapes, f"{key} depth", a.get("depth"), (n,), np.float32),
                  expect_array(shapes, f"{key} conf_2d", a.get("conf_2d"), (n,), np.float32),
                  expect_array(shapes, f"{key} image_size", a.get("image_size"), (2,), np.int32)])
        if ok:
            uv, valid, (width, height) = a["uv_idx"][a["valid"]], a["valid"], a["image_size"]
            inside = (uv >= 0).all() and (uv[:, 0] <= width - 1).all() \
                and (uv[:, 1] <= height - 1).all()
            shapes.expect(bool(inside), f"{key}: a valid point lies outside the image")
            shapes.expect(bool((a["conf_2d"][~valid] == 0).all()),
                          f"{key}: conf_2d > 0 where not valid")
            shapes.expect(all(bool(np.isfinite(a[f]).all()) for f in ("uv_idx", "depth",
                                                                      "conf_2d")),
                          f"{key}: non-finite values stored")
        if params is not None:
            check_frame(frames, key, a, params, principal_point_offset)
        reproj.items += 1
        err = float(a.get("reproj_err_px", np.nan))
        worst = max(worst or 0.0, err) if np.isfinite(err) else np.inf
        reproj.expect(err < max_px, f"{key}: re-projection error {err} px >= {max_px}")
    reproj.expect(reproj.items > 0, "no frame written: there is no error figure to check")
    reproj.numbers["max_px"] = None if worst is None else round(worst, 6)
    if prov is not None and prov.layout == "npz":
        check_frame_npz_files(report("uv_index.npz_view"), folder, store, all_failed(failed))
    if metrics.as_posix() not in ("", "."):
        with problems_to(reproj, metrics.name):
            metric = json.loads(metrics.read_text())["reprojection_max_px"]
            reproj.numbers["metric_reprojection_max_px"] = metric
            reproj.expect(metric is not None and float(metric) < max_px,
                          f"{metrics}: reprojection_max_px {metric} (want < {max_px})")
    with problems_to(report("uv_index.coverage"), "provenance"):
        if params is None:
            raise ValueError("no readable params in the provenance (see uv_index.frame_checks)")
        expected = [(item, (item,)) for item in UvIndexJob(params).items()]
        check_coverage(report("uv_index.coverage"), expected, set(store),
                       all_failed(failed))


def check_frame(check: Check, key: str, a: Mapping[str, np.ndarray], params: object,
                offset: object) -> None:
    """One uv-index record's frame checks: ``depth_agreement`` >= ``min_depth_agreement``,
    ``depth_in_image`` >= ``min_depth_in_image``, the colour intrinsics' principal point within
    ``principal_point_tolerance`` of the image centre."""
    check.items += 1
    for field, minimum in (("depth_agreement", params.min_depth_agreement),
                           ("depth_in_image", params.min_depth_in_image)):
        value = a.get(field)
        shown = "missing" if value is None else f"{float(value):.3f}"
        check.expect(value is not None and float(value) >= minimum,
                     f"{key}: {field} {shown}, want >= {minimum}")
    k, size = a.get("k_color"), a.get("image_size")
    if check.expect(k is not None and k.shape == (3, 3) and size is not None,
                    f"{key}: no k_color (3,3) recorded"):
        off = offset(k, (int(size[0]), int(size[1])))
        check.expect(off <= params.principal_point_tolerance,
                     f"{key}: principal point {off:.1%} of the image side from its centre "
                     f"(> {params.principal_point_tolerance})")


def check_point_feats(report: Report, folder: Path, uv_folder: Path) -> None:
    """sample_point_feats: ``(N, C)`` fp16 on the uv index's points, zero where not valid;
    with the npz layout also every ``<scene>/frame_<idx>.npz`` (the shards' arrays)."""
    store, failed = open_npz_output(report, "point_feats", folder)
    if store is None:
        return
    shapes, valid_check = report("point_feats.shapes"), report("point_feats.valid")
    prov = read_provenance(shapes, "provenance", store, PointFeatsProvenance)
    if prov is None:
        return
    with problems_to(shapes, "provenance"):
        uv_store = open_features(uv_folder)
        upscale = build_dataclass(PointFeatsParams, prov.params, POINT_STAGE).upscale
        widths = {scene: model_dims("open_clip", source.model)[0]
                  for scene, source in prov.clip_grid.items()}
        for key, a in npz_items(report, "point_feats", store):
            width = widths.get(key.split("/")[0])
            channels = width // upscale ** 2 if width else None
            uv = uv_store[key] if key in uv_store else {}
            n = len(uv["uv_idx"]) if "uv_idx" in uv else None
            shapes.items += 1
            ok = all([expect_array(shapes, f"{key} pts_feat", a.get("pts_feat"), (n, channels),
                                   np.float16),
                      expect_array(shapes, f"{key} valid", a.get("valid"), (n,), np.bool_),
                      expect_array(shapes, f"{key} conf_2d", a.get("conf_2d"), (n,), np.float32)])
            valid_check.items += 1
            if ok and valid_check.expect(n is not None, f"{key}: no uv index frame"):
                valid = a["valid"]
                valid_check.expect(np.array_equal(a.get("uv_idx"), uv["uv_idx"]),
                                   f"{key}: uv_idx differs from the uv index")
                valid_check.expect(bool((uv["valid"] | ~valid).all()),
                                   f"{key}: valid where the uv index is not")
                valid_check.expect(not a["pts_feat"][~valid].any() and
                                   not a["conf_2d"][~valid].any(),
                                   f"{key}: non-zero features or conf_2d where not valid")
        if prov.layout == "npz":
            check_frame_npz_files(report("point_feats.npz_view"), folder, store,
                                  all_failed(failed))
        check_coverage(report("point_feats.coverage"), [(k, (k,)) for k in uv_store],
                       set(store), all_failed(failed))


def check_frame_npz_files(check: Check, folder: Path, store: FeatureStore,
                          excused: set[str] = frozenset()) -> None:
    """Layout ``npz`` of the ScanNet stages: one ``<key>.npz`` per key of the sharded store
    (``<scene>/frame_<idx>.npz``), no other, each holding exactly the record's arrays (same
    dtypes and bits), so the per-record checks on the shards hold for the files too. A key in
    ``excused`` (it has a failures row, e.g. a name no file can have) may lack a file."""
    files = {p.relative_to(folder).as_posix()[:-len(".npz")]: p
             for p in sorted(folder.rglob("*.npz")) if not p.name.startswith(".")}
    for key in sorted(set(files) - set(store)):
        check.expect(False, f"{key}.npz: a file for a key the output does not have")
    for key in sorted(store):
        check.items += 1
        if key not in files and key in excused:
            continue
        if not check.expect(key in files, f"{key}.npz: missing"):
            continue
        with problems_to(check, f"{key}.npz"):
            with np.load(files[key], allow_pickle=False) as z:
                got = {name: z[name] for name in z.files}
            want = store[key]
            same = got.keys() == want.keys() and all(   # bits, so NaN == NaN
                got[n].dtype == want[n].dtype and got[n].shape == want[n].shape
                and got[n].tobytes() == want[n].tobytes() for n in want)
            check.expect(same, f"{key}.npz: differs from the shards' record")
