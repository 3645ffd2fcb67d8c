"""Is the model the bottleneck? extract_clip_grid's engine against two baselines, one run.

    python benchmarks/bench_engine.py [--images 64] [--model ViT-B-16] [--workers 2]

Generates JPEGs (640x480), then measures images/s of
  1. model only   — forward passes on tensors decoded and preprocessed beforehand (the ceiling),
  2. naive serial — decode, preprocess, forward one image at a time, write one HDF5 dataset
                    each (what the seed scripts do),
  3. engine       — extract_clip_grid's path: DataLoader workers decode and preprocess, batched
                    forward, chunks saved by a thread, HDF5 assembled at the end.
and prints the ratios engine/model-only (1.0 = decode, preprocessing and writing fully hidden
behind the model) and engine/naive. Numbers, not a test: they depend on the machine. On a
2-core CPU box the workers compete with the model for the same cores, so expect < 1.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_images(folder: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:480, 0:640]
    for i in range(n):
        base = (np.sin(xx / (20 + i)) * 60 + np.cos(yy / (15 + i)) * 60 + 128)
        rgb = np.stack([base, base[::-1], base[:, ::-1]], -1) + rng.normal(0, 8, (480, 640, 3))
        Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(folder / f"{i:012d}.jpg",
                                                                quality=90)


def bench_model_only(encoder, pre, paths, batch_size: int) -> float:
    from featcache.datasets.images import load_image

    x = torch.stack([pre(load_image(p).rgb) for p in paths])
    with torch.inference_mode():
        encoder(x[:batch_size])  # warm-up: first calls pay for allocations and kernel selection
    t = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            encoder(x[i:i + batch_size])
    return len(paths) / (time.perf_counter() - t)


def bench_naive(encoder, pre, paths, out: Path) -> float:
    import h5py

    from featcache.datasets.images import load_image

    t = time.perf_counter()
    with h5py.File(out, "w") as f, torch.inference_mode():
        for p in paths:
            grid = encoder(pre(load_image(p).rgb)[None]).grid[0]
            f.create_dataset(f"{p.stem}_grids", data=grid.flatten(1).T.numpy().astype(np.float16))
    return len(paths) / (time.perf_counter() - t)


def bench_engine(root: Path, model: str, workers: int, batch_size: int) -> float:
    from featcache.stages.extract_clip_grid import ClipGridParams, extract_clip_grid
    from featcache.config import SharedParams
    from featcache.stages._grids import SplitSpec

    params = ClipGridParams(root=str(root), out=str(root / "out"), batch_size=batch_size,
                            splits=[SplitSpec(name="bench", images="images")],
                            num_workers=workers, save_global=False)
    results = extract_clip_grid(SharedParams(model=model, device="auto"), params)
    # the engine's own wall time: from the first item to the output in place (model loading,
    # done once per stage, is excluded as it is from the baselines)
    return sum(r.done for r in results) / sum(r.wall_s for r in results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    from featcache.encoders import Preprocessor, load_encoder, resolve_device, resolve_spec

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.chdir(root)  # the engine's scratch area lives under the working directory
        (root / "images").mkdir()
        make_images(root / "images", args.images)
        paths = sorted((root / "images").glob("*.jpg"))
        spec = resolve_spec("open_clip", args.model, weights="random")
        encoder = load_encoder(spec, resolve_device("auto"))
        pre = Preprocessor(spec)
        model_only = bench_model_only(encoder, pre, paths, args.batch_size)
        naive = bench_naive(encoder, pre, paths, root / "naive.h5")
        engine = bench_engine(root, args.model, args.workers, args.batch_size)
    result = {"model": args.model, "images": args.images, "torch_threads": torch.get_num_threads(),
              "workers": args.workers, "model_only_img_s": round(model_only, 2),
              "naive_img_s": round(naive, 2), "engine_img_s": round(engine, 2),
              "engine_vs_model_only": round(engine / model_only, 3),
              "engine_vs_naive": round(engine / naive, 3)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
