"""Faults: a full disk (a shard writer raising ENOSPC), a name too long, a hung item past the
item timeout, a refused code-carrying checkpoint, a missing checkpoint path. Each ends as one
line (or one failure row), and a re-run after the fault loses no item. (Kills at random
points are in test_engine.py.)"""

from __future__ import annotations

import errno
import logging
import os
import time
from pathlib import Path

import pytest
import torch
from test_hardening import NamedJob

from featcache.encoders import resolve_spec
from featcache.encoders import weights as W
from featcache.engine import EngineParams, WriterOptions, atomic, finish_stage, run_job, sinks
from featcache.engine.cli import run_stage
from featcache.engine.types import Failure, Piece
from featcache.reader import open_features

KEYS = [f"k{i:02d}" for i in range(24)]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # restored after the test, even when it fails


def _stage(job, out: Path, layout: str = "npz", workers: int = 0):
    params = EngineParams(batch_size=4, num_workers=workers, max_failures=100, shard_mb=0.001,
                          metrics=str(out.parent / "metrics.json"))
    result = run_job(job, None, stage="faults", out=out, writer=layout,
                     writer_options=WriterOptions(suffix="_f"), provenance={"model": "none"},
                     fingerprint={}, params=params, item_bytes=256)
    finish_stage("faults", out.parent, [result], params)
    return result


def _exit_code(main) -> int:
    with pytest.raises(SystemExit) as exc:
        run_stage(main)
    return exc.value.code


def _errors(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


def _tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_disk_full_is_one_line_naming_the_path_and_a_rerun_loses_nothing(tmp_path, monkeypatch,
                                                                         caplog):
    _stage(NamedJob(KEYS), tmp_path / "ref" / "out")
    real, calls = sinks.write_shard, []

    def full_disk(path, content, compression):
        calls.append(path)
        if len(calls) == 3:   # like a real write(2): errno only, no file name
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, content, compression)

    monkeypatch.setattr(sinks, "write_shard", full_disk)
    assert _exit_code(lambda: _stage(NamedJob(KEYS), tmp_path / "run" / "out")) == 1
    (line,) = _errors(caplog)
    assert "disk full" in line.getMessage() and str(calls[2]) in line.getMessage()
    assert line.exc_info is None and not (tmp_path / "run" / "out").exists()
    monkeypatch.setattr(sinks, "write_shard", real)
    result = _stage(NamedJob(KEYS), tmp_path / "run" / "out")   # space freed: run again
    assert result.reused > 0 and result.failed == 0
    assert _tree(tmp_path / "run" / "out") == _tree(tmp_path / "ref" / "out")


def test_disk_full_in_a_per_item_file_names_the_file(tmp_path, monkeypatch, caplog):
    real = atomic.os.replace

    def full(src, dst):
        if str(dst).endswith("k05_f.npz"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", full)
    assert _exit_code(lambda: _stage(NamedJob(KEYS), tmp_path / "out")) == 1
    (line,) = _errors(caplog)
    assert "disk full" in line.getMessage() and "k05_f.npz" in line.getMessage()


def test_name_too_long_is_one_line_naming_the_path(tmp_path, caplog):
    out = tmp_path / ("n" * 256)
    assert _exit_code(lambda: _stage(NamedJob(KEYS[:2]), out)) == 1
    (line,) = _errors(caplog)
    assert "file name too long" in line.getMessage() and "n" * 256 in line.getMessage()


class HangingJob(NamedJob):
    def __init__(self, keys: list[str], woke: Path) -> None:
        super().__init__(keys)
        self.woke = woke

    def load(self, item: str) -> list[Piece | Failure]:
        if item == "k03":
            time.sleep(120)          # a hung read: interrupted by the item timeout
            self.woke.write_text("the hung read ran to its end")
        return super().load(item)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_hung_item_past_the_timeout_is_one_row(tmp_path, monkeypatch, workers):
    monkeypatch.setenv("FEATCACHE_ITEM_TIMEOUT_S", "0.5")
    woke = tmp_path / "woke"
    result = _stage(HangingJob(KEYS[:8], woke), tmp_path / "out", layout="shards",
                    workers=workers)
    assert not woke.exists()         # the read was interrupted, not waited for
    assert [(f.item, f.error) for f in result.failures] == [("k03", "item_timeout")]
    assert sorted(open_features(tmp_path / "out")) == [k for k in KEYS[:8] if k != "k03"]
    assert "k03" in (tmp_path / "failures.tsv").read_text()


class _Code:
    def __reduce__(self):
        return (os.system, ("echo this should never run",))


def test_refused_checkpoint_is_one_line_without_the_unsafe_advice(tmp_path, caplog):
    torch.save({"w": torch.zeros(2), "x": _Code()}, tmp_path / "evil.pt")
    for load in (lambda: W.load_state_dict_file(tmp_path / "evil.pt"),   # our loader
                 lambda: torch.load(tmp_path / "evil.pt", weights_only=True)):  # open_clip's
        caplog.clear()
        assert _exit_code(load) == 1
        (line,) = _errors(caplog)
        text = line.getMessage()
        assert "refused: not a plain tensor checkpoint" in text and "state_dict()" in text
        assert "weights_only" not in text and "\n" not in text and line.exc_info is None


def test_missing_checkpoint_path_exits_2_as_the_readme_says(tmp_path, caplog):
    assert _exit_code(lambda: resolve_spec("open_clip", "featcache-tiny-vit",
                                           weights=str(tmp_path / "nope.pt"))) == 2
    (line,) = _errors(caplog)
    assert "weights" in line.getMessage() and "nope.pt" in line.getMessage()
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert "checkpoint path that does not exist" in readme and "exit code 2" in readme
