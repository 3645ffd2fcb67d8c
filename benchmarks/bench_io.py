"""Storage, reader and DVC figures of the engine's layouts (model-free job, generated rows).

    python benchmarks/bench_io.py [--items 2000] [--dvc-items 20000] [--json f]

- write MB/s per layout (shards, hdf5 view, npy per item, npz per item): feature bytes stored
  over the wall time of ``run_job`` (ViT-B/16 grids at ``grid: 7``, 49x768 fp16);
- random-read items/s through ``FeatureDataset`` + DataLoader with 1 and 4 workers;
- files and bytes on disk per layout;
- ``dvc add`` / ``push`` / ``pull`` seconds of the sharded vs the per-item layout at
  ``--dvc-items`` items of one SigLIP embedding each (768 fp16: DVC's cost is per file).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench_shards import GridJob   # the same generated grids


def write_layout(root: Path, names: list[str], shape: tuple[int, ...], layout: str,
                 shard_mb: float = 64.0) -> dict:
    from featcache.engine import EngineParams, WriterOptions, run_job

    out = root / layout
    job = GridJob(names, shape)
    t = time.perf_counter()
    run_job(job, None, stage=f"bench_{layout}", out=out, writer=layout,
            writer_options=WriterOptions(dtype="fp16"), provenance={}, fingerprint={},
            params=EngineParams(num_workers=0, shard_mb=shard_mb),
            item_bytes=int(np.prod(shape)) * 2)
    seconds = time.perf_counter() - t
    feature_mb = len(names) * int(np.prod(shape)) * 2 / 1e6
    paths = [p for p in out.rglob("*") if p.is_file()]
    view = out.with_suffix(".h5")
    paths += [view] if view.is_file() else []
    return {"write_mb_s": feature_mb / seconds, "seconds": seconds, "files": len(paths),
            "disk_mb": sum(p.stat().st_size for p in paths) / 1e6, "feature_mb": feature_mb}


def reader_rate(out: Path, workers: int, n: int) -> float:
    from featcache.reader import FeatureDataset

    ds = FeatureDataset(out, field="grids")
    g = torch.Generator().manual_seed(0)
    sampler = torch.utils.data.RandomSampler(ds, num_samples=n, generator=g)
    loader = torch.utils.data.DataLoader(ds, batch_size=32, sampler=sampler,
                                         num_workers=workers)
    t = time.perf_counter()
    count = sum(len(keys) for keys, _ in loader)
    return count / (time.perf_counter() - t)


def dvc_times(root: Path, folder_name: str, make) -> dict:
    """Seconds of ``dvc add``, ``push`` and ``pull`` (cache and files removed first) of the
    folder ``make(repo)`` creates in a fresh git+dvc repo with a local remote."""
    dvc = str(Path(sys.executable).with_name("dvc"))
    repo = root / f"repo_{folder_name}"
    repo.mkdir()
    run = lambda *a: subprocess.run(a, cwd=repo, check=True, capture_output=True)  # noqa: E731
    run("git", "init", "-q")
    run(dvc, "init", "-q")
    run(dvc, "remote", "add", "-d", "local", str(root / f"remote_{folder_name}"))
    target = make(repo)
    files = sum(1 for p in target.rglob("*") if p.is_file())
    out = {"files": files}
    for step, args in (("add", ("add", "-q", target.name)), ("push", ("push", "-q"))):
        t = time.perf_counter()
        run(dvc, *args)
        out[f"{step}_s"] = time.perf_counter() - t
    shutil.rmtree(target)
    shutil.rmtree(repo / ".dvc" / "cache")
    t = time.perf_counter()
    run(dvc, "pull", "-q")
    out["pull_s"] = time.perf_counter() - t
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=2000)
    ap.add_argument("--dvc-items", type=int, default=20000)
    ap.add_argument("--reads", type=int, default=2000)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    res: dict = {"items": args.items, "row": [49, 768], "layouts": {}, "reader": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.chdir(root)
        names = [f"img{i:06d}" for i in range(args.items)]
        for layout in ("shards", "hdf5", "npy", "npz"):
            res["layouts"][layout] = write_layout(root, names, (49, 768), layout)
        for workers in (1, 4):
            res["reader"][f"workers_{workers}_items_s"] = reader_rate(root / "shards", workers,
                                                                      args.reads)
        dvc_names = [f"img{i:06d}" for i in range(args.dvc_items)]

        def sharded(repo: Path) -> Path:
            write_layout(repo, dvc_names, (768,), "shards", shard_mb=256)
            return repo / "shards"

        def per_item(repo: Path) -> Path:
            write_layout(root, dvc_names, (768,), "npy", shard_mb=256)
            target = repo / "npy_files"
            target.mkdir()
            for p in (root / "npy").glob("*.npy"):
                os.replace(p, target / p.name)
            return target

        res["dvc"] = {"items": args.dvc_items, "sharded": dvc_times(root, "sharded", sharded),
                      "per_item": dvc_times(root, "per_item", per_item)}
    text = json.dumps(res, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
