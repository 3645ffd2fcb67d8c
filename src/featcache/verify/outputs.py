"""Checks every output gets, whatever its family: ``<kind>.records`` (a failure row is not
coverage) and ``<kind>.params`` (the output is not stale).

- ``<kind>.records``: per output (a grid stage's split folder, or the stage's folder) the number
  of records ``written`` and of ``failed`` items (rows of ``failures.tsv``), and for the stage
  ``items`` and ``reused`` (from its metrics). It fails an output with no records, a stage with
  more failures than its ``max_failures`` allows, and failures that come from a key mismatch with
  an upstream output (:data:`KEY_MISMATCH`: e.g. a frame whose CLIP grid is not under its key).
- ``<kind>.params``: each value an output's provenance records (model, weights and their
  identity, crop settings, layout, ...) equals what params.yaml says now
  (:class:`Expectation.made_with`); a stale output names the param that changed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from featcache.config import lookup
from featcache.failures import FailureCode
from featcache.reader import open_features
from featcache.verify.checks import Report, problems_to

# failure codes that mean "the key this item needs is not in the upstream output"
KEY_MISMATCH: dict[str, tuple[tuple[FailureCode, ...], str]] = {
    "point_feats": ((FailureCode.MISSING_GRID,), "extract_clip_grid"),
}


@dataclass(frozen=True)
class Expectation:
    """What params.yaml says about one output: its stage, failure budget, metrics file, the
    weights it uses, and ``made_with``: provenance path (dotted) -> (param key, value)."""

    stage: str
    max_failures: float = 0.0
    metrics: str = ""
    weights: str | None = None
    made_with: dict[str, tuple[str, Any]] = field(default_factory=dict)


@dataclass
class OutputCount:
    """One output's row of the records table (``reports/verify_outputs.json``, a DVC plot)."""

    output: str
    written: int = 0
    failed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"output": self.output, "written": self.written, "failed": self.failed}


def output_folders(folder: Path) -> list[Path]:
    """The sharded outputs of a stage: ``folder`` itself, or its ``<split>/`` folders."""
    if (folder / "index.h5").is_file():
        return [folder]
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if (p / "index.h5").is_file())


def failure_rows(folder: Path) -> list[tuple[str, str, str]]:
    """``(output, item, error)`` of every row of ``<folder>/failures.tsv`` ([] if missing)."""
    path = folder / "failures.tsv"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:
        cells = line.split("\t")
        if len(cells) >= 3:
            rows.append((cells[0], cells[1], cells[2]))
    return rows


def check_records(report: Report, kind: str, folder: Path,
                  expected: Expectation | None) -> list[OutputCount]:
    """``<kind>.records`` of one stage (see the module docstring); returns the table rows."""
    check = report(f"{kind}.records")
    outputs = output_folders(folder)
    if not outputs:
        return []   # <kind>.readable says the output is missing
    rows = failure_rows(folder)
    counts = []
    for out in outputs:
        with problems_to(check, out.name):
            count = OutputCount(f"{kind}/{out.name}" if out != folder else kind,
                                written=len(open_features(out)))
            failed = {item for name, item, _ in rows if name in (out.name, folder.name)}
            count.failed = len(failed)
            check.items += 1
            check.expect(count.written > 0, f"{count.output}: no records ({count.failed} "
                                            f"failed items); a failure row is not coverage")
            counts.append(count)
    failed_items = len({(name, item) for name, item, _ in rows})
    check.numbers.update(written=sum(c.written for c in counts), failed=failed_items)
    items = sum(c.written for c in counts) + failed_items
    failed = failed_items
    if expected is not None and expected.metrics and Path(expected.metrics).is_file():
        with problems_to(check, expected.metrics):
            metrics = json.loads(Path(expected.metrics).read_text())
            items, failed = int(metrics.get("items", items)), int(metrics.get("failed", failed))
            check.numbers.update(items=items, reused=int(metrics.get("reused", 0)))
    if expected is not None:
        budget = expected.max_failures * items if expected.max_failures < 1 \
            else expected.max_failures
        check.expect(failed <= budget, f"{failed} of {items} items failed, more than "
                                       f"{expected.stage}.max_failures={expected.max_failures} "
                                       "allows; see its failures.tsv")
    codes, upstream = KEY_MISMATCH.get(kind, ((), ""))
    mismatched = sorted({item for _, item, error in rows if error in codes})
    check.numbers["key_mismatch"] = len(mismatched)
    check.expect(not mismatched, f"{len(mismatched)} items have no record under their key in "
                                 f"{upstream}'s output (e.g. {mismatched[:1]}): the keys of the "
                                 "two outputs disagree")
    return counts


def _plain(value: Any) -> Any:
    """JSON's view of a value (tuples are lists, ints and floats compare as numbers)."""
    return json.loads(json.dumps(value))


def check_params(report: Report, kind: str, folder: Path, expected: Expectation | None) -> None:
    """``<kind>.params``: every output's provenance agrees with ``expected.made_with``."""
    if expected is None or not expected.made_with:
        return
    check = report(f"{kind}.params")
    views = [p.with_suffix(".h5") for p in output_folders(folder)
             if p.with_suffix(".h5").is_file() and p != folder]
    for out in output_folders(folder) + views:
        with problems_to(check, out.name):
            prov = open_features(out).provenance
            for path, (key, want) in sorted(expected.made_with.items()):
                check.items += 1
                got = lookup(prov, path)
                check.expect(_plain(got) == _plain(want),
                             f"{out.name}: stale: made with {path}={got!r}, params.yaml has "
                             f"{key}: {want!r}; re-run {expected.stage} (dvc repro "
                             f"{expected.stage})")
