"""Per-stage bookkeeping: ``failures.tsv``, ``metrics/<stage>.json`` (results, a DVC metric),
``.featcache/timing/<stage>.json`` (times and memory, not a metric), the failure budget."""

from __future__ import annotations

import json
import logging
import resource
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from featcache.config import StageError
from featcache.engine.atomic import write_text
from featcache.engine.distributed import init_distributed, shutdown_distributed
from featcache.engine.scratch import SCRATCH_ROOT, drop_unused, tree_bytes
from featcache.engine.types import EngineParams, RunResult

log = logging.getLogger(__name__)

METRICS_DIR = Path("metrics")


class TooManyFailures(StageError, RuntimeError):
    """More items failed than ``max_failures`` allows (the outputs were still written)."""


def _clean(text: str) -> str:
    return " ".join(str(text).split())


def write_failures(path: str | Path, results: Sequence[RunResult]) -> Path:
    """Write every failure as one row ``output  item  error  message`` (header included)."""
    rows = ["output\titem\terror\tmessage"]
    for r in results:
        rows += [f"{Path(r.output).name}\t{_clean(f.item)}\t{_clean(f.error)}\t{_clean(f.message)}"
                 for f in r.failures]
    path = Path(path)
    write_text(path, "\n".join(rows) + "\n")
    return path


def peak_memory_mb() -> dict[str, float]:
    """Peak resident memory of this process (and of finished children, e.g. loader workers)."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kb_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    mem = {"peak_rss_mb": round(kb / 1024, 1), "peak_rss_children_mb": round(kb_children / 1024, 1)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        mem["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return mem


# figures of how fast and on what a run went: they change from run to run (or machine to
# machine), so they stay out of the DVC metric, which holds only what the run produced
TIMING_KEYS = ("wall_s", "compute_s", "items_per_s", "device", "peak_rss_mb",
               "peak_rss_children_mb", "peak_cuda_mb")
TIMING_DIR = Path(".featcache") / "timing"


def is_timing_key(key: str) -> bool:
    """A run-to-run figure (time, speed, memory, scratch size, device), not a result."""
    return key in TIMING_KEYS or key.endswith(("_s", "_mb", "_per_s", "_bytes"))


def summed(per_part: dict[str, Any]) -> dict[str, Any] | None:
    """``{split: {figure: n}}`` -> ``{figure: sum}`` (None unless every value is a mapping of
    numbers): one column per figure in ``dvc exp show``, not one per split."""
    parts = list(per_part.values())
    if not parts or not all(isinstance(v, dict) and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in v.values())
            for v in parts):
        return None
    total: dict[str, Any] = {}
    for part in parts:
        for k, v in part.items():
            total[k] = total.get(k, 0) + v
    return total


def split_metrics(figures: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(results, details)``: the deterministic figures (a per-split mapping summed), and
    the run-to-run ones plus the per-split detail of what was summed."""
    results, details = {}, {}
    for key, value in figures.items():
        if is_timing_key(key):
            details[key] = value
        elif isinstance(value, dict) and summed(value) is not None:
            results[key], details[key] = summed(value), value
        else:
            results[key] = value
    return results, details


def timing_path(stage: str) -> Path:
    """``.featcache/timing/<stage>.json`` (times, memory, device, per-split detail): git- and
    DVC-ignored, never a metric."""
    return TIMING_DIR / f"{stage}.json"


def write_metrics(stage: str, results: Sequence[RunResult], extra: dict[str, Any] | None = None,
                  path: str | Path = "") -> Path:
    """Sum the results into ``path`` (default ``metrics/<stage>.json``; a DVC metric: items,
    computed, reused, shards, failed, records and the stage's ``extra`` results) and the
    timing and memory figures into :func:`timing_path` (not a metric: they differ between two
    runs of the same experiment). Returns ``path``."""
    wall = sum(r.wall_s for r in results)
    computed = sum(r.computed for r in results)
    figures: dict[str, Any] = {
        "items": sum(r.items for r in results),
        "computed": computed,
        "reused": sum(r.reused for r in results),
        "shards": sum(r.shards for r in results),
        "failed": sum(r.failed for r in results),
        "records": sum(r.records for r in results),
        "wall_s": round(wall, 3),
        "compute_s": round(sum(r.compute_s for r in results), 3),
        "items_per_s": round(computed / wall, 3) if wall > 0 else 0.0,
        "device": results[0].device if results else "cpu",
        **peak_memory_mb(),
        **(extra or {}),
    }
    metrics, timing = split_metrics(figures)
    path = Path(path or METRICS_DIR / f"{stage}.json")
    write_text(path, json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    write_text(timing_path(stage), json.dumps(timing, indent=2, sort_keys=True) + "\n")
    log.info("%s: %s", stage, ", ".join(f"{k} {v}" for k, v in sorted(timing.items())))
    return path


def check_failures(results: Sequence[RunResult], max_failures: float) -> None:
    """Raise :class:`TooManyFailures` when failures exceed the budget.

    ``max_failures`` < 1 is a fraction of all items, otherwise a count.
    """
    failed = sum(r.failed for r in results)
    items = sum(r.items for r in results)
    budget = max_failures * items if max_failures < 1 else max_failures
    if failed:
        log.warning("%d of %d items failed; see failures.tsv", failed, items)
    if failed > budget:
        raise TooManyFailures(
            f"{failed} of {items} items failed, more than max_failures={max_failures} allows; "
            "see failures.tsv for what failed, fix the inputs or raise max_failures")


def finish_stage(stage: str, out_dir: str | Path, results: Sequence[RunResult],
                 params: EngineParams, extra: dict[str, Any] | None = None) -> None:
    """Write ``<out_dir>/failures.tsv``, drop the stage's scratch that no current output
    uses, write the metrics (``params.metrics``; ``scratch_bytes``, the whole scratch area's
    size after that, goes with the timing figures), then enforce ``params.max_failures``.
    Only rank 0 writes (under torchrun every rank calls this)."""

    ctx = init_distributed()
    if not all(r.finalized for r in results):
        log.info("%s: compute-only run (shard range); nothing written to %s", stage, out_dir)
        shutdown_distributed()
        return
    ctx.sum_counts(results)
    if ctx.is_main:
        write_failures(Path(out_dir) / "failures.tsv", results)
        # every output is final: what is left in the stage's scratch no current output uses
        drop_unused(stage)
        extra = {**(extra or {}), "scratch_bytes": tree_bytes(SCRATCH_ROOT)}
        write_metrics(stage, results, extra, params.metrics)
    shutdown_distributed()
    check_failures(results, params.max_failures)
