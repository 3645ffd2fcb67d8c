"""The batched runner: shards planned, found or computed, then moved into the output.

:func:`run_job` turns a :class:`~featcache.engine.types.Job` into one sharded output folder
(see :mod:`featcache.engine.shards`):

1. every item gets a content signature and an identity (method + code + signature); the items
   are cut into content-defined shards, each with an identity over its members;
2. a shard found anywhere (scratch area, the output on disk, DVC's cache) is hard-linked into
   the scratch area; within a shard that must be rebuilt, members found in an earlier shard are
   copied from it (no model work); only the rest is loaded and computed;
3. DataLoader workers load items; the model computes batches that never span a shard, each
   padded to ``batch_size`` (one shape for every batch); the rows go to a sink
   (:mod:`featcache.engine.sinks`: a writer process, or with ``num_workers: 0`` a writer
   thread here) that writes each finished shard once, in its final format, in the scratch area;
4. rank 0 moves (renames) the shards into the output, writes its index and the layout's view.

On the CPU the model runs with one intra-op thread: results then depend neither on a row's
position in its batch nor on its neighbours (measured: with two threads they do), so a member
computed alone, in another process or in another run has the same bits as in a from-scratch
run. Scale the CPU out with processes (``torchrun``), not threads.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from featcache.engine.atomic import (
    atomic_path,
    remove_stale_temps,
    stale_temps,
)
from featcache.engine.code import code_identity
from featcache.engine.distributed import DistContext, init_distributed
from featcache.engine.loading import item_signatures, load_items, make_batch
from featcache.engine.reuse import earlier_members, link_or_copy, previous_shards
from featcache.engine.scratch import SCRATCH_ROOT, fingerprint_of, safe_name
from featcache.engine.shards import (
    SHARDS_DIR,
    ShardReader,
    member_identity,
    plan_shards,
    shard_identity,
    shard_name,
    target_items,
    write_index,
)
from featcache.engine.sinks import Sink, open_sink
from featcache.engine.types import Batch, EngineParams, Failure, Job, Piece, RunResult
from featcache.engine.views import get_view
from featcache.engine.writers import WriterOptions
from featcache.failures import FailureCode, unexpected_message
from featcache.provenance import library_versions

log = logging.getLogger(__name__)

Compute = Callable[[Batch], dict[str, np.ndarray]]
SHARD_RANGE_ENV = "FEATCACHE_SHARDS"   # "k/n": compute every n-th shard from k, then stop


@dataclass
class _Planned:
    """One shard of the plan: members, their identities, and where earlier rows are."""

    index: int
    members: list[str]
    member_ids: list[str]
    name: str = ""
    found: dict[int, tuple[Path, int]] = field(default_factory=dict)  # member -> earlier shard

    def __post_init__(self) -> None:
        self.name = shard_name(shard_identity(self.member_ids))


def _compute_into(compute: Compute, taken: list[tuple[int, Piece]], sink: Sink, shard: int,
                  pad_to: int) -> None:
    """Run ``compute`` on the pieces (of ``shard``) and file each output record in ``sink``.

    When a batch fails, its pieces are retried one by one (each still padded to the batch
    shape), so that one bad input becomes one failure row, not the end of the run.
    """
    try:
        with torch.inference_mode():
            out = compute(make_batch([p for _, p in taken], pad_to))
    except Exception as e:
        if len(taken) == 1:
            m, p = taken[0]
            sink.fail(shard, m, Failure(p.key, FailureCode.COMPUTE_ERROR, unexpected_message(e)))
            return
        log.warning("a batch of %d failed (%s: %s); retrying its pieces one by one",
                    len(taken), type(e).__name__, e)
        for one in taken:
            _compute_into(compute, [one], sink, shard, pad_to)
        return
    for i, (m, p) in enumerate(taken):
        sink.add(shard, m, p.key, {k: np.asarray(v[i]) for k, v in out.items()
                                   if v[i] is not None})


@contextlib.contextmanager
def _model_threads(device: torch.device | None, compute: Compute | None,
                   in_process: bool = False) -> Iterator[None]:
    """One intra-op thread for a model on the CPU (see the module doc), and for per-item
    torch ops when items load in this process (``num_workers: 0``; DataLoader workers have one
    thread already): several threads on small per-item ops cost up to 10x, measured; restored
    after."""
    on_cpu = compute is not None and (device is None or device.type == "cpu")
    if not (on_cpu or in_process):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _compute_shards(job: Job, compute: Compute | None, todo: list[_Planned], scratch: Path,
                    params: EngineParams, options: WriterOptions, label: str,
                    result: RunResult, written: dict[str, tuple[list[str], list[Failure]]],
                    ) -> None:
    work = [(i, m, p.members[m]) for i, p in enumerate(todo)
            for m in range(len(p.members)) if m not in p.found]
    counts = Counter(i for i, _, _ in work)
    remaining = {i: counts[i] for i in range(len(todo))}
    # the writer process when items load in DataLoader workers; num_workers: 0 keeps
    # everything in this process (and in reach of a debugger)
    sink = open_sink(todo, scratch, options, in_process=params.num_workers == 0)
    queue: list[tuple[int, Piece]] = []

    def run_batch(shard: int, n: int) -> None:
        taken, queue[:] = queue[:n], queue[n:]
        t, c = time.perf_counter(), time.thread_time()
        _compute_into(compute, taken, sink, shard, params.batch_size)
        result.compute_s += time.perf_counter() - t
        result.compute_cpu_s += time.thread_time() - c

    def close(shard: int) -> None:
        while queue:
            run_batch(shard, min(len(queue), params.batch_size))
        sink.close(shard)

    try:
        for i in [i for i, n in remaining.items() if n == 0]:   # everything found earlier
            close(i)
        loaded_items = load_items(job, work, params.num_workers, min(8, params.batch_size),
                                  held=2 * params.batch_size)
        for shard, member, loaded in tqdm(loaded_items, total=len(work), desc=label,
                                          unit="item", mininterval=2.0):
            for r in loaded:
                if isinstance(r, Failure):
                    sink.fail(shard, member, r)
                elif compute is None:
                    sink.add(shard, member, r.key, r.arrays)
                else:
                    queue.append((member, r))
            result.computed += 1
            remaining[shard] -= 1
            while len(queue) >= params.batch_size:
                run_batch(shard, params.batch_size)
            if remaining[shard] == 0:
                close(shard)
    finally:
        sink.finish()
    written.update(sink.written)
    result.bytes_written += sink.bytes_written


def shard_range() -> tuple[int, int] | None:
    """``(k, n)`` from ``FEATCACHE_SHARDS=k/n`` (compute-only mode), else None."""
    value = os.environ.get(SHARD_RANGE_ENV, "").strip()
    if not value:
        return None
    try:
        k, n = (int(x) for x in value.split("/"))
    except ValueError:
        raise ValueError(f"{SHARD_RANGE_ENV}={value!r}: expected k/n, e.g. 3/64") from None
    if not 0 <= k < n:
        raise ValueError(f"{SHARD_RANGE_ENV}={value!r}: need 0 <= k < n")
    return k, n


def _owned(n_shards: int, ctx: DistContext, part: tuple[int, int] | None) -> list[int]:
    k, n = part or (0, 1)
    return [i for i in range(n_shards) if i % n == k and (i // n) % ctx.world == ctx.rank]


def run_job(job: Job, compute: Compute | None, *, stage: str, out: str | Path,
            writer: str = "shards", writer_options: WriterOptions = WriterOptions(),
            provenance: dict[str, Any], fingerprint: dict[str, Any], params: EngineParams,
            device: torch.device | None = None, item_bytes: int = 1 << 20,
            view: str | Path | None = None) -> RunResult:
    """Run ``job`` into the sharded output folder ``out`` (and the ``writer`` layout's view).

    ``compute`` maps a :class:`Batch` to ``{field: array[B, ...]}`` on the CPU (or a list of B
    arrays, ``None`` where an item has no such field); ``None`` instead of a function means the
    pieces' ``arrays`` are the output fields. ``fingerprint`` must hold everything that
    determines the result except the items' inputs (params, weights identity); each item's
    inputs come from ``job.signature(item)``; featcache's code, the storage options and the
    shard size are added here. ``item_bytes`` estimates the bytes one item stores (it sets the
    shard size; it must come from params, never from the data). ``view``: where the layout's
    view goes (default ``out`` + the view's suffix). Returns counts for the metrics.
    """
    t0 = time.perf_counter()
    out = Path(out)
    view_writer = get_view(writer)   # an unknown layout fails before any work
    part = shard_range()
    ctx: DistContext = init_distributed()
    items = job.items()
    method = fingerprint_of({**fingerprint, "options": asdict(writer_options),
                             "shard_mb": params.shard_mb, "code": code_identity()})
    signatures = item_signatures(job, items, params.num_workers)
    ids = [member_identity(method, it, signatures[it]) for it in items]
    cut = plan_shards(items, target_items(params.shard_mb, item_bytes))
    plan, start = [], 0
    for i, members in enumerate(cut):
        plan.append(_Planned(i, members, ids[start:start + len(members)]))
        start += len(members)
    scratch = SCRATCH_ROOT / safe_name(stage)
    scratch.mkdir(parents=True, exist_ok=True)
    if ctx.is_main:
        _rescue(out, scratch)
    ctx.barrier()
    mine = [plan[i] for i in _owned(len(plan), ctx, part)]
    earlier = previous_shards(out, scratch)
    result = RunResult(output=str(out), items=len(items), device=str(device or "cpu"),
                       shards=len(plan))
    todo = []
    for p in mine:
        if p.name in earlier:
            link_or_copy(earlier[p.name], scratch / p.name)
            result.reused += len(p.members)
        else:
            todo.append(p)
    if todo:
        by_id = earlier_members([path for name, path in sorted(earlier.items())])
        for p in todo:
            p.found = {m: by_id[mid] for m, mid in enumerate(p.member_ids) if mid in by_id}
            result.reused += len(p.found)
    written: dict[str, tuple[list[str], list[Failure]]] = {}   # shard -> keys, failures
    log.info("%s: %d items in %d shards; %d of mine to build, %d items reused", out,
             len(items), len(plan), len(todo), result.reused)
    with _model_threads(device, compute, in_process=params.num_workers == 0):
        _compute_shards(job, compute, todo, scratch, params, writer_options,
                        f"{stage} {out.name}", result, written)
    ctx.barrier()
    if part is not None:
        log.info("%s=%d/%d: computed my shards into %s; run the stage without it (e.g. "
                 "dvc repro) to move them into %s", SHARD_RANGE_ENV, *part, scratch, out)
    elif ctx.is_main:
        prov = {**provenance, "stage": stage, "libraries": _library_versions(),
                "code_version": code_identity(), "layout": writer,
                "storage_dtype": writer_options.dtype, "shard_mb": params.shard_mb}
        result.records, result.failures = _finalize(plan, scratch, out, prov, written)
        if view_writer is not None:   # a per-item view refuses keys that cannot be files
            result.failures += view_writer(out, Path(view) if view else None, prov,
                                           writer_options)
        result.failed = len({f.item for f in result.failures})
    ctx.barrier()
    result.finalized = part is None
    result.wall_s = time.perf_counter() - t0
    return result


@functools.cache
def _versions() -> tuple[tuple[str, str], ...]:
    return tuple(library_versions().items())


def _library_versions() -> dict[str, str]:
    """:func:`library_versions`, read once per process (reading package metadata costs
    ~0.2 s, measured; versions do not change while a process runs)."""
    return dict(_versions())


def _rescue(out: Path, scratch: Path) -> None:
    """Move the shards of an output folder that a killed run was moving into place back into
    the scratch area, then remove such half-made folders."""
    for tmp in stale_temps(out):
        for shard in (tmp / SHARDS_DIR).glob("*.h5") if tmp.is_dir() else []:
            os.replace(shard, scratch / shard.name)
    remove_stale_temps(out)


def _finalize(plan: list[_Planned], scratch: Path, out: Path, provenance: dict[str, Any],
              written: dict[str, tuple[list[str], list[Failure]]],
              ) -> tuple[int, list[Failure]]:
    """Move every shard from the scratch area into a new ``out`` and write its index. The
    keys and failures of the shards this process wrote are in ``written`` (not read back)."""
    missing = [p.name for p in plan if not (scratch / p.name).is_file()]
    if missing:
        raise RuntimeError(f"{len(missing)} shards of {out} are not in {scratch} (first: "
                           f"{missing[0]}): a rank or array task did not finish")
    shards: list[tuple[str, list[str]]] = []
    failures: list[Failure] = []
    with atomic_path(out, is_dir=True) as tmp:
        (tmp / SHARDS_DIR).mkdir()
        for p in plan:
            if p.name in written:
                keys, fails = written[p.name]
            else:
                with ShardReader(scratch / p.name) as r:
                    keys, fails = r.keys(), r.failures()
            shards.append((p.name, keys))
            failures += fails
            os.replace(scratch / p.name, tmp / SHARDS_DIR / p.name)
        rows = write_index(tmp, shards, provenance)
    return rows, failures
