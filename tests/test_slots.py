"""Large model inputs cross from the DataLoader workers through shared slots
(``featcache.engine.slots``): same outputs as in one process, a slot is free again once its
tensor is freed, and pieces cross the old way when no slot frees up."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch

from featcache.engine import Batch, EngineParams, Piece, WriterOptions, run_job, slots
from featcache.engine.loading import PIPE_BYTES

SIDE = 640   # 3 x 640 x 640 float32 = 4.9 MB: past PIPE_BYTES


class LargeInputJob:
    input_bytes = 3 * SIDE * SIDE * 4

    def items(self) -> list[str]:
        return [f"i{i:02d}" for i in range(30)]

    def signature(self, item: str) -> str:
        return f"large input {item}"

    def load(self, item: str) -> list[Piece]:
        rng = np.random.default_rng(int(item[1:]))
        x = rng.standard_normal((3, SIDE, SIDE)).astype(np.float32)
        return [Piece(item, torch.from_numpy(x))]


def compute(batch: Batch) -> dict[str, np.ndarray]:
    x = batch.inputs
    return {"sum": x.sum(dim=(1, 2, 3)).numpy(), "corner": x[:, :, :4, :4].flatten(1).numpy()}


def run(cwd: Path, monkeypatch, workers: int) -> dict[str, bytes]:
    monkeypatch.chdir(cwd)
    out = cwd / "out"
    run_job(LargeInputJob(), compute, stage="slots", out=out, writer="shards",
            writer_options=WriterOptions(dtype=None), provenance={"model": "toy"},
            fingerprint={}, params=EngineParams(batch_size=3, num_workers=workers),
            item_bytes=256)
    return {p.relative_to(out).as_posix(): p.read_bytes()
            for p in sorted(out.rglob("*")) if p.is_file()}


def test_large_inputs_cross_through_slots_with_the_same_outputs(tmp_path, monkeypatch):
    assert LargeInputJob.input_bytes > PIPE_BYTES
    (tmp_path / "one").mkdir(), (tmp_path / "workers").mkdir()
    taken = []
    real = slots.SlotPool.take

    def spy(self, ref):
        taken.append(ref.index)
        return real(self, ref)

    monkeypatch.setattr(slots.SlotPool, "take", spy)
    one = run(tmp_path / "one", monkeypatch, workers=0)
    assert not taken   # in one process there is nothing to hand over
    workers = run(tmp_path / "workers", monkeypatch, workers=2)
    assert len(taken) == 30 and len(set(taken)) < 30   # slots were used again
    assert workers == one


def test_without_a_free_slot_pieces_cross_the_old_way(tmp_path, monkeypatch):
    (tmp_path / "one").mkdir(), (tmp_path / "workers").mkdir()
    real_init = slots.SlotPool.__init__

    def one_slot(self, slot_bytes, count):   # one slot, and no time to wait for it
        real_init(self, slot_bytes, 1)

    monkeypatch.setattr(slots.SlotPool, "__init__", one_slot)
    monkeypatch.setattr(slots, "WAIT_S", 0.001)
    one = run(tmp_path / "one", monkeypatch, workers=0)
    assert run(tmp_path / "workers", monkeypatch, workers=2) == one


def _worker(pool: slots.SlotPool, conn) -> None:
    conn.send(pool.put(torch.arange(12, dtype=torch.float32).view(3, 4)))


def test_a_slot_is_free_again_when_its_last_view_is_freed():
    pool = slots.SlotPool(PIPE_BYTES, 1)
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_worker, args=(pool, child))
    p.start()
    ref = parent.recv()
    p.join()
    assert ref.index == 0 and ref.shape == (3, 4) and ref.dtype == "float32"
    t = pool.take(ref)
    assert torch.equal(t, torch.arange(12, dtype=torch.float32).view(3, 4))
    view = t[1:]
    del t
    with pytest.raises(Exception):   # the slot is still viewed: not free
        pool.free.get(timeout=0.2)
    del view
    assert pool.free.get(timeout=5) == 0
    assert pool.put(torch.zeros(PIPE_BYTES // 4 + 1)) is None   # does not fit a slot
