"""The engine: shards (membership, batching inside a shard, reuse, incremental runs, resume
after SIGKILL, torchrun and shard ranges), failures and layouts, on a toy job run as a real
subprocess or inline."""

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
from featcache.engine.shards import plan_shards, read_index
from featcache.reader import open_features

TOY = Path(__file__).with_name("engine_toy.py")
sys.path.insert(0, str(TOY.parent))
from engine_toy import ITEM_BYTES, ToyCompute, ToyJob  # noqa: E402


def run_toy(cwd: Path, out: str, layout: str = "shards", *args: str, torchrun: int = 0,
            wait: bool = True, env: dict[str, str] | None = None,
            ) -> subprocess.Popen | subprocess.CompletedProcess:
    cmd = [sys.executable, str(TOY), out, layout, *args]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={torchrun}", str(TOY), out, layout, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def tree_bytes(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {p.relative_to(path).as_posix(): p.read_bytes()
            for p in sorted(path.rglob("*")) if p.is_file()}


def metrics(cwd: Path) -> dict:
    return json.loads((cwd / "metrics" / "toy.json").read_text())


def run_inline(tmp_path: Path, layout: str = "shards", n: int = 40, bad: bool = False,
               batch_size: int = 7, shard_mb: float = 0.01, drop=frozenset(), compute=None):
    compute = compute or ToyCompute(0.0)
    out = tmp_path / "out"
    result = run_job(ToyJob(n, bad, frozenset(drop)), compute, stage="toy", out=out,
                     writer=layout, writer_options=WriterOptions(dtype="fp32"),
                     provenance={"model": "toy"}, fingerprint={},
                     params=EngineParams(batch_size=batch_size, num_workers=0,
                                         shard_mb=shard_mb), item_bytes=ITEM_BYTES)
    return out, result, compute


def shard_of(out: Path) -> dict[str, int]:
    keys, shard, _, _, _ = read_index(out)
    return dict(zip(keys, shard.tolist()))


def test_membership_is_local_when_items_are_added_or_removed():
    items = [f"img{i:05d}" for i in range(5000)]
    base = plan_shards(items, 50)
    assert 60 < len(base) < 150 and max(map(len, base)) <= 200
    rng = random.Random(0)
    added = sorted(items + [f"img{i:05d}x" for i in rng.sample(range(5000), 50)])  # +1%
    grown = plan_shards(added, 50)
    unchanged = {tuple(s) for s in base} & {tuple(s) for s in grown}
    assert len(unchanged) >= len(base) - 2 * 50   # at most the shards the new items fall in
    removed = [x for x in items if x not in set(rng.sample(items, 50))]
    assert len({tuple(s) for s in base} & {tuple(s) for s in plan_shards(removed, 50)}) \
        >= len(base) - 2 * 50


def test_batches_never_span_shards_and_have_one_shape(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out, result, compute = run_inline(tmp_path, n=40)
    where = shard_of(out)
    assert result.shards > 2 and result.records == 80 and result.failed == 0
    assert set(compute.calls) == {7}   # every batch padded to batch_size
    for keys in compute.batches:
        assert len({where[k] for k in keys}) == 1
    feats = open_features(out, field="feat")
    x = np.random.default_rng(3).standard_normal((3, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(feats["i003_a"], x.flatten() * 0.5, rtol=1e-6)
    prov = feats.provenance
    assert prov["model"] == "toy" and prov["stage"] == "toy" and prov["layout"] == "shards"
    assert len(prov["code_version"]) == 64 and "numpy" in prov["libraries"]


def test_failures_never_become_rows(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out, result, _ = run_inline(tmp_path, n=40, bad=True)
    assert {f.item for f in result.failures} == {"i005", "i022", "i039", "i006", "i023"}
    assert {f.error for f in result.failures} == {"unexpected_error", "empty_mask"}
    assert {f.message for f in result.failures if f.error == "unexpected_error"} == {
        f"ValueError: corrupt input i{i:03d}" for i in (5, 22, 39)}   # the type stays readable
    keys = list(open_features(out))
    assert not any(k.startswith(("i005", "i022", "i039")) for k in keys)
    assert "i006_a" in keys and "i006_b" not in keys  # the good part of a partly bad item stays
    assert len(keys) == len(set(keys)) == 80 - 3 * 2 - 2


@pytest.mark.parametrize("layout", ["shards", "hdf5", "hdf5_packed", "npy", "npz"])
def test_layouts_round_trip_and_are_byte_deterministic(tmp_path, monkeypatch, layout):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    monkeypatch.chdir(a)
    run_inline(a, layout, n=20)
    time.sleep(1.1)  # a timestamp anywhere in a file would now differ
    monkeypatch.chdir(b)
    run_inline(b, layout, n=20)
    files = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file()
                   and ".featcache" not in p.parts)
    assert files and all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    x = np.random.default_rng(7).standard_normal((3, 4, 4)).astype(np.float32)
    paths = {"hdf5": a / "out.h5", "hdf5_packed": a / "out.h5"}
    for path in {a / "out", paths.get(layout, a / "out")}:
        feats = open_features(path, field="feat")
        assert len(feats) == 40
        np.testing.assert_allclose(feats["i007_b"], -x.flatten() * 0.5, rtol=1e-6)
    if layout == "hdf5":   # the FSGR seed's reader, unchanged: one dataset per key, no copy
        with h5py.File(a / "out.h5") as f:
            np.testing.assert_allclose(f["i007_b_feat"][()], -x.flatten() * 0.5, rtol=1e-6)
            assert all(f[name].is_virtual for name in f)   # no feature byte copied
    if layout == "npz":
        with np.load(a / "out" / "i007_b.npz") as z:
            assert sorted(z.files) == ["feat", "sum"]


def test_output_lands_whole_and_scratch_is_emptied(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out, result, _ = run_inline(tmp_path, n=10)
    assert not list((tmp_path / ".featcache" / "scratch").rglob("*.h5"))
    assert sorted(p.name for p in out.iterdir()) == ["index.h5", "shards"]
    assert len(list((out / "shards").iterdir())) == result.shards
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_incremental_runs_compute_only_new_items_and_equal_a_fresh_run(tmp_path, monkeypatch):
    inc, fresh = tmp_path / "inc", tmp_path / "fresh"
    inc.mkdir(), fresh.mkdir()
    drop = {3, 17, 18, 44}
    monkeypatch.chdir(inc)
    _, first, _ = run_inline(inc, n=60, drop=drop)
    assert (first.computed, first.reused) == (56, 0)
    _, again, _ = run_inline(inc, n=60, drop=drop)
    assert (again.computed, again.reused) == (0, 56)
    out, added, compute = run_inline(inc, n=60)      # the 4 dropped items come back
    assert (added.computed, added.reused) == (4, 56)
    assert sum(len(k) for k in compute.batches) == 8  # 4 items x 2 pieces: nothing else ran
    monkeypatch.chdir(fresh)
    fresh_out, _, _ = run_inline(fresh, n=60)
    assert tree_bytes(out) == tree_bytes(fresh_out)
    monkeypatch.chdir(inc)
    out, removed, compute = run_inline(inc, n=60, drop={10, 30})
    assert removed.computed == 0 and compute.batches == []
    monkeypatch.chdir(fresh)
    fresh_out, _, _ = run_inline(fresh, n=60, drop={10, 30})
    assert tree_bytes(out) == tree_bytes(fresh_out)


@pytest.mark.parametrize("layout, workers", [("shards", 0), ("npz", 0), ("shards", 1)])
def test_sigkill_at_random_points_then_resume_equals_uninterrupted(tmp_path, layout, workers):
    """With workers, the shards are written by the writer process (featcache.engine.sinks)."""
    ref_dir, dir_ = tmp_path / "ref", tmp_path / "killed"
    ref_dir.mkdir(), dir_.mkdir()
    args = ("--items", "320", "--sleep", "0.05", "--workers", str(workers))
    assert run_toy(ref_dir, "out", layout, *args).returncode == 0
    scratch = dir_ / ".featcache" / "scratch" / "toy"
    rng = random.Random(1234)
    for _ in range(4):
        seen = len(list(scratch.glob("*.h5")))
        proc = run_toy(dir_, "out", layout, *args, wait=False)
        deadline = time.monotonic() + 60
        while len(list(scratch.glob("*.h5"))) <= seen and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.5))  # somewhere inside the next shard, or its write
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (dir_ / "out").exists()  # never a partial output at the output path
    assert list(scratch.glob("*.h5")), "the kills should have left finished shards"
    done = run_toy(dir_, "out", layout, *args)
    assert done.returncode == 0, done.stderr
    assert tree_bytes(dir_ / "out") == tree_bytes(ref_dir / "out")
    m = metrics(dir_)
    assert m["reused"] > 0 and m["computed"] + m["reused"] == 320


def test_torchrun_two_processes_equal_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    args = ("--items", "90", "--bad")
    r1 = run_toy(one, "out", "hdf5_packed", *args)
    assert r1.returncode == 0, r1.stderr
    r2 = run_toy(two, "out", "hdf5_packed", *args, torchrun=2)
    assert r2.returncode == 0, r2.stderr
    assert tree_bytes(one / "out") == tree_bytes(two / "out")
    assert tree_bytes(one / "out.h5") == tree_bytes(two / "out.h5")
    assert (one / "failures.tsv").read_text() == (two / "failures.tsv").read_text()
    assert len((two / "failures.tsv").read_text().splitlines()) == 1 + 10
    assert metrics(two)["computed"] == 90   # both ranks' items are counted


def test_shard_ranges_compute_alone_and_a_final_run_only_moves_them(tmp_path):
    ref, split = tmp_path / "ref", tmp_path / "split"
    ref.mkdir(), split.mkdir()
    args = ("--items", "80")
    assert run_toy(ref, "out", "shards", *args).returncode == 0
    for k in range(3):   # three array tasks, any order, no barrier between them
        r = run_toy(split, "out", "shards", *args, env={"FEATCACHE_SHARDS": f"{2 - k}/3"})
        assert r.returncode == 0, r.stderr
        assert not (split / "out").exists() and not (split / "metrics").exists()
    final = run_toy(split, "out", "shards", *args)
    assert final.returncode == 0, final.stderr
    assert metrics(split)["computed"] == 0 and metrics(split)["reused"] == 80
    assert tree_bytes(split / "out") == tree_bytes(ref / "out")
    bad = run_toy(split, "out", "shards", *args, env={"FEATCACHE_SHARDS": "3/3"})
    assert bad.returncode != 0 and "need 0 <= k < n" in bad.stderr


def test_optional_per_item_fields_reach_only_their_items(tmp_path, monkeypatch):
    import torch

    from featcache.engine import Piece

    class MaskJob:
        def items(self):
            return ["a", "b", "c"]

        def signature(self, item):
            return item

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
    store = open_features(tmp_path / "o")
    assert sorted(store["b"]) == ["feat"] and store["c"]["mask"][0] == ord("c")


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


def test_unknown_layout_is_refused_before_any_work(tmp_path, monkeypatch):
    from featcache.engine import get_view

    with pytest.raises(KeyError, match="'zarr'.*shards, hdf5, hdf5_packed, npy, npz"):
        get_view("zarr")
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
    out, result, _ = run_inline(tmp_path, n=10, batch_size=4, compute=PickyCompute(0.0))
    assert [(f.item, f.error) for f in result.failures] == [("i004_b", "compute_error")]
    assert result.failures[0].message == "FloatingPointError: non-finite output for i004_b"
    assert result.records == 19
    feats = open_features(out, field="feat")
    assert "i004_a" in feats and "i004_b" not in feats and "i005_a" in feats
