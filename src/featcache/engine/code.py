"""The code that makes an output: the featcache source files a stage script imports.

A shard's identity includes a hash of exactly these files (the same list dvc.yaml declares as
the stage's code deps, see ``scripts/stage_deps.py``), so editing ``encoders/sam2.py``
invalidates no CLIP shard, and editing ``grids.py`` invalidates every grid shard.
"""

from __future__ import annotations

import ast
import hashlib
import sys
from functools import lru_cache
from pathlib import Path

SRC = Path(__file__).resolve().parents[2]
PACKAGE = "featcache"


def module_file(name: str) -> Path | None:
    base = SRC / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imported_modules(path: Path) -> set[str]:
    """featcache modules that ``path`` imports: import statements anywhere (function bodies
    too) and module names given as strings (``importlib.import_module``)."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    here = module_name(path) if path.is_relative_to(SRC) else ""
    found: set[str] = set()
    for node in _walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and node.value.startswith(PACKAGE + "."):
            found.add(node.value)  # importlib.import_module("featcache.x") by name
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == PACKAGE}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = here.split(".") if is_pkg else here.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            if base.split(".")[0] != PACKAGE:
                continue
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names if module_file(f"{base}.{a.name}")}
    return {m for m in found if module_file(m)}


def _walk(tree: ast.AST):
    """ast.walk, skipping module ``__getattr__`` bodies (lazy exports for users, which a stage
    that does not touch them never imports) and ``if TYPE_CHECKING:`` blocks."""
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        yield node
        todo.extend(ast.iter_child_nodes(node))


def closure(script: Path) -> set[Path]:
    """Every featcache source file that importing ``script`` can load, parents included."""
    todo, seen = list(imported_modules(script)), set()
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__
            parent = ".".join(parts[:i])
            if parent not in seen and module_file(parent):
                seen.add(parent)
                todo += sorted(imported_modules(module_file(parent)))
    return {module_file(m) for m in seen}



@lru_cache(maxsize=8)
def code_identity(script: str | None = None) -> str:
    """sha256 over the source of ``script`` (default: the running ``__main__`` file) and every
    featcache module it can import; over the whole package when there is no script."""
    if script is None:
        main = getattr(sys.modules.get("__main__"), "__file__", None)
        script = main if main and main.endswith(".py") else None
    if script is None:
        files = set((SRC / PACKAGE).rglob("*.py"))
    else:
        files = closure(Path(script)) | {Path(script).resolve()}
    h = hashlib.sha256()
    for path in sorted(files):
        name = path.relative_to(SRC).as_posix() if path.is_relative_to(SRC) else path.name
        h.update(f"{name}\n".encode())
        h.update(path.read_bytes())
    return h.hexdigest()
