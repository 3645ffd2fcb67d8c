"""Shared-memory slots for large model inputs: DataLoader workers write them, the main process
reads them in place.

A worker's tensor larger than :data:`~featcache.engine.loading.PIPE_BYTES` (SAM2's 12.6 MB
float32 input) otherwise crosses as a new shared-memory file per tensor: in the main process a
socket connection to receive its descriptor, a new mapping, page faults on first touch and an
unmapping when it is freed (measured: ~4 ms of main-process CPU per SAM2 input, most of what
it spent per image). A :class:`SlotPool` maps its slots once, before the workers are forked;
a worker copies its tensor into a free slot and sends the slot's number; the main process
reads the slot where it is, and the slot is free again when the last tensor viewing it is
freed. Same bits; when no slot frees up in time (more large pieces in flight than planned),
the tensor crosses the old way.
"""

from __future__ import annotations

import math
import mmap
import multiprocessing
import queue
import weakref
from dataclasses import dataclass

import torch

ALIGN = 4096
WAIT_S = 1.0   # how long a worker waits for a free slot before sending the tensor itself


@dataclass(frozen=True)
class SlotRef:
    """A tensor a worker put into slot ``index``: what the main process needs to view it."""

    index: int
    shape: tuple[int, ...]
    dtype: str   # a torch dtype's name, e.g. "float32"


class SlotPool:
    """``count`` slots of ``slot_bytes`` in one anonymous shared mapping; workers forked after
    it is made share it. The free slots' numbers are in a multiprocessing queue."""

    def __init__(self, slot_bytes: int, count: int) -> None:
        self.slot_bytes = -(-slot_bytes // ALIGN) * ALIGN
        self.count = count
        self.mem = mmap.mmap(-1, self.slot_bytes * count)
        self.free: multiprocessing.Queue = multiprocessing.get_context("fork").Queue()
        for i in range(count):
            self.free.put(i)

    def put(self, t: torch.Tensor) -> SlotRef | None:
        """In a worker: ``t`` copied into a free slot, or None when it does not fit or no
        slot frees up within :data:`WAIT_S` (the caller then sends ``t`` itself)."""
        if t.numel() * t.element_size() > self.slot_bytes:
            return None
        try:
            index = self.free.get(timeout=WAIT_S)
        except queue.Empty:
            return None
        ref = SlotRef(index, tuple(t.shape), str(t.dtype).removeprefix("torch."))
        self._view(ref).copy_(t)
        return ref

    def take(self, ref: SlotRef) -> torch.Tensor:
        """In the main process: the slot's tensor, no copy. The slot returns to the free
        queue when that tensor and every view of it are freed."""
        return self._view(ref, release=True)

    def _view(self, ref: SlotRef, release: bool = False) -> torch.Tensor:
        dtype = getattr(torch, ref.dtype)
        n = math.prod(ref.shape)
        start = ref.index * self.slot_bytes
        buffer = memoryview(self.mem)[start:start + n * dtype.itemsize]
        if release:   # the tensor's storage holds ``buffer`` until the storage is freed
            weakref.finalize(buffer, self.free.put, ref.index)
        if n == 0:
            return torch.empty(ref.shape, dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype, count=n).view(ref.shape)
