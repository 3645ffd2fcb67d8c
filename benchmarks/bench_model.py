"""Model-bound check: extract_clip_grid with the real default architecture (ViT-B-16, random
weights) on this machine vs the encoder's pure forward on pre-made tensors, same batch size.

    python benchmarks/bench_model.py [--images 48] [--batch-size 16] [--json f]

Made to be fair to both sides, in one process:

- the same intra-op threads: one, the engine's rule on the CPU (see featcache.engine.runner);
  the stage's 2 DataLoader workers decode on the other cores, as they would in production;
- the same batch size, the same input shape and model (same weights seed);
- warm-up: one forward of the batch shape before anything is timed, so oneDNN's one-time
  kernel setup is paid before either side's clock starts (it is cached per process);
- enough items: ``--images`` (a multiple of the batch) for the stage, the same number of
  forward rows, timed twice for the forward (before and after the stage: the machine is
  shared, so the mean of both is used and both are reported).

The stage's rate is items over its engine wall time (signatures, worker start, every batch,
the shard write and the move into place; model loading excluded, as from the forward). Also
reported: the model's share of the stage's wall (``compute_s / wall_s``).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import datagen
import torch
from bench_host import run_stage, stage_params

from featcache.encoders import load_encoder, resolve_spec


def forward_rate(encoder: torch.nn.Module, x: torch.Tensor, rows: int) -> float:
    n, t = 0, time.perf_counter()
    with torch.inference_mode():
        while n < rows:
            encoder(x)
            n += x.shape[0]
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    images = max(args.batch_size, args.images // args.batch_size * args.batch_size)
    before = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.chdir(root)
        datagen.write_jpegs(root / "val2017", images, datagen.COCO_SIZE)
        spec = resolve_spec("open_clip", "ViT-B-16", weights="random")
        encoder = load_encoder(spec, "cpu")
        x = torch.randn(args.batch_size, 3, *spec.input_size)   # a normalised input's range
        torch.set_num_threads(1)
        with torch.inference_mode():
            encoder(x)   # warm-up
        first = forward_rate(encoder, x, images)
        torch.set_num_threads(before)   # the engine sets its own one thread
        params = stage_params("clip_grid", root, 2, args.batch_size, {})
        result = run_stage("clip_grid", params)
        torch.set_num_threads(1)
        second = forward_rate(encoder, x, images)
        torch.set_num_threads(before)
    forward = (first + second) / 2
    stage = result.items / result.wall_s
    out = {"model": "ViT-B-16", "weights": "random", "images": images,
           "batch_size": args.batch_size, "threads": 1, "workers": 2,
           "forward_img_s": forward, "forward_img_s_runs": [first, second],
           "stage_img_s": stage, "stage_wall_s": result.wall_s,
           "stage_model_share": result.compute_s / result.wall_s}
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
