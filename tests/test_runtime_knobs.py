"""Runtime knobs (``runtime.device``, ``batch_size``, ``num_workers``) are not cache keys: the
loader fills them in from the ``runtime`` section, and with real DVC changing one invalidates no
stage while changing a method knob invalidates exactly its stage and what depends on it."""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

import featcache.config as config
from featcache.config import ParamError, load_runtime, load_stage_params, read_params_file
from featcache.engine.types import EngineParams
from test_pipeline import sh

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True, kw_only=True)
class Knobs(EngineParams):
    out: str = "x"


@dataclass(frozen=True, kw_only=True)
class NoKnobs:
    out: str = "x"


def load(tmp_path: Path, doc: dict[str, Any], section: str = "extract_siglip", cls: type = Knobs):
    doc = {"extract_siglip": {"out": "x"}, "extract_sam2": {"out": "y"}, **doc}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_stage_params(section, cls, path)


# --- the loader -------------------------------------------------------------------------------

def test_defaults_without_a_runtime_section(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "available_cpus", lambda: 5)
    shared, params = load(tmp_path, {})
    assert shared.device == "auto" and params.batch_size == 16 and params.num_workers == 4


@pytest.mark.parametrize("cpus, workers", [(1, 0), (2, 1), (16, 15)])
def test_num_workers_auto_is_usable_cores_minus_one(tmp_path, monkeypatch, cpus, workers):
    monkeypatch.setattr(config, "available_cpus", lambda: cpus)
    _, params = load(tmp_path, {"runtime": {"num_workers": "auto"}})
    assert params.num_workers == workers and isinstance(params.num_workers, int)


def test_available_cpus_is_the_affinity_mask():
    if hasattr(os, "sched_getaffinity"):
        assert config.available_cpus() == len(os.sched_getaffinity(0))
    assert config.available_cpus() >= 1


def test_stage_override_wins_over_the_defaults(tmp_path):
    runtime = {"device": "cpu", "batch_size": 8, "num_workers": 3,
               "extract_siglip": {"batch_size": 32, "device": "cuda:1"},
               "extract_sam2": {"num_workers": 0}}
    shared, siglip = load(tmp_path, {"runtime": runtime, "model": "ViT-L-14"})
    assert (shared.device, siglip.batch_size, siglip.num_workers) == ("cuda:1", 32, 3)
    assert shared.model == "ViT-L-14"
    shared, sam2 = load(tmp_path, {"runtime": runtime}, section="extract_sam2")
    assert (shared.device, sam2.batch_size, sam2.num_workers) == ("cpu", 8, 0)


def test_stage_without_the_fields_gets_only_the_device(tmp_path):
    shared, params = load(tmp_path, {"runtime": {"device": "cpu", "batch_size": 4}},
                          cls=NoKnobs)
    assert shared.device == "cpu" and params == NoKnobs(out="x")


def test_repository_params_yaml_runtime_per_stage(monkeypatch):
    """Whatever is committed: each stage gets its ``runtime.<stage>`` knobs, else the
    ``runtime`` defaults, with ``num_workers: auto`` resolved to the usable cores - 1."""
    monkeypatch.setattr(config, "available_cpus", lambda: 9)
    data = read_params_file(ROOT / "params.yaml")
    assert "runtime" in data and "device" not in data
    raw = data["runtime"]
    defaults = {k: raw.get(k, getattr(config.RuntimeParams(), k)) for k in config.RUNTIME_KEYS}
    for stage in config.STAGE_SECTIONS:
        want = {**defaults, **(raw.get(stage) or {})}
        runtime = load_runtime(data, stage)
        assert (runtime.device, runtime.batch_size) == (want["device"], want["batch_size"])
        workers = 8 if want["num_workers"] == "auto" else want["num_workers"]
        assert runtime.resolved_num_workers() == workers, stage


@pytest.mark.parametrize("doc, key, hint", [
    ({"runtime": {"bacth_size": 4}}, "runtime.bacth_size", "per-stage override"),
    ({"runtime": {"extract_siglip": {"colour": 1}}}, "runtime.extract_siglip.colour",
     "allowed keys: batch_size, device, num_workers"),
    ({"runtime": {"extract_clip": {"batch_size": 4}}}, "runtime.extract_clip",
     "extract_clip_grid"),
    ({"runtime": {"batch_size": 0}}, "runtime.batch_size", ">= 1"),
    ({"runtime": {"extract_siglip": {"batch_size": 0}}}, "runtime.extract_siglip.batch_size",
     ">= 1"),
    ({"runtime": {"num_workers": -1}}, "runtime.num_workers", "use auto"),
    ({"runtime": {"extract_siglip": {"num_workers": "lots"}}},
     "runtime.extract_siglip.num_workers", "an integer or 'auto'"),
    ({"runtime": {"num_workers": 1.5}}, "runtime.num_workers", "an integer or 'auto'"),
    ({"runtime": {"device": "tpu"}}, "runtime.device", "cuda:<index>"),
    ({"runtime": {"extract_siglip": {"device": "tpu"}}}, "runtime.extract_siglip.device",
     "cuda:<index>"),
    ({"runtime": {"extract_sam2": {"batch_size": 0}}}, "runtime.extract_sam2.batch_size", ">= 1"),
    ({"runtime": [1]}, "runtime", "mapping"),
    ({"runtime": {"extract_siglip": 32}}, "runtime.extract_siglip", "mapping of runtime knobs"),
    ({"device": "cpu"}, "device", "move it to runtime.device"),
    ({"num_workers": 2}, "num_workers", "move it to runtime.num_workers"),
    ({"extract_siglip": {"out": "x", "batch_size": 32}}, "extract_siglip.batch_size",
     "move it to runtime.extract_siglip.batch_size"),
    ({"extract_siglip": {"out": "x", "num_workers": 2}}, "extract_siglip.num_workers",
     "move it to runtime.extract_siglip.num_workers"),
    ({"extract_siglip": {"out": "x", "device": "cpu"}}, "extract_siglip.device",
     "move it to runtime.extract_siglip.device"),
])
def test_bad_runtime_values_name_the_full_key_and_the_fix(tmp_path, doc, key, hint):
    """Loading extract_siglip: a bad override of another stage (extract_sam2) fails it too."""
    with pytest.raises(ParamError) as e:
        load(tmp_path, doc)
    assert str(e.value).startswith(key + ":"), str(e.value)
    assert hint in str(e.value), str(e.value)


def test_override_of_a_knob_the_stage_lacks_is_refused(tmp_path):
    with pytest.raises(ParamError, match=r"^runtime\.extract_siglip\.batch_size: .*remove it"):
        load(tmp_path, {"runtime": {"extract_siglip": {"batch_size": 2}}}, cls=NoKnobs)


# --- real DVC: which stages a change invalidates ----------------------------------------------

def placeholder_outputs(repo: Path) -> None:
    """An empty stand-in for every output and metric in dvc.yaml (the inputs of the stages
    downstream: ``download.out`` holds the folders the extraction stages read)."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    raw = repo / params["data"]
    for sub in ("coco", "sa1b", "scannet", "images"):
        (raw / sub).mkdir(parents=True, exist_ok=True)
        (raw / sub / "placeholder").write_text("x")
    for stage in yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]:
        section = params[stage]
        for key in ("out", "pictures"):
            if key in section and stage != "download":
                (repo / section[key]).mkdir(parents=True, exist_ok=True)
                (repo / section[key] / "placeholder").write_text("x")
        for key in ("metrics", "report", "outputs"):
            if key in section:
                (repo / section[key]).parent.mkdir(parents=True, exist_ok=True)
                (repo / section[key]).write_text("{}" if key != "outputs" else "[]")
    (repo / params["weights_dir"]).mkdir(parents=True, exist_ok=True)  # download makes it


def build_committed(tmp_path_factory) -> Path:
    """dvc.yaml, params.yaml and the code in a git+DVC repo, every stage recorded in dvc.lock
    with placeholder outputs (`dvc commit`), so `dvc status` is clean and nothing heavy runs
    (the session fixture ``committed`` of conftest.py)."""
    repo = tmp_path_factory.mktemp("knobs") / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy2(ROOT / name, repo / name)
    for name in ("stages", "src", "checkpoints"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    sh(["git", "init", "-q"], repo)
    sh(["dvc", "init", "-q"], repo)
    sh(["dvc", "config", "core.analytics", "false"], repo)
    sh(["git", "add", "-A"], repo)
    sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], repo)
    placeholder_outputs(repo)
    sh(["dvc", "commit", "-f", "-q"], repo)
    assert status(repo) == {}
    return repo


def status(repo: Path) -> dict[str, Any]:
    return json.loads(sh(["dvc", "status", "--json"], repo).stdout or "{}")


def status_after(repo: Path, key: str, values: tuple[Any, ...]) -> dict[str, Any]:
    """`dvc status --json` with params.yaml's dotted ``key`` set to the first of ``values``
    that differs from the committed one (then restored); the edited file must still load for
    every stage."""
    path = repo / "params.yaml"
    text = path.read_text()
    doc = yaml.safe_load(text)
    *parents, last = key.split(".")
    node = doc
    for name in parents:
        node = node.setdefault(name, {})
    node[last] = next(v for v in values if v != node.get(last))
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    try:
        for stage in config.STAGE_SECTIONS:
            load_runtime(read_params_file(path), stage)
        return status(repo)
    finally:
        path.write_text(text)


def downstream(repo: Path, stages: set[str]) -> set[str]:
    """``stages`` and every stage that depends on one of their outputs (from `dvc dag`)."""
    dot = sh(["dvc", "dag", "--dot"], repo).stdout
    edges = re.findall(r'"([^"]+)" -> "([^"]+)"', dot)
    assert edges, dot
    found = set(stages)
    while True:
        more = {b for a, b in edges if a in found} - found
        if not more:
            return found
        found |= more


# two values per key: the first that differs from the committed params.yaml is used
@pytest.mark.parametrize("key, values", [
    ("runtime.device", ("cpu", "cuda")),
    ("runtime.num_workers", (1, 2)),
    ("runtime.batch_size", (3, 5)),
    ("runtime.extract_siglip.batch_size", (64, 48)),
    ("runtime.extract_dinov2.num_workers", (0, 1)),  # a new override
])
def test_runtime_knobs_invalidate_nothing(committed, key, values):
    assert status_after(committed, key, values) == {}


# verify depends on every stage's section: it compares each output's provenance with it
@pytest.mark.parametrize("key, values, changed, rebuilt", [
    ("extract_clip_grid.grid", (7, 0), {"extract_clip_grid", "verify"},
     {"extract_clip_grid", "sample_point_feats", "verify"}),
    ("extract_siglip.pad_ratio", (0.2, 0.3), {"extract_siglip", "verify"},
     {"extract_siglip", "verify"}),
    ("edge_maps_methodB.kernel_size", (5, 7), {"edge_maps_methodB", "verify"},
     {"edge_maps_methodB", "verify"}),
    ("model", ("ViT-L-14", "ViT-B-32"), {"extract_clip_grid", "verify"},  # verify's spot check
     {"extract_clip_grid", "sample_point_feats", "verify"}),             # runs the model
])
def test_method_knobs_invalidate_their_stage_and_dependents(committed, key, values, changed,
                                                             rebuilt):
    report = status_after(committed, key, values)
    assert set(report) == changed, report
    top = key.split(".")[0]
    for stage in changed:  # each for its own params, not for a changed input
        assert report[stage] == [{"changed deps": {"params.yaml": {top: "modified"}}}], report
    # `dvc status` only compares a stage's own deps; what consumes their outputs re-runs too
    assert downstream(committed, changed) == rebuilt
