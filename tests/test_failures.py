"""One vocabulary of failure codes: every code src writes is a FailureCode, the README's table
lists exactly the vocabulary, and a stage's failure paths write only its codes."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml
from PIL import Image
from test_edges import params_for, write_dataset

from featcache.datasets.coco_panoptic import PanopticError
from featcache.datasets.sa1b import Sa1bError
from featcache.datasets.scannet import ScanNetError
from featcache.encoders import TINY_OPENCLIP, Preprocessor, resolve_spec
from featcache.engine.types import Failure
from featcache.engine.writers import ItemNameError
from featcache.failures import (
    ANY_STAGE,
    FAILURES,
    CodedError,
    FailureCode,
    code_of,
    failure_table,
)
from featcache.stages._grids import build_grid_job
from featcache.stages._point_sampling import GridError
from featcache.stages.edge_maps_methodB import run_edge_maps

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "featcache"
# classes whose first argument is a failure code (featcache's reader and writer errors)
CODED_ERRORS = {"PanopticError", "ScanNetError", "Sa1bError", "ItemNameError", "GridError"}


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            yield (func.attr if isinstance(func, ast.Attribute) else
                   func.id if isinstance(func, ast.Name) else ""), node


def test_src_passes_no_bare_string_as_a_failure_code() -> None:
    """A code is ``FailureCode.X`` wherever src builds a Failure or a coded error, and every
    ``FailureCode.X`` src names exists (a typo would only fail on that failure path)."""
    bare, unknown = [], []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        where = path.relative_to(ROOT).as_posix()
        for name, call in _calls(tree):
            code = (call.args[1] if name == "Failure" and len(call.args) > 1 else
                    call.args[0] if name in CODED_ERRORS and call.args else None)
            if isinstance(code, ast.Constant) and isinstance(code.value, str):
                bare.append(f"{where}:{call.lineno} {name}({code.value!r})")
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id == "FailureCode" and node.attr not in FailureCode.__members__):
                unknown.append(f"{where}:{node.lineno} FailureCode.{node.attr}")
    assert not bare, bare
    assert not unknown, unknown


def test_a_failure_with_a_code_outside_the_vocabulary_cannot_be_built() -> None:
    for old in ("decode_error", "duplicate_stem", "missing_json", "ItemTimeout", "ValueError"):
        with pytest.raises(ValueError, match="not a featcache.failures.FailureCode"):
            Failure("x.jpg", old, "old code")
    row = Failure("x.jpg", "bad_image", "truncated")   # a row read back from a shard
    assert row.error is FailureCode.BAD_IMAGE and f"{row.error}" == "bad_image"


def test_errors_without_a_code_of_their_own_keep_their_type_in_the_message() -> None:
    assert code_of(KeyError("grids")) == (FailureCode.UNEXPECTED_ERROR, "KeyError: 'grids'")
    coded = ValueError("no JSON")
    coded.code = FailureCode.MISSING_FILE
    assert code_of(coded) == (FailureCode.MISSING_FILE, "no JSON")


def test_the_coded_errors_share_one_base_and_map_to_their_code() -> None:
    """Each reader/writer error is a CodedError, keeps the exception type callers catch, and
    becomes its own code and message (not ``unexpected_error``)."""
    catches = {PanopticError: Exception, ScanNetError: ValueError, Sa1bError: ValueError,
               ItemNameError: ValueError, GridError: ValueError}
    assert {cls.__name__ for cls in catches} == CODED_ERRORS
    for code, (cls, caught) in zip(FailureCode, catches.items()):
        error = cls(code, f"{cls.__name__}: what is wrong")
        assert isinstance(error, CodedError) and isinstance(error, caught), cls
        assert error.code is code and str(error) == f"{cls.__name__}: what is wrong"
        assert code_of(error) == (code, f"{cls.__name__}: what is wrong")
    assert not issubclass(PanopticError, ValueError)   # as before the shared base


def test_every_code_has_a_meaning_and_real_stages() -> None:
    stages = set(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]) | {ANY_STAGE}
    assert list(FAILURES) == list(FailureCode)
    for code, info in FAILURES.items():
        assert info.meaning and "\n" not in info.meaning and "|" not in info.meaning, code
        assert info.stages and set(info.stages) <= stages, (code, info.stages)


def test_the_readme_table_lists_exactly_the_vocabulary() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert failure_table() in readme, "README's failure table is stale: paste failure_table()"
    start = readme.index("| code | meaning | emitted by |")
    table = readme[start:readme.index("\n\n", start)]
    listed = re.findall(r"^\| `([a-z_]+)` \|", table, flags=re.MULTILINE)
    assert listed == [c.value for c in FailureCode]


def test_the_failure_paths_write_only_vocabulary_codes(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The edge stage's failure rows (bad RLE, size mismatch, missing JSON, duplicate stem) and
    the grid job's (duplicate key, corrupt image), as written to failures.tsv."""
    monkeypatch.chdir(tmp_path)
    write_dataset(tmp_path / "sa1b")
    run_edge_maps(params_for(tmp_path, max_failures=4))
    rows = (tmp_path / "edges" / "failures.tsv").read_text().splitlines()[1:]
    codes = {r.split("\t")[2] for r in rows}
    assert codes == {"bad_rle", "size_mismatch", "missing_file", "duplicate_key"}
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "000000000139.jpg")
    Image.new("RGB", (8, 8)).save(folder / "139.png")
    (folder / "broken.jpg").write_bytes((folder / "000000000139.jpg").read_bytes()[:40])
    paths = sorted(folder.iterdir())
    pre = Preprocessor(resolve_spec("open_clip", TINY_OPENCLIP, weights="random"))
    job = build_grid_job(folder, paths, "image_id", pre, (255, 255, 255), None)
    loaded = {item: job.load(item)[0] for item in ("139.png", "broken.jpg")}
    assert {i: f.error for i, f in loaded.items()} == {"139.png": "duplicate_key",
                                                       "broken.jpg": "bad_image"}
    assert "already taken by 000000000139.jpg" in loaded["139.png"].message
    assert codes | {f.error for f in loaded.values()} <= set(FailureCode)
