"""Print the src files each stage script imports (transitively, statically), as dvc.yaml deps.

    python scripts/stage_deps.py [stage ...]
    python scripts/stage_deps.py --write      # rewrite the code deps in dvc.yaml

tests/test_dvc_yaml.py checks that every stage in dvc.yaml lists exactly these files (a package
folder stands for all of its modules when every one of them is imported).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
sys.path.insert(0, str(SRC))

from featcache.engine.code import PACKAGE, closure  # noqa: E402  (the one definition)


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
