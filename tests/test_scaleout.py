"""Bits independent of batching, on the real default SigLIP architecture (random weights) and
the embedded sample: one process (torch's default threads), two torchrun processes and an
incremental run (two images added later) write byte-identical outputs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from featcache.engine.shards import read_index
from featcache.sample import generate_sample

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "stages" / "extract_siglip.py"
SIGLIP = "ViT-B-16-SigLIP"   # the real default architecture, random weights


def tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes()
            for p in sorted(path.rglob("*")) if p.is_file()}


def stage_dir(root: Path, raw: Path, shard_mb: float) -> Path:
    root.mkdir()
    # the params this test needs, written out (not the committed experiment's): the real
    # default SigLIP architecture, every other method param at its default
    section = {"coco": str(raw / "coco"), "split": "val2017", "model": SIGLIP, "out": "out",
               "metrics": "metrics/extract_siglip.json", "shard_mb": shard_mb,
               "max_failures": 0.2}   # the sample holds one image with a bad segment
    doc = {"weights": "random", "seed": 0,
           "runtime": {"device": "cpu", "num_workers": 1, "batch_size": 8},
           "extract_siglip": section}
    (root / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return root


def run(cwd: Path, nproc: int = 1) -> dict:
    """Run the stage script (torchrun with ``nproc`` > 1; it sets one thread per process, the
    single process keeps torch's default threads); returns the stage metrics."""
    cmd = [sys.executable, str(SCRIPT)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", str(SCRIPT)]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((cwd / "metrics" / "extract_siglip.json").read_text())


def without_images(raw: Path, dest: Path, n: int) -> list[int]:
    """A copy of the sample's COCO split with the annotations of ``n`` images removed."""
    shutil.copytree(raw / "coco", dest / "coco")
    path = dest / "coco" / "annotations" / "panoptic_val2017.json"
    doc = json.loads(path.read_text())
    dropped = [a["image_id"] for a in doc["annotations"][1:1 + n]]
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] not in dropped]
    path.write_text(json.dumps(doc))
    return dropped


@pytest.mark.slow
def test_real_siglip_one_process_two_processes_and_an_incremental_run_are_byte_identical(
        tmp_path):
    raw = tmp_path / "raw"
    generate_sample(raw, seed=0)
    shard_mb = 0.05   # ~4 images a shard (12.4 KiB an image): the 9 images make several
    one, two = stage_dir(tmp_path / "one", raw, shard_mb), stage_dir(tmp_path / "two", raw,
                                                                      shard_mb)
    assert run(one)["computed"] == 9
    run(two, nproc=2)
    a, b = tree(one / "out"), tree(two / "out")
    assert len([k for k in a if k.startswith("shards/")]) >= 2
    assert a == b
    # incremental: first without two images, then with them: only those two are computed,
    # alone in their batches, and every byte equals the from-scratch run
    fewer = tmp_path / "fewer"
    without_images(raw, fewer, 2)
    third = stage_dir(tmp_path / "third", fewer, shard_mb)
    assert run(third)["computed"] == 7
    json_name = Path("annotations") / "panoptic_val2017.json"   # the two come back
    shutil.copy(raw / "coco" / json_name, fewer / "coco" / json_name)
    metrics = run(third)
    assert (metrics["computed"], metrics["reused"]) == (2, 7)
    # the provenance (index.h5, embeddings.h5) names the other COCO folder; all else is equal
    same = {k: v for k, v in a.items() if k not in ("index.h5", "embeddings.h5")}
    assert {k: v for k, v in tree(third / "out").items() if k in same} == same
    assert index_rows(third / "out") == index_rows(one / "out")


def index_rows(out: Path) -> tuple:
    keys, shard, row, names, _ = read_index(out)
    return keys, shard.tolist(), row.tolist(), names
