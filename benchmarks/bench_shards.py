"""The engine's output at scale: bytes written per feature byte, files per output, model work
after adding 1% of the items, and random reads through the FSGR view vs a plain HDF5 file.

    python benchmarks/bench_shards.py [--items 2000] [--shard-mb 16] [--json out.json]

A model-free job of ``--items`` items, each a ViT-B/16 grid at ``grid: 7`` (49 x 768 fp16,
73.5 KiB), through ``featcache.engine.run_job`` exactly as a stage calls it. Bytes written are
what the process passed to ``write()`` (``/proc/self/io`` ``wchar``) while the run lasted,
over the feature bytes stored. Run it from a checkout of any featcache version: it also runs
the engine before shards (``run_job`` without ``item_bytes``), for before/after figures.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np

ROW = (49, 768)     # --row 196 for full ViT-B/16 grids


class GridJob:
    """Items ``img000000``..; item i's ``shape`` fp16 grid is seeded by i (so any run can
    recompute it). Also the item source of ``bench_io``."""

    def __init__(self, names: list[str], shape: tuple[int, ...] = ROW) -> None:
        self.names, self.shape = names, shape

    def items(self) -> list[str]:
        return list(self.names)

    def signature(self, item: str) -> str:
        return item

    def load(self, item: str):
        from featcache.engine import Piece

        rng = np.random.default_rng(int(item[3:]))
        return [Piece(item, arrays={"grids": rng.standard_normal(self.shape, np.float32)
                                    .astype(np.float16)})]


def wchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("wchar")).split()[1])


def run(names: list[str], out: Path, shard_mb: float, layout: str = "shards",
        shape: tuple[int, ...] = ROW) -> dict:
    from featcache.engine import EngineParams, WriterOptions, run_job

    sharded = "item_bytes" in inspect.signature(run_job).parameters
    extra = {"item_bytes": int(np.prod(shape)) * 2} if sharded else {}
    params = EngineParams(num_workers=0, **({"shard_mb": shard_mb} if sharded else {}))
    writer = layout if sharded else {"shards": "hdf5_packed", "hdf5": "hdf5"}[layout]
    target = out if sharded else out.with_suffix(".h5")
    before, t = wchar(), time.perf_counter()
    result = run_job(GridJob(names, shape), None, stage="bench", out=target, writer=writer,
                     writer_options=WriterOptions(dtype="fp16"), provenance={},
                     fingerprint={}, params=params, **extra)
    written, seconds = wchar() - before, time.perf_counter() - t
    feature_bytes = len(names) * int(np.prod(shape)) * 2
    files = [p for p in (target.rglob("*") if target.is_dir() else [target]) if p.is_file()]
    computed = getattr(result, "computed", getattr(result, "done", len(names)))
    return {"items": len(names), "computed": computed,
            "bytes_written_per_feature_byte": round(written / feature_bytes, 3),
            "files": len(files), "seconds": round(seconds, 3)}


def random_reads(path: Path, keys: list[str], n: int = 1000) -> float:
    """Seconds per read of ``f[f"{key}_grids"][()]``, the FSGR seed's way (h5py, one file)."""
    import h5py

    rng = random.Random(0)
    picks = [rng.choice(keys) for _ in range(n)]
    with h5py.File(path, "r") as f:
        for k in picks[:50]:            # warm the page cache and the file's metadata
            f[f"{k}_grids"][()]
        t = time.perf_counter()
        for k in picks:
            f[f"{k}_grids"][()]
    return (time.perf_counter() - t) / n


def reader_reads(path: Path, keys: list[str], n: int = 1000) -> float:
    """Seconds per read of ``open_features(path)[key]`` (featcache's reader)."""
    from featcache.reader import open_features

    rng = random.Random(0)
    picks = [rng.choice(keys) for _ in range(n)]
    store = open_features(path)
    for k in picks[:50]:
        store[k]
    t = time.perf_counter()
    for k in picks:
        store[k]
    return (time.perf_counter() - t) / n


def plain_file(path: Path, names: list[str], shape: tuple[int, ...]) -> None:
    import h5py

    job = GridJob(names, shape)
    with h5py.File(path, "w") as f:
        for name in names:
            f.create_dataset(f"{name}_grids", data=job.load(name)[0].arrays["grids"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=2000)
    ap.add_argument("--shard-mb", type=float, default=16.0)
    ap.add_argument("--json", default="")
    ap.add_argument("--row", type=int, default=49, help="tokens per grid (49 or 196)")
    args = ap.parse_args()
    json_path = Path(args.json).resolve() if args.json else None
    shape = (args.row, 768)
    names = [f"img{i:06d}" for i in range(args.items)]
    rng = random.Random(1)
    held_back = set(rng.sample(names, max(1, args.items // 100)))    # 1%, spread over the keys
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        results["fresh"] = run(names, Path("fresh"), args.shard_mb, shape=shape)
        results["before_1pct"] = run([n for n in names if n not in held_back], Path("inc"),
                                     args.shard_mb, shape=shape)
        results["add_1pct"] = run(names, Path("inc"), args.shard_mb, shape=shape)
        results["add_1pct"]["model_work_fraction"] = round(
            results["add_1pct"]["computed"] / args.items, 4)
        try:
            run(names, Path("view"), args.shard_mb, layout="hdf5", shape=shape)
            plain_file(Path("plain.h5"), names, shape)
            plain, view = random_reads(Path("plain.h5"), names), random_reads(
                Path("view.h5"), names)
            shards = reader_reads(Path("view"), names)
            results["fsgr_random_read"] = {"plain_ms": round(plain * 1e3, 4),
                                           "view_ms": round(view * 1e3, 4),
                                           "view_over_plain": round(view / plain, 3),
                                           "reader_on_shards_ms": round(shards * 1e3, 4),
                                           "reader_over_plain": round(shards / plain, 3)}
        except Exception as e:  # noqa: BLE001 - an engine without the view
            results["fsgr_random_read"] = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(results, indent=2))
    if json_path:
        json_path.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
