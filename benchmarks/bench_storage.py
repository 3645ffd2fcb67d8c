"""Storage of fp16 ViT grids: HDF5 compression none / lzf / gzip, size and write speed, one run.

    python benchmarks/bench_storage.py [--images 500] [--model ViT-B-16]

Grids come from the real architecture (random weights) on generated images, so their statistics
are those of real ViT tokens rather than of random numbers. Prints, per compression, the file
size relative to `none` and the write throughput, through featcache's own shard writer. This is
where DESIGN.md's default `compression: none` comes from.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def make_grids(model: str, n: int) -> np.ndarray:
    from featcache.encoders import load_encoder, resolve_spec

    encoder = load_encoder(resolve_spec("open_clip", model, weights="random"), "cpu")
    rng = np.random.default_rng(0)
    base = torch.from_numpy(rng.standard_normal((16, 3, 224, 224)).astype(np.float32))
    with torch.inference_mode():
        grids = encoder(base).grid.flatten(2).transpose(1, 2).numpy().astype(np.float16)
    # n distinct grids: the 16 computed ones, perturbed like neighbouring images would be
    reps = [grids[i % 16] + rng.normal(0, 0.05, grids.shape[1:]).astype(np.float16)
            for i in range(n)]
    return np.stack(reps)


def write(grids: np.ndarray, path: Path, compression: str) -> float:
    """Write ``grids`` as one shard (the engine's own writer) with ``compression``."""
    from featcache.engine.shards import ShardContent, write_shard
    from featcache.engine.writers import WriterOptions, h5_compression

    keys = [str(i) for i in range(len(grids))]
    content = ShardContent(keys, keys, [(i, k, {"grids": g}) for i, (k, g)
                                        in enumerate(zip(keys, grids))], [])
    t = time.perf_counter()
    write_shard(path, content, h5_compression(WriterOptions("fp16", compression)))
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--model", default="ViT-B-16")
    args = ap.parse_args()
    grids = make_grids(args.model, args.images)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for comp in ("none", "lzf", "gzip"):
            path = Path(tmp) / f"{comp}.h5"
            seconds = write(grids, path, comp)
            rows[comp] = {"mb": round(path.stat().st_size / 2**20, 2),
                          "ms_per_grid": round(1000 * seconds / len(grids), 3),
                          "mb_per_s": round(grids.nbytes / 2**20 / seconds, 1)}
    for comp in rows:
        rows[comp]["size_vs_none"] = round(rows[comp]["mb"] / rows["none"]["mb"], 3)
    print(json.dumps({"model": args.model, "grid_shape": list(grids.shape[1:]),
                      "images": args.images, "compression": rows}, indent=2))


if __name__ == "__main__":
    main()
