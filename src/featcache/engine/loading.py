"""Loading items for the runner: the DataLoader's dataset, the item timeout, the hand-off of
the workers' tensors, and batching.

A worker's model input crosses to the main process as a plain numpy array when it is small
(a uint8 ``[3,224,224]`` is 150 KB): pickled through the worker's pipe it costs the main
process one read; a torch tensor instead travels as a shared-memory file descriptor, which
costs a new socket connection and handshake per tensor in the main process (measured: most
of the main process's IPC time). Large inputs (SAM2's 12.6 MB float32) cross through the
slots of a :class:`~featcache.engine.slots.SlotPool`, mapped once (for a job that declares
``input_bytes``). Same bits either way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from featcache.engine.signatures import batched_signatures
from featcache.engine.slots import SlotPool, SlotRef
from featcache.engine.types import Batch, Failure, Job, Piece
from featcache.failures import CodedError, FailureCode, code_of

ITEM_TIMEOUT_ENV = "FEATCACHE_ITEM_TIMEOUT_S"   # seconds one item's load may take; 0 = none
DEFAULT_ITEM_TIMEOUT_S = 600.0
PIPE_BYTES = 4 << 20   # tensors up to this size cross as numpy arrays (see the module doc)


class ItemTimeout(CodedError):
    """An item's load ran past the item timeout (a hung read or decoder)."""

    def __init__(self, message: str) -> None:
        super().__init__(FailureCode.ITEM_TIMEOUT, message)


def item_timeout_s() -> float:
    """``$FEATCACHE_ITEM_TIMEOUT_S`` (default 600 s; 0 turns the timeout off)."""
    value = os.environ.get(ITEM_TIMEOUT_ENV, "").strip()
    try:
        seconds = float(value) if value else DEFAULT_ITEM_TIMEOUT_S
    except ValueError:
        raise ValueError(f"{ITEM_TIMEOUT_ENV}={value!r}: expected seconds, e.g. 600") from None
    return max(seconds, 0.0)


@contextlib.contextmanager
def _deadline(seconds: float, item: str) -> Iterator[None]:
    """Raise :class:`ItemTimeout` in this (main) thread after ``seconds`` (SIGALRM: a hung
    system call is interrupted; pure C loops that never return to Python are not)."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def alarm(signum: int, frame: object) -> None:
        raise ItemTimeout(f"{item}: no result after {seconds:g} s (hung input?); the item "
                          f"was skipped ({ITEM_TIMEOUT_ENV} sets the limit)")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _to_wire(r: Piece | Failure, pool: SlotPool | None) -> Piece | Failure:
    t = r.tensor if isinstance(r, Piece) else None
    if not isinstance(t, torch.Tensor):
        return r
    if t.numel() * t.element_size() <= PIPE_BYTES:
        return dataclasses.replace(r, tensor=t.contiguous().numpy())
    ref = pool.put(t) if pool is not None else None
    return r if ref is None else dataclasses.replace(r, tensor=ref)


def from_wire(r: Piece | Failure, pool: SlotPool | None = None) -> Piece | Failure:
    """A piece as the worker made it (its numpy or slot hand-off back to a tensor, no copy)."""
    if isinstance(r, Piece) and isinstance(r.tensor, np.ndarray):
        return dataclasses.replace(r, tensor=torch.from_numpy(r.tensor))
    if isinstance(r, Piece) and isinstance(r.tensor, SlotRef) and pool is not None:
        return dataclasses.replace(r, tensor=pool.take(r.tensor))
    return r


class ItemDataset(torch.utils.data.Dataset):
    """Index i -> (shard, member, the item's pieces and failures); exceptions (and a load
    past the item timeout) -> failures. In a DataLoader worker, small tensors are handed off
    as numpy arrays and large ones through ``pool`` (see the module doc; :func:`from_wire`
    undoes it)."""

    def __init__(self, job: Job, work: list[tuple[int, int, str]], timeout_s: float = 0.0,
                 pool: SlotPool | None = None) -> None:
        self.job, self.work, self.timeout_s, self.pool = job, work, timeout_s, pool

    def __len__(self) -> int:
        return len(self.work)

    def __getitem__(self, i: int) -> tuple[int, int, list[Piece | Failure]]:
        shard, member, item = self.work[i]
        try:
            with _deadline(self.timeout_s, item):
                loaded = list(self.job.load(item))
        except Exception as e:  # one bad item must not stop the run
            return shard, member, [Failure(item, *code_of(e))]
        if torch.utils.data.get_worker_info() is not None:
            loaded = [_to_wire(r, self.pool) for r in loaded]
        return shard, member, loaded


class _Groups(torch.utils.data.Dataset):
    """Index g -> the results of ``group`` consecutive indices of ``dataset``: one DataLoader
    fetch (index put, result pickle and queue get in the main process) per group, not per
    item."""

    def __init__(self, dataset: Any, n: int, group: int,
                 around: Callable[[], contextlib.AbstractContextManager]) -> None:
        self.dataset, self.n, self.group, self.around = dataset, n, group, around

    def __len__(self) -> int:
        return -(-self.n // self.group)

    def __getitem__(self, g: int) -> list:
        with self.around():
            return [self.dataset[i]
                    for i in range(g * self.group, min(self.n, (g + 1) * self.group))]


def _prefetch(group: int) -> int:
    return max(2, 4 // max(1, group))


def _grouped(dataset: Any, n: int, num_workers: int, group: int,
             around: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
             fork: bool = False) -> Iterator:
    """``dataset[0..n)`` in order, loaded by ``num_workers`` DataLoader workers (``0``: here)
    ``group`` items per fetch. At most ``2 * num_workers * max(group, 2)`` items (4 fetches
    of one item) are in flight, as with one item per fetch and a prefetch factor of 4.
    ``fork``: the workers are forked (they share the memory ``dataset`` maps)."""
    if n == 0:
        return
    group = max(1, group) if num_workers else 1
    loader = torch.utils.data.DataLoader(
        _Groups(dataset, n, group, around), batch_size=None, shuffle=False, collate_fn=passthrough,
        num_workers=num_workers, pin_memory=torch.cuda.is_available(),
        prefetch_factor=_prefetch(group) if num_workers else None,
        multiprocessing_context="fork" if fork and num_workers else None)
    for results in loader:
        yield from results


def load_items(job: Job, work: list[tuple[int, int, str]], num_workers: int, group: int,
               held: int = 0) -> Iterator[tuple[int, int, list[Piece | Failure]]]:
    """``(shard, member, pieces and failures)`` of each ``work`` item, in order, loaded in
    ``num_workers`` DataLoader workers (see :class:`ItemDataset`), ``group`` per fetch.
    ``held``: how many pieces the caller keeps at most (its batches) while it reads more."""
    pool = _slot_pool(job, num_workers, group, held)
    dataset = ItemDataset(job, work, item_timeout_s(), pool)
    for shard, member, loaded in _grouped(dataset, len(work), num_workers, group,
                                          fork=pool is not None):
        yield shard, member, [from_wire(r, pool) for r in loaded]


def _slot_pool(job: Job, num_workers: int, group: int, held: int) -> SlotPool | None:
    """Slots for a job whose pieces carry inputs past :data:`PIPE_BYTES` (its
    ``input_bytes``): one per piece in flight (the DataLoader's prefetch, the group being
    read) or held, plus one."""
    size = int(getattr(job, "input_bytes", 0) or 0)
    if not num_workers or size <= PIPE_BYTES or not hasattr(os, "fork"):
        return None
    return SlotPool(size, (_prefetch(group) * num_workers + 1) * group + held + 1)


class _Signatures(torch.utils.data.Dataset):
    def __init__(self, job: Job, items: list[str]) -> None:
        self.job, self.items = job, items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> str:
        return self.job.signature(self.items[i])


SIGNATURE_GROUP = 64


def item_signatures(job: Job, items: list[str], num_workers: int) -> dict[str, str]:
    """Every item's input signature. With DataLoader workers and enough items the hashing
    runs in the workers (measured: ~0.2 ms of main-process CPU per 640x480 JPEG otherwise),
    else in threads here (hashing releases the GIL). New digests are committed once per
    group of items (a worker's) or once in all (here)."""
    if num_workers and len(items) >= 2 * SIGNATURE_GROUP:
        sigs = _grouped(_Signatures(job, items), len(items), num_workers, SIGNATURE_GROUP,
                        around=batched_signatures)
        return dict(zip(items, sigs))
    with batched_signatures(), ThreadPoolExecutor(max_workers=8,
                                                  thread_name_prefix="signature") as pool:
        return dict(zip(items, pool.map(job.signature, items)))


def passthrough(x: Any) -> Any:
    return x


def make_batch(pieces: list[Piece], pad_to: int = 0) -> Batch:
    """Stack the pieces' tensors and gather their arrays, in order. With ``pad_to`` the
    inputs get zero rows up to that many (keys and arrays are not padded). A piece without one
    of the arrays others have gets ``None`` in that list (optional fields, e.g. alpha masks)."""
    tensors = [p.tensor for p in pieces]
    inputs = None
    if tensors and tensors[0] is not None:
        inputs = torch.stack(tensors)
        if pad_to > len(tensors):
            pad = inputs.new_zeros((pad_to - len(tensors), *inputs.shape[1:]))
            inputs = torch.cat([inputs, pad])
    names = list(dict.fromkeys(n for p in pieces for n in p.arrays))
    arrays = {n: [p.arrays.get(n) for p in pieces] for n in names}
    return Batch(keys=[p.key for p in pieces], inputs=inputs, arrays=arrays)
