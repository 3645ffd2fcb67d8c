"""Phase breakdown of one stage's host path, measured in this process with one torch thread.

decode (file -> RGB), preprocess (RGB -> the worker's model input, crops included for SigLIP),
transfer (batching the pieces, moving them to the device and the device-side work before the
model: stack, pad, normalise, cast), write (results to the storage dtype and one shard write).
ms per item; the model's forward is measured separately (model-bound check, GPU script).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _ms(t: float, n: int) -> float:
    return 1000.0 * t / max(n, 1)


def phase_breakdown(stage: str, root: Path, params: Any, encoder: Any, limit: int) -> dict:
    from featcache.engine import Piece, make_batch
    from featcache.engine.shards import ShardContent, write_shard
    from featcache.engine.writers import WriterOptions, cast, h5_compression

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        job, compute, decode = _job(stage, root, params, encoder)
        items = job.items()[:limit]
        t = time.process_time()
        for item in items:
            decode(item)
        t_decode = time.process_time() - t
        t = time.process_time()
        pieces = [p for item in items for p in job.load(item) if isinstance(p, Piece)]
        t_load = time.process_time() - t
        n = len(pieces)
        batch = params.batch_size
        t = time.process_time()
        outs = []
        with torch.inference_mode():
            for i in range(0, n, batch):
                outs.append((pieces[i:i + batch], compute(make_batch(pieces[i:i + batch], batch))))
        t_transfer = time.process_time() - t
        t = time.process_time()
        records = []
        for chunk, out in outs:
            for j, p in enumerate(chunk):
                records.append((len(records), p.key, {k: cast(np.asarray(v[j]), "fp16")
                                                      for k, v in out.items()
                                                      if v[j] is not None}))
        keys = [r[1] for r in records]
        write_shard(root / "phase_shard.h5", ShardContent(keys, keys, records, []),
                    h5_compression(WriterOptions()))
        t_write = time.process_time() - t
    finally:
        torch.set_num_threads(before)
    per = len(items) if stage == "siglip" else n
    return {"items": n, "decode": _ms(t_decode, n) if stage != "siglip" else _ms(t_decode, n),
            "preprocess": _ms(t_load - t_decode, n), "transfer": _ms(t_transfer, n),
            "write": _ms(t_write, n), "per_image_items": per}


def _job(stage: str, root: Path, params: Any, encoder: Any):
    import featcache.encoders as enc
    from featcache.datasets.images import composite_alpha, load_image

    cpu = torch.device("cpu")
    if stage == "siglip":
        from featcache.datasets.coco_panoptic import read_ids_and_image
        from featcache.stages.extract_siglip import SiglipCompute, build_siglip_job

        job = build_siglip_job(params, encoder.spec)
        compute = SiglipCompute(encoder, cpu, precision=params.precision)
        entries = {e.item: e for e in job.split.entries}
        return job, compute, lambda item: read_ids_and_image(job.split, entries[item].image)
    if stage == "sam2":
        from featcache.stages.extract_sam2 import Sam2Compute, build_sam2_job

        job = build_sam2_job(params, enc.Preprocessor(encoder.spec))
        compute = Sam2Compute(encoder, cpu, "fp32")
        return job, compute, lambda item: load_image(job.folder / item).rgb
    from featcache.stages._grids import GridCompute, build_grid_job
    from featcache.datasets.images import list_images

    folder = Path(params.root) / params.splits[0].images
    job = build_grid_job(folder, list_images(folder), "image_id", enc.Preprocessor(encoder.spec),
                         params.background, None)
    compute = GridCompute(encoder, cpu, 0, "tokens", stage == "clip_grid", params.precision)

    def decode(item: str) -> np.ndarray:
        image = load_image(folder / item)
        return composite_alpha(image.rgb, image.alpha, params.background)

    return job, compute, decode
