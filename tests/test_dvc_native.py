"""DVC-native use, checked with real `dvc status` in a temporary repository whose stages are
recorded with placeholder outputs (nothing heavy runs): every path is written once (verify and
sample_point_feats follow a stage's `out`), one `data` key moves every stage to other data,
each model stage has its own `weights`, and editing one encoder family's module invalidates only
the stages of that family (and verify, which spot-checks every family)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from featcache.config import DATA_PATHS, ParamError, SharedParams, load_stage_params
from featcache.encoders.openclip import resolve_openclip_spec
from featcache.encoders.weights import resolve_stage_spec
from featcache.stages.extract_sam2 import Sam2Params
from featcache.stages.extract_siglip import SiglipParams
from featcache.stages.sample_point_feats import PointFeatsParams
from featcache.stages.verify import VerifyParams
from test_runtime_knobs import sh, status

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def edited(path: Path, change) -> Iterator[None]:
    """``path`` rewritten by ``change(text)`` for the duration, then restored."""
    text = path.read_text()
    path.write_text(change(text))
    try:
        yield
    finally:
        path.write_text(text)


def set_param(key: str, value: Any):
    def change(text: str) -> str:
        doc = yaml.safe_load(text)
        *parents, last = key.split(".")
        node = doc
        for name in parents:
            node = node[name]
        node[last] = value
        return yaml.safe_dump(doc, sort_keys=False)
    return change


def changed_paths(report: dict[str, Any], stage: str, kind: str = "changed deps") -> set[str]:
    return {p for entry in report.get(stage, []) if isinstance(entry, dict)
            for p in entry.get(kind, {})}


def test_verify_and_point_feats_follow_a_stage_out(committed):
    params = committed / "params.yaml"
    with edited(params, set_param("extract_sam2.out", "data/features/sam2_v2")):
        report = status(committed)
        assert set(report) == {"extract_sam2", "verify"}, report
        assert "data/features/sam2_v2" in changed_paths(report, "extract_sam2", "changed outs")
        assert "data/features/sam2_v2" in changed_paths(report, "verify")
        _, verify = load_verify(committed)
        assert verify.sam2 == "data/features/sam2_v2"
    with edited(params, set_param("build_uv_index.out", "data/features/uv_v2")):
        report = status(committed)
        assert {"build_uv_index", "sample_point_feats", "verify"} == set(report), report
        for stage in ("sample_point_feats", "verify"):
            assert "data/features/uv_v2" in changed_paths(report, stage), report[stage]


def load_verify(repo: Path):
    return load_stage_params("verify", VerifyParams, repo / "params.yaml")


def test_a_path_written_twice_is_refused(committed, tmp_path):
    doc = yaml.safe_load((committed / "params.yaml").read_text())
    doc["sample_point_feats"]["uv_index"] = "data/features/uv_index"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ParamError, match=r"^sample_point_feats\.uv_index: remove it; it is "
                                         r"build_uv_index\.out"):
        load_stage_params("sample_point_feats", PointFeatsParams, tmp_path / "params.yaml")


def test_one_data_key_moves_every_stage_to_the_new_data(committed):
    new = "data/raw/moved_by_test"
    doc = yaml.safe_load((committed / "params.yaml").read_text())
    for sub in ("coco", "sa1b", "scannet", "images"):
        (committed / new / sub).mkdir(parents=True, exist_ok=True)
        (committed / new / sub / "placeholder").write_text("other data")
    # each stage's input folder, relative to `data` (config.DATA_PATHS); verify reads `data`
    readers = {stage: (Path(new) / doc[stage].get(key, ".")).as_posix()
               for stage, key in DATA_PATHS.items() if stage != "download"}
    readers["verify"] = new
    with edited(committed / "params.yaml", set_param("data", new)):
        report = status(committed)
        for stage, path in readers.items():
            assert path in changed_paths(report, stage), (stage, report.get(stage))
            assert not {p for p in changed_paths(report, stage)
                        if f"{p}/".startswith(f"{doc['data']}/")}
        assert new in changed_paths(report, "download", "changed outs")
        # sample_point_feats reads no raw data: only the outputs upstream of it (re-run by them)
        assert "sample_point_feats" not in report
        _, siglip = load_stage_params("extract_siglip", SiglipParams, committed / "params.yaml")
        assert siglip.coco == readers["extract_siglip"]
    assert status(committed) == {}


def test_each_model_stage_has_its_own_weights(committed):
    params = committed / "params.yaml"
    doc = yaml.safe_load(params.read_text())
    weights = next(w for w in ("pretrained", "random") if w != doc["extract_sam2"].get("weights"))
    own = doc["extract_siglip"].get("weights")   # siglip keeps what it had
    siglip_weights = ((own, "extract_siglip.weights") if own else
                      (doc.get("weights", SharedParams().weights), "weights"))
    with edited(params, set_param("extract_sam2.weights", weights)):
        report = status(committed)
        assert set(report) == {"extract_sam2", "verify"}, report
        shared, _ = load_stage_params("extract_sam2", Sam2Params, params)
        assert (shared.weights, shared.weights_key) == (weights, "extract_sam2.weights")
        shared, _ = load_stage_params("extract_siglip", SiglipParams, params)
        assert (shared.weights, shared.weights_key) == siglip_weights


@pytest.mark.parametrize("module, stages", [
    ("sam2.py", {"extract_sam2"}),
    ("dinov2.py", {"extract_dinov2"}),
    ("openclip.py", {"extract_clip_grid", "extract_siglip"}),
])
def test_editing_one_family_module_invalidates_only_its_stages(committed, module,
                                                               stages):
    path = committed / "src" / "featcache" / "encoders" / module
    with edited(path, lambda text: text + "\n# an edit\n"):
        report = status(committed)
    # verify rebuilds any family from an output's provenance for its spot checks
    assert set(report) == stages | {"verify"}, report
    for stage in stages | {"verify"}:
        assert any(p.endswith(f"encoders/{module}") or p.endswith("src/featcache/encoders")
                   for p in changed_paths(report, stage)), report[stage]
    assert status(committed) == {}


MODEL_STAGES = {"extract_clip_grid", "extract_dinov2", "extract_siglip", "extract_sam2"}


def test_a_checkpoint_replaced_in_place_reruns_the_model_stages(committed):
    ckpt = committed / "checkpoints" / "mine.pt"
    params = committed / "params.yaml"
    ckpt.write_bytes(b"first weights")
    with edited(params, set_param("extract_sam2.weights", "checkpoints/mine.pt")):
        sh(["dvc", "commit", "-f", "-q"], committed)  # the run that used the first file
        assert status(committed) == {}
        ckpt.write_bytes(b"other weights, same name")
        report = status(committed)
        # every model stage depends on the folder (and verify spot-checks with the weights);
        # the engine's cache key holds the checkpoint's sha256, so only extract_sam2 recomputes
        assert set(report) == MODEL_STAGES | {"verify"}, report
        for stage in report:
            assert "checkpoints" in changed_paths(report, stage), report[stage]
    ckpt.unlink()
    sh(["dvc", "commit", "-f", "-q"], committed)
    assert status(committed) == {}


def test_fetched_weights_are_downloads_output_and_the_model_stages_input(committed):
    stages = yaml.safe_load((committed / "dvc.yaml").read_text())["stages"]
    assert "${weights_dir}" in stages["download"]["outs"]
    fetched = committed / "data" / "weights" / "sam2.1_hiera_tiny.pt"
    fetched.write_bytes(b"fetched by download.weights")
    try:
        report = status(committed)
        assert "data/weights" in changed_paths(report, "download", "changed outs"), report
        for stage in MODEL_STAGES | {"verify"}:
            assert "data/weights" in changed_paths(report, stage), report
        assert not {"edge_maps_methodB", "build_uv_index"} & set(report), report
    finally:
        fetched.unlink()
    assert status(committed) == {}


def test_a_checkpoint_outside_the_tracked_folders_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    elsewhere = tmp_path / "elsewhere" / "ViT-B-16.pt"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(b"x")
    shared = SharedParams(weights=str(elsewhere), weights_key="extract_clip_grid.weights")
    with pytest.raises(ParamError, match=r"extract_clip_grid\.weights: .*outside checkpoints/ "
                                         r"and data/weights/.*set extract_clip_grid\.weights: "
                                         r"checkpoints/ViT-B-16\.pt"):
        resolve_stage_spec(resolve_openclip_spec, "ViT-B-16", stage="extract_clip_grid",
                           shared=shared)
    inside = tmp_path / "checkpoints" / "ViT-B-16.pt"
    inside.parent.mkdir()
    inside.write_bytes(b"x")
    spec = resolve_stage_spec(resolve_openclip_spec, "ViT-B-16", stage="extract_clip_grid",
                              shared=SharedParams(weights="checkpoints/ViT-B-16.pt"))
    assert spec.weights == "checkpoints/ViT-B-16.pt"
