"""The embedded sample dataset: every kind of input the stages read, generated from a seed.

``generate_sample(out, seed)`` writes, in a couple of seconds::

    coco/     COCO-panoptic val2017 split (JPEGs, RGB-encoded panoptic PNGs, panoptic JSON)
    sa1b/     SA-1B-style images with per-image JSON of COCO-RLE masks
    scannet/  two ScanNet-style scenes rendered from exact geometry
    images/   RGB, RGBA, grayscale, 16-bit, WEBP, BMP, TIFF, CMYK, EXIF-rotated, truncated
    MANIFEST.json   seed, counts and the deliberate special cases (tiny / absent segment,
                    -inf pose, missing depth, corrupt file, ...)

Determinism. Each part draws from its own NumPy ``PCG64`` stream derived from ``(seed, part)``,
and the pixel arrays are computed with correctly rounded elementwise arithmetic only (no BLAS,
no sin/exp), so the same seed gives identical *arrays* on any machine with the same NumPy
random streams (NumPy keeps ``Generator`` streams stable in practice but does not promise it
across versions). The *files* are a step further from the arrays: PNG, JSON, TXT and PLY decode
back to exactly those arrays everywhere, but PNG bytes depend on the zlib build inside Pillow,
and JPEG (and lossy WEBP) bytes and decoded pixels depend on the libjpeg(-turbo) version. On one
machine two runs are byte-identical (tested); across machines, compare decoded arrays of the
lossless files, not file hashes. The JPEG quality is fixed at 90 and no timestamps are written.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from featcache.sample.coco import write_coco
from featcache.sample.imagefolder import write_image_folder
from featcache.sample.paint import sub_rng, write_json
from featcache.sample.sa1b_images import write_sa1b
from featcache.sample.scannet_scenes import write_scannet

log = logging.getLogger(__name__)

SAMPLE_VERSION = 1
MANIFEST = "MANIFEST.json"
PARTS = ("coco", "sa1b", "scannet", "images")


def generate_sample(out: str | Path, seed: int) -> dict[str, Any]:
    """Write the sample dataset to ``out`` and return its manifest (also in ``MANIFEST.json``).

    The dataset is built in a sibling temporary folder and moved into place, so ``out`` is
    either the complete previous sample or the complete new one. An existing ``out`` is
    replaced only if it is empty or holds a previous sample (a ``MANIFEST.json``); anything
    else raises ``FileExistsError`` rather than deleting user data.
    """
    out = Path(out)
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    _check_replaceable(out)
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        manifest = _write_all(tmp, seed)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("sample dataset (seed %d) written to %s", seed, out)
    return manifest


def _write_all(root: Path, seed: int) -> dict[str, Any]:
    writers = {"coco": write_coco, "sa1b": write_sa1b, "scannet": write_scannet,
               "images": write_image_folder}
    manifest: dict[str, Any] = {"sample_version": SAMPLE_VERSION, "seed": seed}
    for part in PARTS:
        manifest[part] = writers[part](root / part, sub_rng(seed, part))
        log.debug("sample part %s written", part)
    manifest["files"] = sorted(p.relative_to(root).as_posix()
                               for p in root.rglob("*") if p.is_file())
    write_json(manifest, root / MANIFEST)
    return manifest


def _check_replaceable(out: Path) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder; refusing to replace it")
    if (out / MANIFEST).is_file() or not any(out.iterdir()):
        return
    raise FileExistsError(f"{out}: not empty and not a featcache sample (no {MANIFEST}); "
                          "refusing to delete it - choose another download.out")


def load_manifest(root: str | Path) -> dict[str, Any]:
    """Read ``MANIFEST.json`` of a generated sample."""
    return json.loads((Path(root) / MANIFEST).read_text())
