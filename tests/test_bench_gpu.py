"""The GPU benchmark script's logic, run on the CPU (``--device cpu --tiny``), and its clean
skip without CUDA. Numbers are not asserted (no timed assertions): shapes, counts, and that
the CPU-vs-CPU feature agreement is exact (same seeded weights on both sides)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
FIGURE_KEYS = {"value", "unit", "target", "better", "baseline"}


def bench_gpu(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "bench_gpu.py", *args], cwd=BENCH,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_without_cuda_it_skips_cleanly_and_writes_nothing(tmp_path):
    out = tmp_path / "gpu.json"
    proc = bench_gpu("--json", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "skipped" in proc.stdout
    assert not out.exists()


@pytest.mark.slow
def test_cpu_smoke_run_measures_every_family_stage_and_path(tmp_path):
    out = tmp_path / "gpu.json"
    proc = bench_gpu("--device", "cpu", "--tiny", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert out.with_suffix(".md").read_text().startswith("Device: cpu")
    assert set(res["features"]) == {"open_clip", "siglip", "dinov2", "sam2"}
    for family, f in res["features"].items():
        assert FIGURE_KEYS <= set(f["min_cosine"]) and FIGURE_KEYS <= set(f["max_abs_diff"])
        # the same seeded random weights on both sides of a CPU-vs-CPU run: the same bits
        assert f["max_abs_diff"]["value"] == 0.0, family
        assert f["min_cosine"]["value"] >= 0.999, family
    assert set(res["e2e"]) == {"clip_grid", "siglip", "sam2"}
    for stage, e in res["e2e"].items():
        assert e["forward_items_s"]["value"] > 0
        paths = [p for p in ("exact", "fast", "gpu_decode") if p in e]
        assert paths[0] == "exact", stage
        for path in paths:
            r = e[path]
            assert FIGURE_KEYS <= set(r["ratio"]) and r["ratio"]["better"] == "higher"
            assert r["ratio"]["target"] == (0.9 if path == "gpu_decode" else None)
            assert r["stage_items_s"]["value"] > 0 and r["wall_s"] > 0
            want = e["inputs"]["segments"] if stage == "siglip" else e["inputs"]["images"]
            assert r["items"] == want, (stage, path)
