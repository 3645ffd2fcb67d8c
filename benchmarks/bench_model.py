"""Model-bound check: extract_clip_grid with the real default architecture (ViT-B-16, random
weights) on this machine vs the encoder's pure forward on pre-made tensors, same batch size.

    python benchmarks/bench_model.py [--images 48] [--json f]

Both run the model with one intra-op thread on the CPU (the engine's rule, see
featcache.engine.runner); the stage's rate is its engine wall time (first item to output in
place; model loading excluded, as from the forward). A ratio >= 0.95 means decoding,
preprocessing, transfer and writing are hidden behind the model.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

import datagen
from bench_host import run_stage, stage_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    from featcache.encoders import load_encoder, resolve_spec

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.chdir(root)
        datagen.write_jpegs(root / "val2017", args.images, datagen.COCO_SIZE)
        spec = resolve_spec("open_clip", "ViT-B-16", weights="random")
        encoder = load_encoder(spec, "cpu")
        x = torch.rand(args.batch_size, 3, *spec.input_size)
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        with torch.inference_mode():
            encoder(x)
            t = time.perf_counter()
            n = 0
            while n < args.images:
                encoder(x)
                n += args.batch_size
            forward = n / (time.perf_counter() - t)
        torch.set_num_threads(before)
        del encoder
        params = stage_params("clip_grid", root, 2, args.batch_size, {})
        result = run_stage("clip_grid", params)
        stage = result.items / result.wall_s
    out = {"model": "ViT-B-16", "weights": "random", "images": args.images,
           "batch_size": args.batch_size, "forward_img_s": forward, "stage_img_s": stage}
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
