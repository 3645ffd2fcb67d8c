"""The batched runner: DataLoader workers load, the model computes, a thread writes chunks.

:func:`run_job` turns a :class:`~featcache.engine.types.Job` into one output file or folder.
Items are grouped in chunks of :data:`CHUNK_ITEMS`; pieces from many items (and chunks) are
batched together for the model; each finished chunk is saved to the scratch area by a
background thread so the model never waits on the disk; once every chunk exists the output is
assembled by a writer into a temporary path and moved into place with ``os.replace``.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from featcache.atomic import atomic_path, remove_stale_temps
from featcache.engine.distributed import DistContext, init_distributed
from featcache.engine.scratch import Scratch, code_version, fingerprint_of
from featcache.engine.types import Batch, EngineParams, Failure, Job, Piece, RunResult
from featcache.engine.writers import WriterOptions, cast, get_writer
from featcache.provenance import library_versions

log = logging.getLogger(__name__)

CHUNK_ITEMS = 32
Compute = Callable[[Batch], dict[str, np.ndarray]]
Record = tuple[str, dict[str, np.ndarray]]


class _ItemDataset(torch.utils.data.Dataset):
    """Index i -> (chunk, the item's pieces and failures); exceptions become failures."""

    def __init__(self, job: Job, work: list[tuple[int, str]]) -> None:
        self.job, self.work = job, work

    def __len__(self) -> int:
        return len(self.work)

    def __getitem__(self, i: int) -> tuple[int, list[Piece | Failure]]:
        chunk, item = self.work[i]
        try:
            return chunk, list(self.job.load(item))
        except Exception as e:  # one bad item must not stop the run
            return chunk, [Failure(item, type(e).__name__, str(e) or repr(e))]


def _passthrough(x: Any) -> Any:
    return x


def make_batch(pieces: list[Piece]) -> Batch:
    """Stack the pieces' tensors and gather their arrays, in order. A piece without one of the
    arrays others have gets ``None`` in that list (optional per-item fields, e.g. alpha masks)."""
    tensors = [p.tensor for p in pieces]
    inputs = torch.stack(tensors) if tensors and tensors[0] is not None else None
    names = list(dict.fromkeys(n for p in pieces for n in p.arrays))
    arrays = {n: [p.arrays.get(n) for p in pieces] for n in names}
    return Batch(keys=[p.key for p in pieces], inputs=inputs, arrays=arrays)


class _ChunkBook:
    """Collects records per chunk and hands finished chunks to the background saver, which
    casts floating fields to the storage dtype first (the scratch holds what will be stored)."""

    def __init__(self, scratch: Scratch, sizes: dict[int, int], dtype: str | None) -> None:
        self.scratch, self.dtype = scratch, dtype
        self.remaining = dict(sizes)   # items not yet loaded, per chunk
        self.open_pieces = {c: 0 for c in sizes}
        self.records: dict[int, list[Record]] = {c: [] for c in sizes}
        self.failures: dict[int, list[Failure]] = {c: [] for c in sizes}
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chunk-writer")
        self.pending: list[Future] = []

    def flush_ready(self) -> None:
        for c in [c for c in self.remaining if self.remaining[c] == 0
                  and self.open_pieces[c] == 0]:
            records, failures = self.records.pop(c), self.failures.pop(c)
            del self.remaining[c], self.open_pieces[c]
            self.pending.append(self.pool.submit(self._save, c, records, failures))

    def _save(self, chunk: int, records: list[Record], failures: list[Failure]) -> None:
        stored = [(k, {n: cast(v, self.dtype) for n, v in f.items()}) for k, f in records]
        self.scratch.save(chunk, stored, failures)

    def close(self) -> None:
        for f in self.pending:
            f.result()
        self.pool.shutdown()


def _compute_into(compute: Compute, taken: list[tuple[int, Piece]], book: _ChunkBook) -> None:
    """Run ``compute`` on the pieces and file each output record under its chunk.

    When a batch fails, its pieces are retried one by one, so that one bad input (a crop the
    model cannot take, a non-finite output) becomes one failure row, not the end of the run;
    an error that every piece hits still fails all of them, and ``max_failures`` then fails
    the stage.
    """
    try:
        with torch.inference_mode():
            out = compute(make_batch([p for _, p in taken]))
    except Exception as e:
        if len(taken) == 1:
            c, p = taken[0]
            book.failures[c].append(Failure(p.key, type(e).__name__, str(e) or repr(e)))
            book.open_pieces[c] -= 1
            return
        log.warning("a batch of %d failed (%s: %s); retrying its pieces one by one",
                    len(taken), type(e).__name__, e)
        for one in taken:
            _compute_into(compute, [one], book)
        return
    for i, (c, p) in enumerate(taken):
        book.records[c].append((p.key, {k: np.asarray(v[i]) for k, v in out.items()
                                        if v[i] is not None}))
        book.open_pieces[c] -= 1


def _compute_chunks(job: Job, compute: Compute | None, work: list[tuple[int, str]],
                    book: _ChunkBook, params: EngineParams, label: str,
                    result: RunResult) -> None:
    loader = torch.utils.data.DataLoader(
        _ItemDataset(job, work), batch_size=None, shuffle=False, collate_fn=_passthrough,
        num_workers=params.num_workers, pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if params.num_workers else None)
    queue: deque[tuple[int, Piece]] = deque()

    def run_batch(n: int) -> None:
        taken = [queue.popleft() for _ in range(n)]
        t = time.perf_counter()
        _compute_into(compute, taken, book)
        result.compute_s += time.perf_counter() - t

    for chunk, results in tqdm(loader, total=len(work), desc=label, unit="item",
                               mininterval=2.0):
        for r in results:
            if isinstance(r, Failure):
                book.failures[chunk].append(r)
            elif compute is None:
                book.records[chunk].append((r.key, r.arrays))
            else:
                queue.append((chunk, r))
                book.open_pieces[chunk] += 1
        book.remaining[chunk] -= 1
        result.done += 1
        while len(queue) >= params.batch_size:
            run_batch(params.batch_size)
        book.flush_ready()
    while queue:
        run_batch(min(len(queue), params.batch_size))
    book.flush_ready()
    book.close()


def _assemble(scratch: Scratch, n_chunks: int, out: Path, writer: str,
              options: WriterOptions, provenance: dict[str, Any]) -> tuple[int, list[Failure]]:
    writer_cls = get_writer(writer)
    failures: list[Failure] = []
    seen: set[str] = set()
    with atomic_path(out, is_dir=writer_cls.is_dir) as tmp:
        with writer_cls(tmp, provenance=provenance, options=options) as w:
            for c in range(n_chunks):
                records, chunk_failures = scratch.load(c)
                failures += chunk_failures
                for key, _ in records:
                    if key in seen:
                        raise RuntimeError(f"duplicate output key {key!r} in {out}")
                    seen.add(key)
                for group in _same_fields(records):
                    w.write([k for k, _ in group],
                            {name: [f[name] for _, f in group] for name in group[0][1]})
    return len(seen), failures


def _same_fields(records: list[Record]) -> list[list[Record]]:
    """Split records into consecutive runs that carry the same field names."""
    groups: list[list[Record]] = []
    for rec in records:
        if groups and groups[-1][0][1].keys() == rec[1].keys():
            groups[-1].append(rec)
        else:
            groups.append([rec])
    return groups


def run_job(job: Job, compute: Compute | None, *, stage: str, out: str | Path, writer: str,
            writer_options: WriterOptions = WriterOptions(), provenance: dict[str, Any],
            fingerprint: dict[str, Any], params: EngineParams,
            device: torch.device | None = None) -> RunResult:
    """Run ``job`` and write its output to ``out`` (a file, or a folder for folder writers).

    ``compute`` maps a :class:`Batch` to ``{field: array[B, ...]}`` on the CPU (or a list of B
    arrays, ``None`` where an item has no such field); ``None`` instead of a function means the
    pieces' ``arrays`` are the output fields. ``fingerprint`` must hold everything that
    determines the result (params, weights identity, input signature); the item list, writer
    settings and featcache's code version are added here. Returns counts for the metrics.
    """
    t0 = time.perf_counter()
    out = Path(out)
    get_writer(writer)  # an unknown writer name fails before any work
    ctx: DistContext = init_distributed()
    items = job.items()
    chunks = [items[i:i + CHUNK_ITEMS] for i in range(0, len(items), CHUNK_ITEMS)]
    fp = fingerprint_of({**fingerprint, "items": items, "chunk_items": CHUNK_ITEMS,
                         "writer": writer, "options": asdict(writer_options),
                         "code": code_version()})
    scratch = Scratch(stage, out, fp)
    if ctx.is_main:
        scratch.prepare()
        remove_stale_temps(out)
    ctx.barrier()
    mine = [c for c in range(len(chunks)) if ctx.owns(c)]
    todo = [c for c in mine if not scratch.has(c)]
    result = RunResult(output=str(out), items=len(items), device=str(device or "cpu"),
                       resumed=sum(len(chunks[c]) for c in mine if c not in todo))
    if result.resumed:
        log.info("%s: resuming, %d of %d items already done", out, result.resumed, len(items))
    work = [(c, item) for c in todo for item in chunks[c]]
    book = _ChunkBook(scratch, {c: len(chunks[c]) for c in todo}, writer_options.dtype)
    _compute_chunks(job, compute, work, book, params, f"{stage} {out.name}", result)
    ctx.barrier()
    if ctx.is_main:
        prov = {**provenance, "stage": stage, "libraries": library_versions(),
                "code_version": code_version()}
        result.records, result.failures = _assemble(scratch, len(chunks), out, writer,
                                                    writer_options, prov)
        result.failed = len({f.item for f in result.failures})
        scratch.remove()
    ctx.barrier()
    result.wall_s = time.perf_counter() - t0
    return result
