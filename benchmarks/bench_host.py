"""Host cost per extraction stage: the real stage with a null encoder, next to the naive path.

    python benchmarks/bench_host.py --stage clip_grid --items 300 [--preprocess fast] [--json f]

Runs one stage (``clip_grid``, ``dinov2``, ``siglip``, ``sam2``) on generated inputs of realistic
size (:mod:`datagen`) with an encoder that returns correctly shaped zeros instantly, so every
CPU second spent is the host's: decoding, preprocessing, worker IPC, batching, casting, writing.
Reported per item (image, or crop for SigLIP):

- ``cpu_ms_all``: user+system CPU of this process and its (joined) DataLoader workers;
- ``cpu_ms_main``: the main process alone (it feeds the device: ``1000 / cpu_ms_main`` items/s
  is the most one main process can feed, however many workers it has);
- the seed-style naive baseline in the same process (one item at a time: PIL decode, the
  upstream preprocess, one ``np.save`` per item), split into decode+preprocess and save;
- a phase breakdown measured in this process on a few items (decode, preprocess, transfer =
  batch + move + device-side work, write = cast + shard write);
- peak RSS of the main process and of the largest worker.

One stage per process, so rusage and peak RSS belong to that run alone.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import datagen

SAM2_CONFIG = "sam2.1_hiera_b+"
BATCH = {"clip_grid": 16, "dinov2": 16, "siglip": 32, "sam2": 2}   # params.yaml's runtime


# ---------------------------------------------------------------- the null encoder
def null_encoder(spec: Any, device: Any = "cpu") -> Any:
    """An :class:`Encoder` of ``spec``'s output shapes that computes nothing."""
    from featcache.encoders.base import Encoder, EncoderOutput

    width, embed = _dims(spec)

    class NullEncoder(Encoder):
        def __init__(self) -> None:
            super().__init__(spec, "null")
            self.anchor = torch.nn.Parameter(torch.zeros(1, device=device), requires_grad=False)

        def forward(self, x: torch.Tensor) -> EncoderOutput:
            b = x.shape[0]
            if spec.family == "sam2":
                s = spec.input_size[0]
                return EncoderOutput(None, None, {
                    "P4_S16": torch.zeros(b, 256, s // 16, s // 16, device=x.device),
                    "P5_S32": torch.zeros(b, 256, s // 32, s // 32, device=x.device)})
            g_h, g_w = spec.grid_size
            grid = torch.zeros(b, width, g_h, g_w, device=x.device)
            pooled = torch.ones(b, embed, device=x.device) if embed else None
            return EncoderOutput(grid, pooled)

    return NullEncoder()


def _dims(spec: Any) -> tuple[int, int]:
    if spec.family == "open_clip":
        import open_clip

        cfg = open_clip.get_model_config(spec.name)
        return int(cfg["vision_cfg"].get("width", 768)), int(cfg["embed_dim"])
    if spec.family == "dinov2":
        return {"facebook/dinov2-small": 384, "facebook/dinov2-base": 768,
                "facebook/dinov2-large": 1024}.get(spec.name, 384), 0
    return 0, 0


def patch_null_encoder() -> None:
    import featcache.encoders as enc
    from featcache.encoders import dinov2, openclip, sam2

    enc.load_encoder = null_encoder   # and each family's loader, for stages that call it
    openclip.load_openclip = dinov2.load_dinov2 = sam2.load_sam2 = null_encoder


# ---------------------------------------------------------------- inputs and stage runs
def make_inputs(stage: str, root: Path, n: int) -> dict[str, Any]:
    """Generated inputs for ``stage``; ``n`` images (SigLIP: images, each ~10 segments)."""
    if stage in ("clip_grid", "dinov2"):
        datagen.write_jpegs(root / "val2017", n, datagen.COCO_SIZE)
        return {"images": n, "size": "640x480 JPEG q90"}
    if stage == "siglip":
        segs = datagen.write_coco_like(root / "coco", n)
        return {"images": n, "segments": segs, "size": "640x480 JPEG q90 + panoptic PNG"}
    datagen.write_jpegs(root / "sa1b", n, datagen.SA1B_SIZE, prefix="sa_")
    return {"images": n, "size": "2250x1500 JPEG q90"}


def stage_params(stage: str, root: Path, workers: int, batch: int, extra: dict) -> Any:
    from featcache.stages._grids import SplitSpec

    common = dict(batch_size=batch, num_workers=workers, **extra)
    splits = [SplitSpec(name="bench", images="val2017")]
    if stage == "clip_grid":
        from featcache.stages.extract_clip_grid import ClipGridParams

        return ClipGridParams(root=str(root), out=str(root / "out"), splits=splits, **common)
    if stage == "dinov2":
        from featcache.stages.extract_dinov2 import Dinov2Params

        return Dinov2Params(root=str(root), out=str(root / "out"), splits=splits, **common)
    if stage == "siglip":
        from featcache.stages.extract_siglip import SiglipParams

        return SiglipParams(coco=str(root / "coco"), split="val2017", out=str(root / "out"),
                            **common)
    from featcache.stages.extract_sam2 import Sam2Params

    return Sam2Params(images=str(root / "sa1b"), out=str(root / "out"), config=SAM2_CONFIG,
                      **common)


def run_stage(stage: str, params: Any, model: str = "ViT-B-16", device: str = "cpu") -> Any:
    from featcache.config import SharedParams

    shared = SharedParams(model=model, device=device)
    if stage == "clip_grid":
        from featcache.stages.extract_clip_grid import extract_clip_grid

        return extract_clip_grid(shared, params)[0]
    if stage == "dinov2":
        from featcache.stages.extract_dinov2 import extract_dinov2

        return extract_dinov2(shared, params)[0]
    if stage == "siglip":
        from featcache.stages.extract_siglip import extract_siglip

        return extract_siglip(shared, params)
    from featcache.stages.extract_sam2 import extract_sam2

    return extract_sam2(shared, params)


def warm_up(stage: str, root: Path, params: Any, model: str = "ViT-B-16", device: str = "cpu",
            name: str = "warm") -> None:
    """One run on a copy of 4 items first (in ``root / name``): imports and first-call costs
    are paid once per stage, not per item, so they are not the host cost being measured."""
    import dataclasses
    import shutil

    src = {"siglip": None, "sam2": root / "sa1b"}.get(stage, root / "val2017")
    if src is None:
        datagen.write_coco_like(root / name / "coco", 4)
        warm = dataclasses.replace(params, coco=str(root / name / "coco"),
                                   out=str(root / name / "out"))
    else:
        dst = root / name / src.name
        dst.mkdir(parents=True)
        for p in sorted(src.glob("*.jpg"))[:4]:
            shutil.copy(p, dst / p.name)
        if stage == "sam2":
            warm = dataclasses.replace(params, images=str(dst), out=str(root / name / "out"))
        else:
            warm = dataclasses.replace(params, root=str(root / name),
                                       out=str(root / name / "out"))
    run_stage(stage, warm, model=model, device=device)


def cpu_s(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def measure(fn: Callable[[], Any]) -> tuple[Any, float, float, float]:
    """``(result, main CPU s, children CPU s, wall s)`` of ``fn()``."""
    m0, c0, t0 = cpu_s(resource.RUSAGE_SELF), cpu_s(resource.RUSAGE_CHILDREN), time.perf_counter()
    out = fn()
    return (out, cpu_s(resource.RUSAGE_SELF) - m0, cpu_s(resource.RUSAGE_CHILDREN) - c0,
            time.perf_counter() - t0)


def count_compute_cpu() -> list[float]:
    """Sum the main thread's CPU seconds inside the runner's ``_compute_into`` (the model
    side) into the returned one-element list; works with older engine versions too."""
    from featcache.engine import runner

    total = [0.0]
    real = runner._compute_into

    def timed(*args: Any, **kwargs: Any) -> Any:
        t = time.thread_time()
        try:
            return real(*args, **kwargs)
        finally:
            total[0] += time.thread_time() - t

    runner._compute_into = timed
    return total


# ---------------------------------------------------------------- naive baselines
def naive(stage: str, root: Path, spec: Any, limit: int) -> dict[str, float]:
    """The seeds' plain path, one item at a time in this process: ``(decode+preprocess ms,
    save ms)`` per item, process CPU time."""
    from PIL import Image

    out = root / "naive"
    out.mkdir(exist_ok=True)
    torch.set_num_threads(1)   # the fair baseline: torch's default threads make it slower
    pre = _upstream_transform(spec)
    items, t_pre, t_save = 0, 0.0, 0.0
    if stage == "siglip":
        from featcache.datasets.coco_panoptic import read_ids_and_image, read_panoptic_split
        from featcache.stages.extract_siglip import crop_box, mask_bbox, segment_crop, CropSettings

        split = read_panoptic_split(str(root / "coco"), "val2017")
        crop = CropSettings(0.3, 0.1, (124, 116, 104), 32)
        for entry in split.entries[:limit]:
            t = time.process_time()
            ids, rgb = read_ids_and_image(split, entry.image)
            xs = []
            for seg in entry.image.segments:
                mask = ids == seg.id
                box = crop_box(mask_bbox(mask), *ids.shape, 0.1, 32)
                xs.append(pre(Image.fromarray(segment_crop(rgb, mask, box, crop))))
            t_pre += time.process_time() - t
            t = time.process_time()
            for seg in entry.image.segments:
                np.save(out / f"{entry.image.image_id:012d}_{seg.id}.npy",
                        np.zeros(768, np.float16))
            t_save += time.process_time() - t
            items += len(xs)
    else:
        folder = root / ("sa1b" if stage == "sam2" else "val2017")
        width, _ = _dims(spec)
        g = spec.grid_size[0]
        for path in sorted(folder.glob("*.jpg"))[:limit]:
            t = time.process_time()
            x = pre(Image.open(path).convert("RGB"))
            t_pre += time.process_time() - t
            t = time.process_time()
            if stage == "sam2":
                np.savez(out / f"{path.stem}_features.npz",
                         P4_S16=np.zeros((256, 64, 64), np.float16),
                         P5_S32=np.zeros((256, 32, 32), np.float16))
            else:
                np.save(out / f"{path.stem}.npy", np.zeros((g * g, width), np.float16))
            t_save += time.process_time() - t
            items += 1
            del x
    return {"decode_preprocess_ms": 1000 * t_pre / items, "save_ms": 1000 * t_save / items,
            "items": items}


def _upstream_transform(spec: Any) -> Callable:
    if spec.family == "sam2":
        from sam2.utils.transforms import SAM2Transforms

        t = SAM2Transforms(resolution=spec.input_size[0], mask_threshold=0.0)
        return lambda img: t(np.asarray(img))
    import open_clip

    return open_clip.image_transform(spec.input_size[0], is_train=False, mean=spec.mean,
                                     std=spec.std, interpolation=spec.interpolation,
                                     resize_mode="squash" if spec.resize == "squash"
                                     else "shortest")


# ---------------------------------------------------------------- phases
def phases(stage: str, root: Path, spec: Any, params: Any, limit: int) -> dict[str, float]:
    """ms per item of each host phase, in this process (one thread), on ``limit`` items."""
    from phases import phase_breakdown

    return phase_breakdown(stage, root, params, null_encoder(spec), limit)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", required=True, choices=sorted(BATCH))
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--preprocess", default="exact")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in the main process "
                    "(0 = torch's default)")
    ap.add_argument("--naive-items", type=int, default=40)
    ap.add_argument("--phase-items", type=int, default=16)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    main_threads = torch.get_num_threads()
    patch_null_encoder()
    device_cpu = count_compute_cpu()
    import logging

    logging.basicConfig(level=logging.WARNING)
    extra = {} if args.preprocess == "exact" else {"preprocess": args.preprocess}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.chdir(root)   # the engine's scratch area lives under the working directory
        inputs = make_inputs(args.stage, root, args.items)
        params = stage_params(args.stage, root, args.workers, BATCH[args.stage], extra)
        warm_up(args.stage, root, params)
        device_cpu[0] = 0.0
        result, main_s, child_s, wall = measure(lambda: run_stage(args.stage, params))
        items = result.records if args.stage == "siglip" else result.items
        spec = _spec(args.stage)
        base = naive(args.stage, root, spec, args.naive_items)
        phase = phases(args.stage, root, spec, params, args.phase_items)
    peak_main = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak_child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    out = {"stage": args.stage, "preprocess": args.preprocess, "inputs": inputs,
           "items": items, "failed": result.failed, "workers": args.workers,
           "batch_size": BATCH[args.stage], "main_threads": main_threads,
           "cpu_ms_all": 1000 * (main_s + child_s) / items, "cpu_ms_main": 1000 * main_s / items,
           # the main thread's CPU inside compute: on this CPU "device" that is the device-side
           # work (stack, normalise, the null forward, the storage cast) a GPU would do
           "cpu_ms_main_device": 1000 * device_cpu[0] / items,
           "wall_s": wall, "naive": base, "phases_ms": phase,
           "peak_rss_main_mb": peak_main, "peak_rss_worker_mb": peak_child}
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


def _spec(stage: str) -> Any:
    from featcache.encoders import resolve_spec

    if stage == "clip_grid":
        return resolve_spec("open_clip", "ViT-B-16", weights="random")
    if stage == "siglip":
        return resolve_spec("open_clip", "ViT-B-16-SigLIP", weights="random")
    if stage == "dinov2":
        return resolve_spec("dinov2", "facebook/dinov2-small", weights="random", image_size=224)
    return resolve_spec("sam2", SAM2_CONFIG, weights="random")


if __name__ == "__main__":
    main()
