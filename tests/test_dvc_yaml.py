"""dvc.yaml is the DAG of DESIGN.md: each stage's deps are its script plus exactly the src modules
it imports, its params are its own section (plus shared keys, never the runtime knobs), every
path comes from params."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import yaml

from featcache.config import LINKS

ROOT = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
SHARED = {"model", "weights", "seed", "data", "weights_dir", "checkpoints"}
RUNTIME_KNOBS = {"runtime", "device", "batch_size", "num_workers"}

spec = importlib.util.spec_from_file_location("stage_deps", ROOT / "scripts" / "stage_deps.py")
stage_deps = importlib.util.module_from_spec(spec)
spec.loader.exec_module(stage_deps)


def test_every_stage_script_is_in_the_dag_and_vice_versa():
    scripts = {p.stem for p in (ROOT / "stages").glob("*.py")}
    assert scripts == set(DVC)


@pytest.mark.parametrize("stage", sorted(DVC))
def test_stage_shape(stage):
    spec = DVC[stage]
    assert spec["cmd"] == f"python stages/{stage}.py"
    assert stage in spec["params"] and stage in PARAMS  # stage, script and section share a name
    others = set(spec["params"]) - {stage} - SHARED
    if stage == "verify":  # it compares every output with the section of the stage that made it
        assert others == set(DVC) - {"download", "verify"}, others
    else:  # another section's keys only where the stage reads them (config.LINKS)
        assert others == set(LINKS.get(stage, {}).values()), others
    # where and how fast it runs does not change what it computes
    assert not RUNTIME_KNOBS & {p.split(".")[0] for p in spec["params"]}, spec["params"]
    assert not any(p.split(".")[-1] in RUNTIME_KNOBS for p in spec["params"]), spec["params"]
    for path in spec["outs"] + spec.get("deps", []) + spec.get("metrics", []):
        if not path.startswith(("stages/", "src/")):
            assert path.startswith("${") and path.endswith("}"), f"{path}: write it in params.yaml"
    lines = (ROOT / "stages" / f"{stage}.py").read_text().splitlines()
    assert len(lines) < 60, "stage scripts are thin"


@pytest.mark.parametrize("stage", sorted(DVC))
def test_code_deps_are_exactly_the_imported_modules(stage):
    declared = [d for d in DVC[stage]["deps"] if d.startswith(("stages/", "src/"))]
    assert declared == stage_deps.stage_deps(stage), \
        "run `python scripts/stage_deps.py --write` to update dvc.yaml"


def test_no_stage_section_holds_a_runtime_knob():
    assert "runtime" in PARAMS and "device" not in PARAMS
    for stage in DVC:
        assert not RUNTIME_KNOBS & set(PARAMS[stage]), f"{stage}: move it to runtime.{stage}"
    assert set(PARAMS["runtime"]) - RUNTIME_KNOBS <= set(DVC)  # overrides are named by stage


def test_featcache_package_is_never_a_whole_dependency():
    for stage, spec in DVC.items():
        assert "src/featcache" not in spec["deps"] and "src" not in spec["deps"], stage


@pytest.mark.parametrize("stage", sorted(DVC))
def test_shared_keys_read_are_declared(stage):
    source = (ROOT / "stages" / f"{stage}.py").read_text()
    modules = [ROOT / d for d in DVC[stage]["deps"] if d.endswith(".py")]
    text = source + "".join(m.read_text() for m in modules if m.is_file())
    for key in sorted(SHARED):
        if re.search(rf"\bshared\.{key}\b", text):
            assert key in DVC[stage]["params"], f"{stage} reads shared.{key}"


@pytest.mark.parametrize("stage", sorted(DVC))
def test_each_model_stage_depends_on_its_own_encoder_family_only(stage):
    families = {"src/featcache/encoders/openclip.py", "src/featcache/encoders/dinov2.py",
                "src/featcache/encoders/sam2.py"}
    own = {"extract_clip_grid": {"src/featcache/encoders/openclip.py"},
           "extract_siglip": {"src/featcache/encoders/openclip.py"},
           "extract_dinov2": {"src/featcache/encoders/dinov2.py"},
           "extract_sam2": {"src/featcache/encoders/sam2.py"}}
    deps = set(DVC[stage]["deps"])
    if stage == "verify":  # spot checks rebuild any family from an output's provenance
        assert "src/featcache/encoders" in deps
    else:
        assert deps & families == own.get(stage, set()), deps & families
        assert "src/featcache/encoders" not in deps
