"""A shard being built keeps a bounded amount of rows in memory (featcache.engine.rows); the
shard files are the same bytes as when every row stays in memory."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from featcache.engine import EngineParams, WriterOptions, rows, run_job, shards, sinks
from featcache.engine.rows import LazyRow, SpilledRow, StoredRow
from featcache.engine.shards import ShardContent, ShardReader, write_shard
from featcache.engine.types import Failure

sys.path.insert(0, str(Path(__file__).parent))
from engine_toy import ITEM_BYTES, ToyCompute, ToyJob  # noqa: E402


def tree_bytes(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes()
            for p in sorted(path.rglob("*")) if p.is_file()}


def run_toy(cwd: Path, monkeypatch, n: int = 60, drop=frozenset()) -> tuple[Path, list]:
    """Run the toy job in ``cwd``; returns the output and each written shard's rows as given
    to ``write_shard`` (arrays or lazy rows)."""
    monkeypatch.chdir(cwd)
    seen: list[list[dict]] = []
    real = sinks.write_shard

    def spy(path, content, compression):
        seen.append([fields for _, _, fields in content.records])
        return real(path, content, compression)

    monkeypatch.setattr(sinks, "write_shard", spy)
    out = cwd / "out"
    run_job(ToyJob(n, False, frozenset(drop)), ToyCompute(0.0), stage="toy", out=out,
            writer="shards", writer_options=WriterOptions(dtype="fp16"),
            provenance={"model": "toy"}, fingerprint={},
            params=EngineParams(batch_size=7, num_workers=0, shard_mb=0.01),
            item_bytes=ITEM_BYTES)
    return out, seen


def held_bytes(shard_rows: list[dict]) -> int:
    return sum(np.asarray(v).nbytes for fields in shard_rows for v in fields.values()
               if not isinstance(v, LazyRow))


def test_rows_past_the_budget_leave_memory_and_the_shards_keep_their_bytes(tmp_path,
                                                                           monkeypatch):
    (tmp_path / "mem").mkdir(), (tmp_path / "spill").mkdir()
    in_memory, seen = run_toy(tmp_path / "mem", monkeypatch)
    assert not any(isinstance(v, LazyRow) for s in seen for f in s for v in f.values())
    budget = 400
    monkeypatch.setattr(rows, "SPILL_BYTES", budget)
    monkeypatch.setattr(rows, "MIN_SPILL_BYTES", 0)
    monkeypatch.setattr(rows, "BLOCK_BYTES", 300)   # several blocks per field
    spilled, seen = run_toy(tmp_path / "spill", monkeypatch)
    assert len(seen) > 2 and max(len(s) for s in seen) > 10
    row = max(np.asarray(v).nbytes for s in seen for f in s for v in f.values()
              if not isinstance(v, LazyRow))
    assert all(held_bytes(s) <= budget + row for s in seen)
    assert any(isinstance(v, SpilledRow) for s in seen for f in s for v in f.values())
    assert tree_bytes(spilled) == tree_bytes(in_memory)


def test_earlier_rows_are_read_when_written_not_before(tmp_path, monkeypatch):
    (tmp_path / "inc").mkdir(), (tmp_path / "fresh").mkdir()
    run_toy(tmp_path / "inc", monkeypatch, drop={3, 17})
    out, seen = run_toy(tmp_path / "inc", monkeypatch)   # two shards rebuilt around 3 and 17
    assert seen and all(any(isinstance(v, StoredRow) for f in s for v in f.values())
                        for s in seen)
    fresh, _ = run_toy(tmp_path / "fresh", monkeypatch)
    assert tree_bytes(out) == tree_bytes(fresh)


def test_blockwise_dense_writes_equal_one_write_for_every_compression(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    records = [(i, f"k{i}", {"grid": rng.standard_normal((6, 40)).astype(np.float16),
                            "n": np.int64(i), "label": np.asarray(f"row {i}"),
                            **({"ragged": rng.random((i % 4 + 1,))} if i % 3 else {})})
               for i in range(50)]
    content = ShardContent([f"m{i}" for i in range(50)], [f"id{i}" for i in range(50)],
                           records, [(1, Failure("m1", "bad_image", "unreadable"))])
    for name, comp in [("none", {}), ("lzf", {"compression": "lzf"}),
                       ("gzip", {"compression": "gzip", "compression_opts": 4, "shuffle": True})]:
        monkeypatch.setattr(shards, "_chunks", lambda rows_, shape, size: (3, *shape))
        whole = tmp_path / f"{name}-whole.h5"
        write_shard(whole, content, comp)
        monkeypatch.setattr(rows, "BLOCK_BYTES", 1000)   # 2 rows a block: not whole chunks
        spill = rows.RowSpill(tmp_path, None, budget=0)
        monkeypatch.setattr(rows, "MIN_SPILL_BYTES", 0)
        lazy = ShardContent(content.members, content.member_ids,
                            [(m, k, spill.keep(f)) for m, k, f in records], content.failures)
        blocks = tmp_path / f"{name}-blocks.h5"
        write_shard(blocks, lazy, comp)
        spill.close()
        assert blocks.read_bytes() == whole.read_bytes(), name
        with ShardReader(whole) as r:   # and again from the shard file itself, lazily
            again = ShardContent(content.members, content.member_ids,
                                 [(m, k, f) for m in range(50) for k, f in r.lazy_records_of(m)],
                                 content.failures)
            write_shard(tmp_path / f"{name}-again.h5", again, comp)
        assert (tmp_path / f"{name}-again.h5").read_bytes() == whole.read_bytes(), name
        monkeypatch.setattr(rows, "BLOCK_BYTES", 8 << 20)
