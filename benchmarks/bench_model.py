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

Rows, not only items: the engine pads each shard's last partial batch to ``batch_size`` (one
shape for every batch) and a batch never spans two shards, so the stage may run more forward
rows than it has items. The encoder's forward is wrapped (hooks) to count the stage's forwards,
their batch shape and their time, and the output's index gives the shard sizes:

- ``ratio_items`` = stage items/s over the forward's rows/s: what a user gets;
- ``ratio_rows`` = stage rows/s (items + padding) over the forward's: the engine keeping the
  model fed; ``padding_share`` = padded rows / rows;
- ``forward_ms_stage`` vs ``forward_ms_pure``: the time of one forward of the same shape
  inside the stage and alone;
- ``padding_share_at_scale_est``: an estimate for a large dataset at the default shard size,
  about ``(b - 1) / 2`` padded rows per shard of ``target_items`` rows.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import datagen
import numpy as np
import torch
from bench_host import run_stage, stage_params

import featcache.stages._grids as grids
from featcache.encoders import load_encoder, resolve_spec
from featcache.engine.shards import read_index, target_items


def forward_rate(encoder: torch.nn.Module, x: torch.Tensor, rows: int) -> float:
    n, t = 0, time.perf_counter()
    with torch.inference_mode():
        while n < rows:
            encoder(x)
            n += x.shape[0]
    return n / (time.perf_counter() - t)


class ForwardLog:
    """The stage's encoder forwards (batch rows, seconds), counted only inside ``run_job``
    (``item_bytes``' one-row probe forward before it is not a batch); ``item_bytes`` is the
    stage's bytes-per-item estimate, which sets the shard size."""

    def __init__(self) -> None:
        self.forwards: list[tuple[int, float]] = []
        self.item_bytes = 0
        self._active = False
        self._t = 0.0

    def install(self) -> None:
        load, run_job, item_bytes = grids.load_encoder, grids.run_job, \
            grids.GridCompute.item_bytes

        def loading(*args: object, **kwargs: object) -> torch.nn.Module:
            enc = load(*args, **kwargs)
            enc.register_forward_pre_hook(self._pre)
            enc.register_forward_hook(self._post)
            return enc

        def running(*args: object, **kwargs: object) -> object:
            self._active = True
            try:
                return run_job(*args, **kwargs)
            finally:
                self._active = False

        def sizing(compute: object, dtype: str) -> int:
            self.item_bytes = item_bytes(compute, dtype)
            return self.item_bytes

        grids.load_encoder, grids.run_job = loading, running
        grids.GridCompute.item_bytes = sizing

    def _pre(self, module: object, inputs: tuple) -> None:
        self._t = time.perf_counter()

    def _post(self, module: object, inputs: tuple, output: object) -> None:
        if self._active:
            self.forwards.append((int(inputs[0].shape[0]), time.perf_counter() - self._t))


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
        log = ForwardLog()
        log.install()
        result = run_stage("clip_grid", params)
        shard_col = read_index(root / "out" / "bench")[1]
        torch.set_num_threads(1)
        second = forward_rate(encoder, x, images)
        torch.set_num_threads(before)
    forward = (first + second) / 2
    stage = result.items / result.wall_s
    rows = sum(r for r, _ in log.forwards)
    b = args.batch_size
    target = target_items(params.shard_mb, log.item_bytes)
    pad_est = (b - 1) / 2
    out = {"model": "ViT-B-16", "weights": "random", "images": images,
           "batch_size": b, "threads": 1, "workers": 2,
           "forward_img_s": forward, "forward_img_s_runs": [first, second],
           "stage_img_s": stage, "stage_wall_s": result.wall_s,
           "stage_model_share": result.compute_s / result.wall_s,
           # rows the stage's forwards computed: items + the padding of each shard's last batch
           "shard_items": np.bincount(shard_col).tolist(), "forwards": len(log.forwards),
           "forward_batch_rows": sorted({r for r, _ in log.forwards}),
           "stage_rows": rows, "padding_rows": rows - result.items,
           "padding_share": (rows - result.items) / rows if rows else 0.0,
           "stage_rows_s": rows / result.wall_s,
           "ratio_items": stage / forward, "ratio_rows": rows / result.wall_s / forward,
           "forward_ms_stage": 1000 * sum(t for _, t in log.forwards) / len(log.forwards),
           "forward_ms_pure": 1000 * b / forward,
           # the default shard size: ~(b-1)/2 padded rows per shard of target_items rows
           "shard_mb": params.shard_mb, "item_bytes": log.item_bytes, "target_items": target,
           "padding_share_at_scale_est": pad_est / (target + pad_est)}
    out["summary"] = summary(out)
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


def summary(r: dict) -> str:
    """The figures in words (run.py's table quotes it)."""
    return (f"{r['images']} images in shards of {r['shard_items']} -> {r['forwards']} forwards "
            f"of {'/'.join(map(str, r['forward_batch_rows']))} rows = {r['stage_rows']} rows "
            f"(padding {100 * r['padding_share']:.1f}%); stage {r['stage_img_s']:.2f} img/s, "
            f"{r['stage_rows_s']:.2f} rows/s vs the pure forward {r['forward_img_s']:.2f} "
            f"rows/s: items ratio {r['ratio_items']:.3f}, rows ratio {r['ratio_rows']:.3f}; "
            f"one forward {r['forward_ms_stage']:.0f} ms in the stage vs "
            f"{r['forward_ms_pure']:.0f} ms alone. Estimate at scale (shard_mb "
            f"{r['shard_mb']:g}, ~{r['target_items']} items per shard, ~(b-1)/2 = "
            f"{(r['batch_size'] - 1) / 2:g} padded rows per shard): padding "
            f"~{100 * r['padding_share_at_scale_est']:.2f}% of the rows.")


if __name__ == "__main__":
    main()
