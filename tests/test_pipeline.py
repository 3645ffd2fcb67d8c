"""The whole pipeline with real DVC, as `make demo` runs it, in a temporary git repository:
a second `dvc repro` does nothing, `dvc status` is clean, a changed knob re-runs only its stage,
and a teammate's fresh clone gets byte-identical outputs from the remote."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def sh(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    if check and proc.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def copy_worktree(dest: Path) -> Path:
    """The current tree (tracked and untracked-but-not-ignored files) as a fresh git repo."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, files):
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"]):
        sh(cmd, dest)
    return dest


def digest(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {p.relative_to(path.parent).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files}


def ran(proc: subprocess.CompletedProcess) -> list[str]:
    return [line.split("'")[1] for line in proc.stdout.splitlines()
            if line.startswith("Running stage '")]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("pipeline")
    repo = copy_worktree(base / "repo")
    first = sh(["dvc", "repro"], repo)
    assert set(ran(first)) == set(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"])
    return repo


def test_repro_twice_does_nothing_and_status_is_clean(demo):
    second = sh(["dvc", "repro"], demo)
    assert ran(second) == [], second.stdout
    status = sh(["dvc", "status"], demo)
    assert "Data and pipelines are up to date" in status.stdout, status.stdout
    features = demo / "data" / "features"
    assert {p.name for p in features.iterdir()} >= {
        "clip_grid", "dinov2", "siglip", "sam2", "edges", "uv_index", "point_feats"}
    assert (demo / "metrics" / "extract_clip_grid.json").is_file()
    assert json.loads((demo / "reports" / "verify.json").read_text())["passed"]


def test_metrics_are_compact_and_deterministic_and_plots_render(demo):
    """`dvc metrics show` holds results only (no times, memory or device: those are in
    .featcache/timing/), verify is one pass/fail and a failed-check count, and `dvc plots
    show` renders verify's pictures and the per-output records plots."""
    metrics = json.loads(sh(["dvc", "metrics", "show", "--json"], demo).stdout)
    files = next(iter(metrics.values()))["data"]
    columns = {k for doc in files.values() for k in doc["data"]}
    assert not columns & {"wall_s", "compute_s", "items_per_s", "peak_rss_mb", "device"}
    splits = yaml.safe_load((demo / "params.yaml").read_text())["extract_clip_grid"]["splits"]
    names = {s["name"] for s in splits}
    for doc in files.values():  # per-split figures are summed: one column, not one per split
        assert not any(isinstance(v, dict) and set(v) & names for v in doc["data"].values()), doc
    assert files["metrics/verify.json"]["data"] == {
        "passed": True, "failed_checks": 0,
        "checks": len(json.loads((demo / "reports" / "verify.json").read_text())["checks"])}
    assert len(columns) <= 30, sorted(columns)
    timing = json.loads((demo / ".featcache" / "timing" / "extract_clip_grid.json").read_text())
    assert timing["wall_s"] > 0
    plots = json.loads(sh(["dvc", "plots", "show", "--json"], demo).stdout)["data"]
    pictures = {Path(k).name for k, v in plots.items() if v[0]["type"] == "image"}
    assert pictures == {"clip_grid_pca.png", "dinov2_pca.png", "edges.png",
                        "uv_projection.png", "siglip_segments.png"}
    table = plots["records written per output"][0]["content"]["data"]["values"]
    assert {row["output"] for row in table} >= {"clip_grid/coco_val2017", "siglip", "sam2"}


def test_changing_edge_kernel_reruns_only_the_edge_stage_and_verify(demo):
    sam2_before = digest(demo / "data" / "features" / "sam2")
    edges_before = digest(demo / "data" / "features" / "edges")
    params = demo / "params.yaml"
    text = params.read_text()
    params.write_text(text.replace("  kernel_size: 3", "  kernel_size: 5", 1))
    try:
        proc = sh(["dvc", "repro"], demo)
        assert ran(proc) == ["edge_maps_methodB", "verify"], proc.stdout  # verify reads all
        assert digest(demo / "data" / "features" / "sam2") == sam2_before
        assert digest(demo / "data" / "features" / "edges") != edges_before
    finally:
        params.write_text(text)
    back = sh(["dvc", "repro"], demo)  # back to 3: restored from the run-cache, not recomputed
    assert ran(back) == [], back.stdout
    assert digest(demo / "data" / "features" / "edges") == edges_before


def test_push_then_fresh_clone_pulls_identical_files(demo, tmp_path):
    sh(["git", "add", "dvc.lock"], demo)
    sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "run"], demo)
    sh(["dvc", "push"], demo)
    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(demo), str(clone)], tmp_path)
    # the committed default remote is a folder beside the repository: point the clone at the
    # one the demo pushed to (a teammate would share one remote)
    remote = sh(["dvc", "remote", "list"], demo).stdout.split()[1]
    sh(["dvc", "remote", "modify", "--local", "local", "url", remote], clone)
    pulled = sh(["dvc", "repro", "--pull"], clone)
    assert ran(pulled) == [], pulled.stdout
    for name in ("clip_grid", "siglip", "sam2", "edges", "uv_index", "point_feats"):
        rel = Path("data") / "features" / name
        assert digest(clone / rel) == digest(demo / rel), name


def readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_every_readme_python_snippet_runs_against_the_demo_outputs(demo):
    blocks = readme_python_blocks()
    assert len(blocks) >= 4
    for code in blocks:
        proc = sh([sys.executable, "-c", code], demo, check=False)
        assert proc.returncode == 0, f"{code}\n{proc.stderr[-2000:]}"
