"""Typed params loading: unknown keys, wrong types and impossible values fail naming the key."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
import yaml

from featcache.config import (SHARED_KEYS, STAGE_SECTIONS, ParamError, SharedParams,
                              load_shared, load_stage_params, read_params_file, require)
from featcache.engine import EngineParams


@dataclass(frozen=True, kw_only=True)
class Split:
    name: str
    images: str


@dataclass(frozen=True, kw_only=True)
class DemoParams(EngineParams):
    out: str
    layout: Literal["hdf5", "npy"] = "hdf5"
    grid: int = 0
    ratio: float = 0.1
    sizes: list[int] = (256, 64)
    splits: list[Split] = ()
    tag: str | None = None

    def validate(self) -> None:
        super().validate()
        require(self.grid in (0, 7), "grid", f"got {self.grid}; allowed: 0 (native) or 7")


def write(tmp_path, section: dict, **shared) -> str:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({**shared, "download": section}))
    return str(path)


def load(tmp_path, section: dict, **shared):
    return load_stage_params("download", DemoParams, write(tmp_path, section, **shared))


def test_valid_section_loads_into_typed_dataclass(tmp_path):
    shared, p = load(tmp_path, {"out": "x", "ratio": 1, "splits": [{"name": "a", "images": "b"}]},
                     model="ViT-L-14", weights="ViT-L-14/openai",
                     runtime={"download": {"batch_size": 4}})
    assert (shared.model, shared.weights, shared.weights_key) == ("ViT-L-14", "ViT-L-14/openai",
                                                                 "weights")
    assert shared.seed == SharedParams().seed          # a key left out keeps its default
    assert p.ratio == 1.0 and isinstance(p.ratio, float)
    assert p.splits == [Split(name="a", images="b")] and p.batch_size == 4


@pytest.mark.parametrize("section, shared, key, hint", [
    ({"out": "x", "gird": 7}, {}, "download.gird", "allowed keys"),
    ({"out": "x", "grid": "7"}, {}, "download.grid", "integer"),
    ({"out": "x", "grid": 5}, {}, "download.grid", "allowed: 0"),
    ({"out": "x", "layout": "zarr"}, {}, "download.layout", "'hdf5', 'npy'"),
    ({"out": "x", "sizes": [256, "64"]}, {}, "download.sizes[1]", "integer"),
    ({"out": "x", "splits": [{"name": "a"}]}, {}, "download.splits[0].images", "missing"),
    ({"out": "x", "batch_size": 4}, {}, "download.batch_size", "runtime.download.batch_size"),
    ({"out": "x"}, {"runtime": {"batch_size": 0}}, "runtime.batch_size", ">= 1"),
    ({"out": "x", "grid": True}, {}, "download.grid", "integer"),
    ({}, {}, "download.out", "missing"),
    ({"out": "x"}, {"runtime": {"device": "gpu"}}, "runtime.device", "cuda:<index>"),
    ({"out": "x"}, {"device": "cpu"}, "device", "move it to runtime.device"),
    ({"out": "x"}, {"seed": -1}, "seed", ">= 0"),
])
def test_bad_params_name_the_key_and_what_is_allowed(tmp_path, section, shared, key, hint):
    with pytest.raises(ParamError) as e:
        load(tmp_path, section, **shared)
    assert str(e.value).startswith(key + ":"), str(e.value)
    assert hint in str(e.value)


def test_missing_section_and_missing_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("model: ViT-B-16\n")
    with pytest.raises(ParamError, match="download: section missing"):
        load_stage_params("download", DemoParams, path)
    with pytest.raises(ParamError, match="not found"):
        load_stage_params("download", DemoParams, tmp_path / "nope.yaml")


def test_unknown_top_level_key_is_refused(tmp_path):
    with pytest.raises(ParamError, match="^modle: unknown top-level key"):
        load(tmp_path, {"out": "x"}, modle="ViT-L-14")


def test_repository_params_yaml_has_only_known_keys():
    """Whatever experiment is committed: every key is known and each stage's device is its
    ``runtime.<stage>.device`` or else ``runtime.device``."""
    data = read_params_file(Path(__file__).parents[1] / "params.yaml")
    assert set(data) <= {*SHARED_KEYS, "runtime", *STAGE_SECTIONS}
    shared = load_shared(data)
    assert shared.model == data.get("model", SharedParams().model)
    runtime = data.get("runtime") or {}
    default = runtime.get("device", shared.device)
    for stage in STAGE_SECTIONS:
        assert stage in data, f"{stage}: section missing from params.yaml"
        want = (runtime.get(stage) or {}).get("device", default)
        assert load_shared(data, stage).device == want, stage
