"""The writer process (``featcache.engine.sinks.ProcessSink``): the same shard bytes as the
writer thread, its errors raised in the main process, its death a clear error, not a hang."""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from featcache.engine import (
    Batch,
    EngineParams,
    Piece,
    WriterOptions,
    rows,
    run_job,
    sinks,
)
from featcache.engine.scratch import SCRATCH_ROOT

SIDE = 24   # a row of 3 x 24 x 24 float32 = 6.9 KB: past sinks.RING_MIN, so through the ring


class BigJob:
    def __init__(self, n: int, drop: frozenset[int] = frozenset()) -> None:
        self.n, self.drop = n, drop

    def items(self) -> list[str]:
        return [f"i{i:03d}" for i in range(self.n) if i not in self.drop]

    def signature(self, item: str) -> str:
        return f"big input {item}"

    def load(self, item: str) -> list[Piece]:
        rng = np.random.default_rng(int(item[1:]))
        x = torch.from_numpy(rng.standard_normal((3, SIDE, SIDE)).astype(np.float32))
        return [Piece(f"{item}_a", x), Piece(f"{item}_b", -x)]


def compute(batch: Batch) -> dict[str, np.ndarray]:
    x = batch.inputs
    return {"feat": (x.flatten(1) * 0.5).numpy(), "sum": x.sum(dim=(1, 2, 3)).numpy()}


def run(cwd: Path, monkeypatch, workers: int, n: int = 60, drop=frozenset()) -> Path:
    monkeypatch.chdir(cwd)
    out = cwd / "out"
    run_job(BigJob(n, frozenset(drop)), compute, stage="sinks", out=out, writer="shards",
            writer_options=WriterOptions(dtype="fp16"), provenance={"model": "toy"},
            fingerprint={}, params=EngineParams(batch_size=5, num_workers=workers,
                                                shard_mb=0.02),
            item_bytes=2 * 3 * SIDE * SIDE * 2)
    return out


def tree_bytes(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def small_ring(monkeypatch):
    """A ring of a few rows (the writer must free space again and again, and arrays must
    skip the ring's end) and a spill budget of one row (rows leave memory)."""
    monkeypatch.setattr(sinks, "RING_BYTES", 16 * 7000)
    monkeypatch.setattr(rows, "SPILL_BYTES", 7000)


def test_the_writer_process_writes_the_bytes_the_writer_thread_writes(tmp_path, monkeypatch,
                                                                      small_ring):
    (tmp_path / "thread").mkdir(), (tmp_path / "process").mkdir()
    spied: list[type] = []
    real = sinks.open_sink

    def spy(*args, **kwargs):
        sink = real(*args, **kwargs)
        spied.append(type(sink))
        return sink

    monkeypatch.setattr("featcache.engine.runner.open_sink", spy)
    thread = run(tmp_path / "thread", monkeypatch, workers=0)
    process = run(tmp_path / "process", monkeypatch, workers=1)
    assert spied == [sinks.ShardSink, sinks.ProcessSink]
    assert len(list((process / "shards").glob("*.h5"))) > 3
    assert tree_bytes(process) == tree_bytes(thread)


def test_an_incremental_run_through_the_writer_process_equals_a_fresh_one(tmp_path,
                                                                         monkeypatch,
                                                                         small_ring):
    (tmp_path / "inc").mkdir(), (tmp_path / "fresh").mkdir()
    run(tmp_path / "inc", monkeypatch, workers=1, drop={3, 17, 30})
    inc = run(tmp_path / "inc", monkeypatch, workers=1)   # rebuilt shards copy earlier rows
    fresh = run(tmp_path / "fresh", monkeypatch, workers=0)
    assert tree_bytes(inc) == tree_bytes(fresh)


def test_disk_full_in_the_writer_process_names_the_shard_and_loses_nothing(tmp_path,
                                                                          monkeypatch):
    (tmp_path / "ref").mkdir(), (tmp_path / "run").mkdir()
    ref = run(tmp_path / "ref", monkeypatch, workers=0)
    real, calls = sinks.write_shard, []

    def full_disk(path, content, compression):   # runs in the (forked) writer process
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, content, compression)

    monkeypatch.setattr(sinks, "write_shard", full_disk)
    with pytest.raises(OSError) as e:
        run(tmp_path / "run", monkeypatch, workers=1)
    assert e.value.errno == errno.ENOSPC and not (tmp_path / "run" / "out").exists()
    scratch = (tmp_path / "run" / SCRATCH_ROOT / "sinks").resolve()
    assert Path(e.value.filename).resolve().parent == scratch
    assert Path(e.value.filename).suffix == ".h5"
    monkeypatch.setattr(sinks, "write_shard", real)
    out = run(tmp_path / "run", monkeypatch, workers=1)   # space freed: run again
    assert tree_bytes(out) == tree_bytes(ref)


def test_a_writer_process_that_dies_is_an_error_not_a_hang(tmp_path, monkeypatch):
    def killed(path, content, compression):
        os._exit(9)   # as the OOM killer would

    monkeypatch.setattr(sinks, "write_shard", killed)
    with pytest.raises(RuntimeError, match="shard writer process exited"):
        run(tmp_path, monkeypatch, workers=1)
    assert not (tmp_path / "out").exists()


def test_ctrl_c_leaves_the_writer_process_to_write_the_closed_shards(tmp_path, monkeypatch):
    """SIGINT goes to the whole process group: the writer process ignores it, so the main
    process's KeyboardInterrupt still gets every closed shard written (a resume keeps it)."""
    monkeypatch.chdir(tmp_path)
    job = BigJob(60)
    plan = [(i, items) for i, items in enumerate([job.items()[:20], job.items()[20:40]])]

    class Planned:   # what a sink reads of a planned shard
        def __init__(self, i: int, items: list[str]) -> None:
            self.name, self.members, self.member_ids, self.found = f"s{i}.h5", items, items, {}

    todo = [Planned(i, items) for i, items in plan]
    (tmp_path / "scratch").mkdir()
    sink = sinks.ProcessSink(todo, tmp_path / "scratch", WriterOptions(dtype="fp16"))
    os.kill(sink.proc.pid, signal.SIGINT)   # as a Ctrl-C in the terminal would
    for m, item in enumerate(todo[0].members):
        sink.add(0, m, item, {"feat": np.full(3000, m, np.float32)})
    sink.close(0)
    sink.finish()
    assert sink.written["s0.h5"][0] == todo[0].members
    assert (tmp_path / "scratch" / "s0.h5").is_file() and sink.proc.exitcode == 0
