"""The vocabulary of the ``verify`` stage: named checks, the report, and the helpers every
output's checks use (array shape/dtype/finiteness, failures.tsv, coverage, provenance, the
dimensions a model implies). One module per output family: :mod:`featcache.verify.grid_checks`,
:mod:`featcache.verify.siglip_checks`, :mod:`featcache.verify.npz_checks`.
"""

from __future__ import annotations

import contextlib
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from featcache.config import ParamError, SharedParams
from featcache.encoders.dinov2 import CONFIGS
from featcache.encoders.openclip import model_config
from featcache.provenance import EncodedProvenance, OutputProvenance, ProvenanceError
from featcache.reader import FeatureStore

P = TypeVar("P", bound=OutputProvenance)

LISTED = 5  # problems described per check in the report (all of them are counted)
READ_ERRORS = (OSError, KeyError, ValueError, TypeError, IndexError, EOFError, zipfile.BadZipFile)


@dataclass
class Check:
    """One named check: how many things it looked at, its numbers, how many problems it found
    (the first ``LISTED`` of them in words)."""

    name: str
    items: int = 0
    numbers: dict[str, float | int] = field(default_factory=dict)
    problems: int = 0
    first_problems: list[str] = field(default_factory=list)

    def expect(self, ok: bool, problem: str) -> bool:
        """Count ``problem`` unless ``ok``; returns ``ok``."""
        if not ok:
            self.problems += 1
            if len(self.first_problems) < LISTED:
                self.first_problems.append(problem)
        return bool(ok)

    @property
    def passed(self) -> bool:
        return self.problems == 0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"passed": self.passed, "items": self.items, **self.numbers}
        if self.problems:
            out.update(problems=self.problems, first_problems=self.first_problems)
        return out


class Report:
    """Checks by name, created on first use: ``report("siglip.unit_norm").expect(...)``."""

    def __init__(self) -> None:
        self.checks: dict[str, Check] = {}

    def __call__(self, name: str) -> Check:
        return self.checks.setdefault(name, Check(name))

    @property
    def failed(self) -> list[str]:
        return [name for name, c in self.checks.items() if not c.passed]

    def to_json(self, pictures: list[str]) -> dict[str, Any]:
        return {"passed": not self.failed, "failed": self.failed,
                "checks": {name: c.to_json() for name, c in sorted(self.checks.items())},
                "pictures": pictures}


@contextlib.contextmanager
def problems_to(check: Check, where: str) -> Iterator[None]:
    """Record a read error (a corrupt file, missing provenance) as a problem, not a crash."""
    try:
        yield
    except READ_ERRORS as e:
        check.expect(False, f"{where}: {type(e).__name__}: {e}")


def expect_array(check: Check, where: str, array: Any, shape: tuple[int | None, ...],
                 dtype: Any) -> bool:
    """``array`` has ``shape`` (None matches any size), ``dtype`` and finite values."""
    if not check.expect(isinstance(array, np.ndarray), f"{where}: missing"):
        return False
    fits = array.ndim == len(shape) and all(w is None or w == s for w, s in
                                             zip(shape, array.shape))
    want = "x".join("*" if s is None else str(s) for s in shape) or "scalar"
    return (check.expect(fits and array.dtype == np.dtype(dtype),
                         f"{where}: {array.shape} {array.dtype}, expected ({want}) "
                         f"{np.dtype(dtype)}")
            and check.expect(not np.issubdtype(array.dtype, np.floating)
                             or bool(np.isfinite(array).all()), f"{where}: non-finite values"))


def read_failures(folder: Path, check: Check) -> dict[str, set[str]]:
    """``<folder>/failures.tsv`` as ``{output: {item, ...}}`` (a problem when missing)."""
    path = folder / "failures.tsv"
    rows: dict[str, set[str]] = {}
    if check.expect(path.is_file(), f"{path}: missing"):
        for line in path.read_text(encoding="utf-8").splitlines()[1:]:
            cells = line.split("\t")
            if len(cells) >= 2:
                rows.setdefault(cells[0], set()).add(cells[1])
    return rows


def check_coverage(check: Check, expected: Iterable[tuple[str | None, tuple[str, ...]]],
                   present: set[str], failed: set[str]) -> None:
    """Every ``(key, items)`` expected has ``key`` in ``present`` or one of ``items`` (how
    failures.tsv may name it) in ``failed``; every present key is expected."""
    wanted = set()
    for key, items in expected:
        check.items += 1
        wanted.add(key)
        check.expect(key in present or any(i in failed for i in items),
                     f"{items[0]}: neither {key!r} in the output nor a failures.tsv row")
    for key in sorted(present - wanted):
        check.expect(False, f"{key}: in the output, but no input has this key")


def model_dims(family: str, model: str) -> tuple[int | None, int | None]:
    """``(grid width, pooled embed_dim)`` a model's config implies; None where it does not say
    (CNN and timm towers: only consistency across items is checked)."""
    try:
        if family == "dinov2":

            return (CONFIGS[model]["hidden_size"] if model in CONFIGS else None), None
        if family == "open_clip":

            cfg = model_config(model)
            vision = cfg.get("vision_cfg", {})
            vit = isinstance(vision.get("layers"), int) and "timm_model_name" not in vision
            return (vision.get("width") if vit else None), cfg.get("embed_dim")
    except ParamError:
        pass
    return None, None


def read_provenance(check: Check, where: str, store: FeatureStore, kind: type[P]) -> P | None:
    """The store's provenance as ``kind``; None, and a problem of ``check`` naming the key,
    when it is not one (a missing or mistyped key)."""
    try:
        return kind.from_dict(store.provenance)
    except ProvenanceError as e:
        check.items += 1
        check.expect(False, f"{where}: {e}")
        return None


def check_provenance(check: Check, where: str, prov: EncodedProvenance, shared: SharedParams,
                     model: str | None = None) -> None:
    """Made with params.yaml's ``weights`` (and ``model`` when given), code version recorded."""
    check.items += 1
    check.expect(prov.weights == shared.weights,
                 f"{where}: made with weights {prov.weights!r}, params say {shared.weights!r}")
    if model is not None:
        check.expect(prov.model == model,
                     f"{where}: made with model {prov.model!r}, params say {model!r}")
    check.expect(bool(prov.code_version), f"{where}: no code_version recorded")


def all_failed(rows: dict[str, set[str]]) -> set[str]:
    """Every failed item of a :func:`read_failures` result, whatever its output."""
    return set().union(*rows.values())
