"""Print the src files each stage script imports (transitively, statically), as dvc.yaml deps.

    python scripts/stage_deps.py [stage ...]
    python scripts/stage_deps.py --write      # rewrite the code deps in dvc.yaml

tests/test_dvc_yaml.py checks that every stage in dvc.yaml lists exactly these files (a package
folder stands for all of its modules when every one of them is imported).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
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


def stage_deps(stage: str) -> list[str]:
    """dvc.yaml deps of ``stage``: its script, then its src files (whole packages as folders)."""
    files = closure(ROOT / "stages" / f"{stage}.py")
    deps: set[str] = set()
    for f in files:
        pkg = f.parent
        package_files = set(pkg.glob("*.py"))
        if pkg != SRC / PACKAGE and package_files <= files:
            deps.add(pkg.relative_to(ROOT).as_posix())
        else:
            deps.add(f.relative_to(ROOT).as_posix())
    return [f"stages/{stage}.py", *sorted(deps)]


def rewrite_dvc_yaml(path: Path = ROOT / "dvc.yaml") -> None:
    """Replace the code deps (``stages/...``, ``src/...``) of every stage in dvc.yaml, keeping
    data deps, comments and everything else as written."""
    out, stage = [], None
    for line in path.read_text().splitlines():
        if line.startswith("  ") and not line.startswith("   ") and line.rstrip().endswith(":"):
            stage = line.strip()[:-1]
        code_dep = line.startswith("      - stages/") or line.startswith("      - src/")
        if code_dep and line.startswith("      - stages/"):
            out += [f"      - {d}" for d in stage_deps(stage)]
        elif not code_dep:
            out.append(line)
    path.write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        rewrite_dvc_yaml()
        sys.exit(0)
    stages = sys.argv[1:] or sorted(p.stem for p in (ROOT / "stages").glob("*.py"))
    for name in stages:
        print(f"{name}:")
        print("\n".join(f"  - {d}" for d in stage_deps(name)))
