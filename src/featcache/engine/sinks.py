"""Where computed rows go: one builder per shard, each shard written once by a writer thread,
in this process (:class:`ShardSink`) or in a writer process (:class:`ProcessSink`).

A builder keeps a shard's rows (beyond :data:`~featcache.engine.rows.SPILL_BYTES` in a spill
file); a finished shard goes to the writer thread, with at most one finished shard waiting.
Gathering, spilling and the shard write cost ~0.3-0.5 ms of CPU per 302 KB ViT-B-16 grid
(measured: most of what the main process spent per image). :class:`ProcessSink` therefore
runs the same :class:`ShardSink` in a forked writer process: the main process copies each
large array once into a shared ring buffer and sends a small message, nothing more. The shard
files' bytes are the same either way (tests/test_sinks.py).
"""

from __future__ import annotations

import contextlib
import mmap
import multiprocessing
import os
import pickle
import queue
import signal
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from featcache.engine.atomic import with_path
from featcache.engine.rows import LazyRow, RowSpill
from featcache.engine.shards import ShardContent, ShardReader, write_shard
from featcache.engine.types import Failure
from featcache.engine.writers import WriterOptions, cast, h5_compression

RING_BYTES = 32 << 20   # the writer process's shared ring buffer (rows in flight)
RING_MIN = 4096         # smaller arrays travel inside the message
ALIGN = 64
WAIT_S = 0.1            # how often a main process waiting for ring space checks the writer


class Planned(Protocol):
    """What a sink needs of a planned shard (:class:`featcache.engine.runner._Planned`)."""

    name: str
    members: list[str]
    member_ids: list[str]
    found: dict[int, tuple[Path, int]]


class Sink(Protocol):
    written: dict[str, tuple[list[str], list[Failure]]]   # shard name -> keys, failures
    bytes_written: int

    def add(self, shard: int, member: int, key: str, fields: dict[str, Any]) -> None: ...

    def fail(self, shard: int, member: int, failure: Failure) -> None: ...

    def close(self, shard: int) -> None: ...

    def finish(self) -> None: ...


class _ShardBuilder:
    """Collects one shard's computed rows (beyond the spill budget in a spill file, so memory
    does not grow with the shard)."""

    def __init__(self, scratch: Path, dtype: str | None, copy: bool) -> None:
        self.records: list[tuple[int, str, dict[str, Any]]] = []
        self.failures: list[tuple[int, Failure]] = []
        self.spill = RowSpill(scratch, dtype)
        self.copy = copy

    def add(self, member: int, key: str, fields: dict[str, Any]) -> None:
        self.records.append((member, key, self.spill.keep(fields, copy=self.copy)))


def _storage(value: Any, dtype: str | None) -> Any:
    return value if isinstance(value, LazyRow) else cast(value, dtype)   # spilled: cast already


def _gather(planned: Planned, built: _ShardBuilder, dtype: str | None,
            readers: dict[Path, ShardReader]) -> ShardContent:
    """The shard's content in member order: earlier rows as references into their shard files
    (opened into ``readers``, read when written), computed rows cast to the storage dtype."""
    records, failures = [], []
    computed: dict[int, list] = {}
    for m, key, fields in built.records:
        computed.setdefault(m, []).append((key, {n: _storage(v, dtype)
                                                 for n, v in fields.items()}))
    failed: dict[int, list[Failure]] = {}
    for m, f in built.failures:
        failed.setdefault(m, []).append(f)
    for m in range(len(planned.members)):
        if m in planned.found:
            path, old = planned.found[m]
            reader = readers.get(path) or readers.setdefault(path, ShardReader(path))
            rows = list(reader.lazy_records_of(old))
            fails = reader.failures_of(old)
        else:
            rows, fails = computed.get(m, []), failed.get(m, [])
        records += [(m, k, f) for k, f in rows]
        failures += [(m, f) for f in fails]
    return ShardContent(planned.members, planned.member_ids, records, failures)


class ShardSink:
    """Builds the shards of ``todo`` in this process; a writer thread writes each one once,
    when it is closed, into ``scratch``. ``copy``: arrays kept in memory are copied (the
    caller reuses their buffers)."""

    def __init__(self, todo: list[Planned], scratch: Path, options: WriterOptions,
                 copy: bool = False, on_written: Callable[[str], None] | None = None) -> None:
        self.todo, self.scratch, self.options, self.copy = todo, scratch, options, copy
        self.on_written = on_written   # called in the writer thread with each shard's name
        self.compression = h5_compression(options)
        self.builders: dict[int, _ShardBuilder] = {}
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self.pending: list[Future] = []
        self.written: dict[str, tuple[list[str], list[Failure]]] = {}
        self.bytes_written = 0

    def _builder(self, shard: int) -> _ShardBuilder:
        if shard not in self.builders:
            self.builders[shard] = _ShardBuilder(self.scratch, self.options.dtype, self.copy)
        return self.builders[shard]

    def add(self, shard: int, member: int, key: str, fields: dict[str, Any]) -> None:
        self._builder(shard).add(member, key, fields)

    def fail(self, shard: int, member: int, failure: Failure) -> None:
        self._builder(shard).failures.append((member, failure))

    def close(self, shard: int) -> None:
        while len(self.pending) > 1:   # one shard written, one waiting: no backlog of shards
            self.pending.pop(0).result()
        self.pending.append(self.writer.submit(self._write, shard, self._builder(shard)))
        self.builders.pop(shard)

    def finish(self) -> None:
        try:
            for f in self.pending:
                f.result()
        finally:
            self.writer.shutdown()

    def _write(self, shard: int, built: _ShardBuilder) -> None:
        planned = self.todo[shard]
        readers: dict[Path, ShardReader] = {}
        try:
            content = _gather(planned, built, self.options.dtype, readers)
            self.written[planned.name] = ([k for _, k, _ in content.records],
                                          [f for _, f in content.failures])
            self.bytes_written += write_shard(self.scratch / planned.name, content,
                                              self.compression)
            if self.on_written is not None:
                self.on_written(planned.name)
        except OSError as e:   # disk full: the stage's one line names the shard
            raise with_path(e, self.scratch / planned.name) from None
        finally:
            built.spill.close()
            for r in readers.values():
                r.close()


@dataclass(frozen=True)
class _InRing:
    """An array the main process put into the ring: ``start`` counts bytes ever written."""

    start: int
    shape: tuple[int, ...]
    dtype: str


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class ProcessSink:
    """A :class:`ShardSink` in a forked writer process. Large arrays go through a shared ring
    buffer (one copy here), the rest through a pipe; the writer process reports the space it
    has freed, each shard written (keys, failures), its errors, which are raised here, and at
    the end the bytes written. Killing the main process ends the writer process at its next message (shards
    closed but not yet written are then lost, as with a writer thread); Ctrl-C does not reach
    it (see :func:`_serve`)."""

    def __init__(self, todo: list[Planned], scratch: Path, options: WriterOptions) -> None:
        self.ring = mmap.mmap(-1, RING_BYTES)   # anonymous and shared with the forked child
        self.head = self.tail = 0
        self.written: dict[str, tuple[list[str], list[Failure]]] = {}
        self.bytes_written = 0
        ctx = multiprocessing.get_context("fork")
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_serve, args=(child, self.ring, todo, scratch, options),
                                name="featcache-shard-writer", daemon=True)
        # born with SIGINT blocked, so a Ctrl-C before it ignores SIGINT cannot kill it; a
        # Ctrl-C meanwhile reaches this process when the mask is restored
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            self.proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        child.close()
        self.done = False

    def add(self, shard: int, member: int, key: str, fields: dict[str, Any]) -> None:
        msg = {n: self._put(v) if _ringable(v) else v for n, v in fields.items()}
        self._send(("row", shard, member, key, msg))

    def fail(self, shard: int, member: int, failure: Failure) -> None:
        self._send(("fail", shard, member, failure))

    def close(self, shard: int) -> None:
        self._send(("close", shard))

    def finish(self) -> None:
        """Wait until every closed shard is written and the writer process has exited."""
        try:
            if not self.done:
                self._send(("end",))
                while not self.done:
                    self._receive(block=True)
        finally:
            self.conn.close()
            self.proc.join(timeout=10)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join()
            self.ring.close()

    def _put(self, a: np.ndarray) -> _InRing:
        n = _aligned(a.nbytes)
        pos = self.head % RING_BYTES
        if pos + n > RING_BYTES:   # never wrap inside an array: skip to the start
            self.head += RING_BYTES - pos
            pos = 0
        while self.head + n - self.tail > RING_BYTES:
            self._receive(block=True)
        np.ndarray(a.shape, a.dtype, buffer=self.ring, offset=pos)[...] = a
        start, self.head = self.head, self.head + n
        return _InRing(start, a.shape, a.dtype.str)

    def _send(self, msg: tuple) -> None:
        while self.conn.poll(0):   # the writer's reports, so its pipe never fills up
            self._receive(block=False)
        try:
            self.conn.send(msg)
        except OSError:   # the writer process is gone: its own error if it sent one
            self._receive(block=True)
            raise

    def _receive(self, block: bool) -> None:
        """Handle one report from the writer process (waiting for one when ``block``)."""
        while block and not self.conn.poll(WAIT_S):
            if not self.proc.is_alive():
                raise self._gone()
        try:
            kind, *rest = self.conn.recv()
        except (EOFError, OSError):   # closed or reset: the writer process is gone
            self.proc.join(timeout=WAIT_S)
            raise self._gone() from None
        if kind == "tail":
            self.tail = max(self.tail, rest[0])
        elif kind == "written":
            name, keys, failures = rest
            self.written[name] = (keys, failures)
        elif kind == "done":
            self.bytes_written += rest[0]
            self.done = True
        else:   # "error": the writer process has stopped
            self.done = True
            raise pickle.loads(rest[0])


    def _gone(self) -> RuntimeError:
        self.done = True
        return RuntimeError(f"the shard writer process exited (code {self.proc.exitcode}) "
                            f"before writing every shard")


def _ringable(v: Any) -> bool:
    return (isinstance(v, np.ndarray) and v.dtype.kind not in "OUSV"
            and RING_MIN <= v.nbytes <= RING_BYTES // 4)


def _serve(conn: Any, ring: mmap.mmap, todo: list[Planned], scratch: Path,
           options: WriterOptions) -> None:
    """The writer process: a :class:`ShardSink` fed by ``conn`` and the ring. Reports the
    ring space it has freed (every quarter of the ring, and whenever it has nothing to do),
    each shard its writer thread has written, and its first error. Ctrl-C (SIGINT to the
    process group) is the main process's to handle: it then asks for the closed shards to be
    written, as with a writer thread, so a resumed run keeps them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    finished: queue.SimpleQueue[str] = queue.SimpleQueue()
    sink = ShardSink(todo, scratch, options, copy=True, on_written=finished.put)
    freed = acked = 0

    def report_written() -> None:
        while not finished.empty():
            name = finished.get()
            conn.send(("written", name, *sink.written[name]))

    try:
        while True:
            try:
                kind, *rest = conn.recv()
            except EOFError:   # the main process is gone: nothing more will be finalized
                os._exit(1)
            if kind == "row":
                shard, member, key, msg = rest
                fields = {}
                for name, v in msg.items():
                    if isinstance(v, _InRing):
                        a = np.ndarray(v.shape, np.dtype(v.dtype), buffer=ring,
                                       offset=v.start % RING_BYTES)
                        freed = max(freed, v.start + _aligned(a.nbytes))
                        v = a
                    fields[name] = v
                sink.add(shard, member, key, fields)   # copied or spilled: the ring is free
            elif kind == "fail":
                sink.fail(*rest)
            elif kind == "close":
                sink.close(rest[0])
            else:   # "end"
                sink.finish()
                report_written()
                conn.send(("done", sink.bytes_written))
                return
            report_written()
            if freed > acked and (freed - acked >= RING_BYTES // 4 or not conn.poll()):
                conn.send(("tail", freed))
                acked = freed
    except BaseException as e:   # reported, then this process ends
        sink.writer.shutdown(wait=False, cancel_futures=True)
        try:
            payload = pickle.dumps(e)
        except Exception:
            payload = pickle.dumps(RuntimeError(f"shard writer: {type(e).__name__}: {e}"))
        with contextlib.suppress(OSError):
            conn.send(("error", payload))
        os._exit(1)


def open_sink(todo: list[Planned], scratch: Path, options: WriterOptions,
              in_process: bool) -> Sink:
    """The writer process where ``fork`` exists and not ``in_process``, else this process."""
    if in_process or not hasattr(os, "fork"):
        return ShardSink(todo, scratch, options)
    return ProcessSink(todo, scratch, options)
