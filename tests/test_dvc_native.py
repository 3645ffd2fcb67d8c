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

from featcache.config import ParamError, load_stage_params
from test_runtime_knobs import committed, status  # noqa: F401  (the fixture)

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


def test_verify_and_point_feats_follow_a_stage_out(committed):  # noqa: F811
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
    from featcache.stages.verify import VerifyParams

    return load_stage_params("verify", VerifyParams, repo / "params.yaml")


def test_a_path_written_twice_is_refused(committed, tmp_path):  # noqa: F811
    from featcache.stages.sample_point_feats import PointFeatsParams

    doc = yaml.safe_load((committed / "params.yaml").read_text())
    doc["sample_point_feats"]["uv_index"] = "data/features/uv_index"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ParamError, match=r"^sample_point_feats\.uv_index: remove it; it is "
                                         r"build_uv_index\.out"):
        load_stage_params("sample_point_feats", PointFeatsParams, tmp_path / "params.yaml")


def test_one_data_key_moves_every_stage_to_the_new_data(committed):  # noqa: F811
    real = committed / "data" / "raw" / "real"
    for sub in ("coco", "sa1b", "scannet", "images"):
        (real / sub).mkdir(parents=True, exist_ok=True)
        (real / sub / "placeholder").write_text("other data")
    with edited(committed / "params.yaml", set_param("data", "data/raw/real")):
        report = status(committed)
        readers = {"extract_clip_grid": "data/raw/real", "extract_dinov2": "data/raw/real",
                   "extract_siglip": "data/raw/real/coco", "extract_sam2": "data/raw/real/sa1b",
                   "edge_maps_methodB": "data/raw/real/sa1b",
                   "build_uv_index": "data/raw/real/scannet", "verify": "data/raw/real"}
        for stage, path in readers.items():
            assert path in changed_paths(report, stage), (stage, report.get(stage))
            assert not {p for p in changed_paths(report, stage) if "raw/sample" in p}
        assert "data/raw/real" in changed_paths(report, "download", "changed outs")
        # sample_point_feats reads no raw data: only the outputs upstream of it (re-run by them)
        assert "sample_point_feats" not in report
        from featcache.stages.extract_siglip import SiglipParams

        _, siglip = load_stage_params("extract_siglip", SiglipParams, committed / "params.yaml")
        assert siglip.coco == "data/raw/real/coco"
    assert status(committed) == {}


def test_each_model_stage_has_its_own_weights(committed):  # noqa: F811
    from featcache.stages.extract_sam2 import Sam2Params
    from featcache.stages.extract_siglip import SiglipParams

    params = committed / "params.yaml"
    with edited(params, set_param("extract_sam2.weights", "pretrained")):
        report = status(committed)
        assert set(report) == {"extract_sam2", "verify"}, report
        shared, _ = load_stage_params("extract_sam2", Sam2Params, params)
        assert (shared.weights, shared.weights_key) == ("pretrained", "extract_sam2.weights")
        shared, _ = load_stage_params("extract_siglip", SiglipParams, params)
        assert (shared.weights, shared.weights_key) == ("random", "weights")


@pytest.mark.parametrize("module, stages", [
    ("sam2.py", {"extract_sam2"}),
    ("dinov2.py", {"extract_dinov2"}),
    ("openclip.py", {"extract_clip_grid", "extract_siglip"}),
])
def test_editing_one_family_module_invalidates_only_its_stages(committed, module,  # noqa: F811
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
