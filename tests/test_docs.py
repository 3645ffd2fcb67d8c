"""The developer docs and the README name only files and modules that exist.

Every path (``src/...``, ``tests/...``, ``stages/...``, ``featcache/...``, a package-relative
``engine/runner.py``), every bare ``*.py`` file name and every dotted ``featcache.x.y`` name in
docs/DEVELOPING.md and README.md must resolve: a path to a file or folder of the repository (or
of ``src/featcache``), a file name to some file of the tree, a dotted name to a module or to an
attribute of one. Placeholders (``<stage>``, ``{key}``, ``*``) are skipped.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "featcache"
DOCS = ("docs/DEVELOPING.md", "README.md")
TREES = ("src", "stages", "scripts", "tests", "benchmarks")
SUBPACKAGES = ("datasets", "engine", "encoders", "stages", "verify", "sample")

# a repository or package-relative path; ``featcache/`` only for a .py file or a folder (not
# model names such as ``featcache/dinov2-tiny``)
PATH = re.compile(r"(?<![\w./-])((?:(?:src|tests|stages|scripts|benchmarks|docs|"
                  + "|".join(SUBPACKAGES) + r")/[\w./<>{}*\[:-]*)|featcache/[\w/<>{}*-]*(?:\.py|/))")
FILE_NAME = re.compile(r"(?<![\w/.<>-])(\w+\.py)\b")
DOTTED = re.compile(r"(?<![\w./])(featcache(?:\.\w+)+)")


def doc_text(name: str) -> str:
    return (ROOT / name).read_text()


def is_placeholder(token: str) -> bool:
    return any(c in token for c in "<>{}*[")


def path_exists(token: str) -> bool:
    rel = token.rstrip(".:,)")
    candidates = [ROOT / rel, PACKAGE / rel, PACKAGE.parent / rel]
    return any(c.exists() for c in candidates)


def tree_file_names() -> set[str]:
    return {p.name for tree in TREES for p in (ROOT / tree).rglob("*.py")}


def dotted_exists(name: str) -> bool:
    """``featcache.a.b.c``: the longest importable module prefix, then attributes."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


@pytest.mark.parametrize("doc", DOCS)
def test_every_named_path_exists(doc: str) -> None:
    paths = {m for m in PATH.findall(doc_text(doc)) if not is_placeholder(m)}
    assert paths, f"{doc}: no paths found (the pattern is broken)"
    missing = sorted(p for p in paths if not path_exists(p))
    assert not missing, f"{doc} names paths that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS)
def test_every_named_python_file_exists(doc: str) -> None:
    names = set(FILE_NAME.findall(doc_text(doc)))
    missing = sorted(names - tree_file_names())
    assert not missing, f"{doc} names .py files that are nowhere in the tree: {missing}"


@pytest.mark.parametrize("doc", DOCS)
def test_every_dotted_featcache_name_exists(doc: str) -> None:
    names = set(DOTTED.findall(doc_text(doc)))
    assert names, f"{doc}: no featcache.x names found (the pattern is broken)"
    missing = sorted(n for n in names if not dotted_exists(n))
    assert not missing, f"{doc} names modules or attributes that do not exist: {missing}"


def test_the_checks_catch_a_stale_name() -> None:
    """The old flat layout's names fail every check (so the checks above can fail)."""
    assert not path_exists("src/featcache/sam2_features.py")
    assert "edges.py" not in tree_file_names()
    assert not dotted_exists("featcache.checks.outputs")
    assert not dotted_exists("featcache.engine.no_such_function")
    assert dotted_exists("featcache.engine.run_job") and path_exists("engine/runner.py")
