"""The engine: batching across items, failures, writers, byte-determinism, resume after
SIGKILL, and torchrun sharding — all on a toy job run as a real subprocess."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from featcache.engine import EngineParams, WriterOptions, run_job


TOY = Path(__file__).with_name("engine_toy.py")
sys.path.insert(0, str(TOY.parent))
from engine_toy import ToyCompute, ToyJob  # noqa: E402


def run_toy(cwd: Path, out: str, writer: str = "hdf5", *args: str, torchrun: int = 0,
            wait: bool = True) -> subprocess.Popen | subprocess.CompletedProcess:
    cmd = [sys.executable, str(TOY), out, writer, *args]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={torchrun}", str(TOY), out, writer, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def tree_bytes(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {p.relative_to(path).as_posix(): p.read_bytes()
            for p in sorted(path.rglob("*")) if p.is_file()}


def run_inline(tmp_path: Path, writer: str, n: int = 40, bad: bool = False, batch_size: int = 7):
    compute = ToyCompute(0.0)
    os.chdir(tmp_path)
    out = tmp_path / ("out.h5" if writer.startswith("hdf5") else "out")
    result = run_job(ToyJob(n, bad), compute, stage="toy", out=out, writer=writer,
                     writer_options=WriterOptions(dtype="fp32"), provenance={"model": "toy"},
                     fingerprint={}, params=EngineParams(batch_size=batch_size, num_workers=0))
    return out, result, compute


def test_pieces_of_many_items_share_batches(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out, result, compute = run_inline(tmp_path, "hdf5", n=40)
    assert compute.calls[:-1] == [7] * (len(compute.calls) - 1)  # full batches across items
    assert sum(compute.calls) == 80 and result.records == 80 and result.failed == 0
    with h5py.File(out) as f:
        prov = json.loads(f.attrs["provenance"])
        assert prov["model"] == "toy" and prov["stage"] == "toy" and prov["layout"] == "hdf5"
        assert len(prov["code_version"]) == 64 and "numpy" in prov["libraries"]
        x = np.random.default_rng(3).standard_normal((3, 4, 4)).astype(np.float32)
        np.testing.assert_allclose(f["i003_a_feat"][()], x.flatten() * 0.5, rtol=1e-6)
        np.testing.assert_allclose(f["i003_b_sum"][()], -x.sum(), rtol=1e-5)


def test_failures_never_become_rows(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out, result, _ = run_inline(tmp_path, "hdf5_packed", n=40, bad=True)
    failed_items = {f.item for f in result.failures}
    assert failed_items == {"i005", "i022", "i039", "i006", "i023"}
    assert {f.error for f in result.failures} == {"ValueError", "empty_mask"}
    with h5py.File(out) as f:
        keys = [k.decode() for k in f["keys"][()]]
    assert not any(k.startswith(("i005", "i022", "i039")) for k in keys)
    assert "i006_a" in keys and "i006_b" not in keys  # the good part of a partly bad item stays
    assert len(keys) == len(set(keys)) == 80 - 3 * 2 - 2


@pytest.mark.parametrize("writer", ["hdf5", "hdf5_packed", "npy", "npz"])
def test_writers_round_trip_and_are_byte_deterministic(tmp_path, monkeypatch, writer):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    out_a, _, _ = run_inline(a, writer, n=20)
    time.sleep(1.1)  # a timestamp anywhere in the file would now differ
    out_b, _, _ = run_inline(b, writer, n=20)
    assert tree_bytes(out_a) == tree_bytes(out_b)
    field = {"npz": None}.get(writer, "feat")
    from featcache.reader import open_features

    feats = open_features(out_a, field=field) if field else open_features(out_a)
    assert len(feats) == 40
    x = np.random.default_rng(7).standard_normal((3, 4, 4)).astype(np.float32)
    got = feats["i007_b"] if field else feats["i007_b"]["feat"]
    np.testing.assert_allclose(got, -x.flatten() * 0.5, rtol=1e-6)


def test_scratch_is_removed_and_output_lands_whole(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out, _, _ = run_inline(tmp_path, "npz", n=10)
    assert not list((tmp_path / ".featcache" / "scratch").rglob("chunk_*"))
    assert sorted(p.name for p in out.iterdir())[:2] == ["i000_a.npz", "i000_b.npz"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("writer", ["hdf5", "npz"])
def test_sigkill_at_random_points_then_resume_equals_uninterrupted(tmp_path, writer):
    name = "out.h5" if writer == "hdf5" else "out"
    ref_dir, dir_ = tmp_path / "ref", tmp_path / "killed"
    ref_dir.mkdir(), dir_.mkdir()
    args = ("--items", "320", "--sleep", "0.05")
    assert run_toy(ref_dir, name, writer, *args).returncode == 0
    rng = random.Random(1234)
    for _ in range(4):
        seen = len(list(dir_.rglob("chunk_*.npz")))
        proc = run_toy(dir_, name, writer, *args, wait=False)
        deadline = time.monotonic() + 60
        while len(list(dir_.rglob("chunk_*.npz"))) <= seen and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.5))  # somewhere inside the next chunk, or its write
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (dir_ / name).exists()  # never a partial output at the output path
    chunks_before = list((dir_ / ".featcache").rglob("chunk_*.npz"))
    assert chunks_before, "the kills should have left finished chunks to resume from"
    done = run_toy(dir_, name, writer, *args)
    assert done.returncode == 0, done.stderr
    assert tree_bytes(dir_ / name) == tree_bytes(ref_dir / name)
    assert "resuming" in done.stderr


def test_torchrun_two_processes_equal_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    args = ("--items", "90", "--bad")
    r1 = run_toy(one, "out.h5", "hdf5_packed", *args)
    assert r1.returncode == 0, r1.stderr
    r2 = run_toy(two, "out.h5", "hdf5_packed", *args, torchrun=2)
    assert r2.returncode == 0, r2.stderr
    assert tree_bytes(one / "out.h5") == tree_bytes(two / "out.h5")
    assert (one / "failures.tsv").read_text() == (two / "failures.tsv").read_text()
    assert len((two / "failures.tsv").read_text().splitlines()) == 1 + 10


def test_optional_per_item_fields_reach_only_their_items(tmp_path, monkeypatch):
    import torch

    from featcache.engine import Piece

    class MaskJob:
        def items(self):
            return ["a", "b", "c"]

        def load(self, item):
            arrays = {"mask": np.full(2, ord(item), np.float32)} if item != "b" else {}
            return [Piece(item, torch.ones(3), arrays)]

    def compute(batch):
        return {"feat": batch.inputs.numpy() * 2, "mask": batch.arrays["mask"]}

    monkeypatch.chdir(tmp_path)
    run_job(MaskJob(), compute, stage="toy", out=tmp_path / "o", writer="npz",
            provenance={}, fingerprint={}, params=EngineParams(batch_size=3, num_workers=0))
    with np.load(tmp_path / "o" / "b.npz") as z:
        assert z.files == ["feat"]
    with np.load(tmp_path / "o" / "c.npz") as z:
        assert sorted(z.files) == ["feat", "mask"] and z["mask"][0] == ord("c")


def test_precision_fp32_on_cpu_by_default_and_on_request():
    import torch

    from featcache.engine.inference import autocast_for

    lin, x = torch.nn.Linear(4, 4), torch.ones(2, 4)
    cpu = torch.device("cpu")
    with autocast_for(cpu):
        assert lin(x).dtype == torch.float32
    with autocast_for(cpu, "bf16"):
        assert lin(x).dtype == torch.bfloat16
    with autocast_for(cpu, "fp32"):
        assert lin(x).dtype == torch.float32


def test_unknown_writer_name_is_refused_before_any_work(tmp_path, monkeypatch):
    from featcache.engine import get_writer

    with pytest.raises(KeyError, match="'zarr'.*hdf5, hdf5_packed, npy, npz"):
        get_writer("zarr")
    monkeypatch.chdir(tmp_path)
    compute = ToyCompute(0.0)
    with pytest.raises(KeyError, match="zarr"):
        run_job(ToyJob(5, False), compute, stage="toy", out=tmp_path / "o", writer="zarr",
                provenance={}, fingerprint={}, params=EngineParams(num_workers=0))
    assert compute.calls == [] and not (tmp_path / ".featcache").exists()


def test_a_piece_the_model_fails_on_is_one_failure_row(tmp_path, monkeypatch):
    class PickyCompute(ToyCompute):
        def __call__(self, batch):
            if "i004_b" in batch.keys:
                raise FloatingPointError("non-finite output for i004_b")
            return super().__call__(batch)

    monkeypatch.chdir(tmp_path)
    compute = PickyCompute(0.0)
    result = run_job(ToyJob(10, False), compute, stage="toy", out=tmp_path / "o.h5",
                     writer="hdf5", provenance={}, fingerprint={},
                     params=EngineParams(batch_size=4, num_workers=0))
    assert [(f.item, f.error) for f in result.failures] == [("i004_b", "FloatingPointError")]
    assert result.records == 19
    with h5py.File(tmp_path / "o.h5") as f:
        assert "i004_a_feat" in f and "i004_b_feat" not in f and "i005_a_feat" in f
