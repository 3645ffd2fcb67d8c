"""Micro benchmark of extract_siglip: one forward per mask (naive) vs the batched engine.

Generates a COCO-panoptic split (random rectangles on textured images) in a temporary folder,
then embeds every segment twice with the same model and random weights:

- naive: the main process decodes each image, crops each segment and runs one forward per
  mask (batch of 1), as a simple loop would;
- engine: :func:`featcache.stages.extract_siglip.run_siglip`: DataLoader workers decode and crop, crops from
  many images share one forward of ``--batch-size``.

Prints segments/s for both, their ratio (measured in the same run), and the largest
difference between the two sets of embeddings (they must agree). Not a test::

    python benchmarks/bench_siglip.py --images 24 --model ViT-B-16-SigLIP
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from featcache.datasets.coco_panoptic import ids_to_rgb
from featcache.encoders import load_encoder, resolve_spec
from featcache.stages.extract_siglip import SiglipCompute, SiglipParams, build_siglip_job, run_siglip

log = logging.getLogger("bench_siglip")


def write_split(root: Path, n_images: int, seed: int = 0) -> int:
    """``n_images`` 320x240 images with 4-9 rectangles each; returns the number of segments."""
    import json

    rng = np.random.default_rng(seed)
    (root / "val2017").mkdir(parents=True)
    (root / "annotations" / "panoptic_val2017").mkdir(parents=True)
    images, annotations, total = [], [], 0
    for image_id in range(1, n_images + 1):
        labels = np.full((240, 320), 1, np.int64)
        for sid in range(2, int(rng.integers(5, 11))):
            x0, y0 = int(rng.integers(0, 280)), int(rng.integers(0, 200))
            labels[y0:y0 + int(rng.integers(4, 120)), x0:x0 + int(rng.integers(4, 160))] = sid
        ids = [int(s) for s in np.unique(labels)]
        rgb = (rng.integers(0, 256, (int(labels.max()) + 1, 3))[labels] +
               rng.integers(-20, 21, labels.shape + (3,))).clip(0, 255).astype(np.uint8)
        name = f"{image_id:012d}"
        Image.fromarray(rgb).save(root / "val2017" / f"{name}.jpg", quality=90)
        Image.fromarray(ids_to_rgb(labels)).save(
            root / "annotations" / "panoptic_val2017" / f"{name}.png")
        images.append({"id": image_id, "file_name": f"{name}.jpg", "width": 320, "height": 240})
        annotations.append({"image_id": image_id, "file_name": f"{name}.png",
                            "segments_info": [{"id": s, "iscrowd": 0} for s in ids]})
        total += len(ids)
    (root / "annotations" / "panoptic_val2017.json").write_text(
        json.dumps({"images": images, "annotations": annotations}))
    return total


def run_naive(job, encoder, device: torch.device) -> dict[str, np.ndarray]:
    """One forward per mask, everything in the main process."""
    out = {}
    with torch.inference_mode():
        for item in job.items():
            for piece in job.load(item):
                pooled = encoder(piece.tensor[None].to(device)).pooled
                out[piece.key] = torch.nn.functional.normalize(pooled, dim=-1)[0].cpu().numpy()
    return out


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--model", default="ViT-B-16-SigLIP")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        n = write_split(Path(tmp) / "coco", args.images)
        params = SiglipParams(coco="coco", split="val2017", out="out", model=args.model,
                              batch_size=args.batch_size, num_workers=args.workers)
        spec = resolve_spec("open_clip", args.model, weights="random")
        device = torch.device(args.device)
        job = build_siglip_job(params, spec)
        encoder = load_encoder(spec, device)
        with torch.inference_mode():  # warm-up, so neither side pays first-call costs
            encoder(torch.zeros((1, 3, *spec.input_size), device=device))
        t = time.perf_counter()
        naive = run_naive(job, encoder, device)
        naive_s = time.perf_counter() - t
        t = time.perf_counter()
        run_siglip(job, SiglipCompute(encoder, device, with_ids=False), params,
                   {"model": args.model}, {"bench": time.time()})
        engine_s = time.perf_counter() - t
        check_agreement(Path("out") / "embeddings.h5", naive)
    print(f"{args.model}, {args.images} images, {n} segments, device {args.device}")
    print(f"naive (1 forward per mask): {n / naive_s:8.2f} segments/s  ({naive_s:.2f} s)")
    print(f"engine (batch {args.batch_size}, {args.workers} workers): "
          f"{n / engine_s:8.2f} segments/s  ({engine_s:.2f} s)")
    print(f"speed-up: {naive_s / engine_s:.2f}x")


def check_agreement(h5_path: Path, naive: dict[str, np.ndarray]) -> None:
    import h5py

    with h5py.File(h5_path, "r") as f:
        keys = [k.decode() for k in f["keys"][:]]
        emb = f["embeddings"][:].astype(np.float32)
    worst = min(float(emb[i] @ naive[k]) for i, k in enumerate(keys))
    print(f"agreement: {len(keys)} embeddings, lowest cosine naive vs engine {worst:.5f}")


if __name__ == "__main__":
    main()
