"""The training-side reader: round trips through every writer, missing keys, DataLoader workers."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import featcache
from featcache.engine import EngineParams, Piece, WriterOptions, run_job
from featcache.reader import FeatureDataset, FeatureStore, open_features

PROV = {"model": "toy", "grid": 3}


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)   # the engine's scratch area is relative to the working dir


def toy_records(n: int = 5) -> tuple[list[str], dict[str, list[np.ndarray]]]:
    rng = np.random.default_rng(0)
    keys = [str(139 + 7 * i) for i in range(n)]
    return keys, {"grids": [rng.standard_normal((9, 4)).astype(np.float32) for _ in keys],
                  "global": [rng.standard_normal(6).astype(np.float32) for _ in keys]}


class RecordsJob:
    """One item per key whose fields are the given arrays (a model-free engine job)."""

    def __init__(self, keys: list[str], arrays: dict[str, list]) -> None:
        self.keys, self.arrays = keys, arrays

    def items(self) -> list[str]:
        return list(self.keys)

    def signature(self, item: str) -> str:
        i = self.keys.index(item)
        return repr({f: np.asarray(v[i]).tobytes() for f, v in self.arrays.items()})

    def load(self, item: str) -> list[Piece]:
        i = self.keys.index(item)
        return [Piece(item, arrays={f: v[i] for f, v in self.arrays.items()})]


def write(path: Path, layout: str, keys: list[str], arrays: dict, **options: str) -> Path:
    """Write the records through the engine in ``layout`` (about two keys a shard); returns
    ``path``: the output folder, or for ``hdf5``/``hdf5_packed`` (``path`` ends in .h5) the
    view file beside it."""
    out = path.with_suffix("") if path.suffix == ".h5" else path
    run_job(RecordsJob(keys, arrays), None, stage="reader", out=out, writer=layout,
            writer_options=WriterOptions(**options), provenance=PROV, fingerprint={},
            params=EngineParams(num_workers=0, shard_mb=200 / 2**20), item_bytes=100)
    return path


@pytest.mark.parametrize("layout, name, read_as", [
    ("shards", "s", None), ("hdf5", "f.h5", None), ("hdf5_packed", "p.h5", None),
    ("npy", "npy_dir", "npy"), ("npy", "npy_dir", None)])
def test_round_trip_of_grids_and_global(tmp_path: Path, layout: str, name: str,
                                        read_as: str | None) -> None:
    keys, arrays = toy_records()
    path = write(tmp_path / name, layout, keys, arrays)
    for field in ("grids", "global"):
        store = open_features(path, field=field, layout=read_as)
        assert store.layout == (read_as or ("shards" if path.is_dir() else layout))
        assert set(store) == set(keys) and len(store) == len(keys)
        for key, value in zip(keys, arrays[field]):
            np.testing.assert_array_equal(store[key], value)
        assert store.provenance["model"] == "toy" and store.provenance["layout"] == layout
    assert len(list((path.with_suffix("") / "shards").iterdir())) >= 2


def test_default_fields(tmp_path: Path) -> None:
    keys, arrays = toy_records()
    assert open_features(write(tmp_path / "f.h5", "hdf5", keys, arrays)).field == "grids"
    assert open_features(write(tmp_path / "n", "npy", keys, arrays), layout="npy").field == \
        "grids"
    assert open_features(tmp_path / "n").field == "grids"
    packed = {"embeddings": arrays["global"],
              "image_id": [np.int64(k) for k in keys], "segment_id": [np.int64(1)] * 5}
    store = open_features(write(tmp_path / "p.h5", "hdf5_packed", keys, packed, dtype="fp16"))
    assert store.field == "embeddings" and store["146"].dtype == np.float16
    assert open_features(tmp_path / "p.h5", field="image_id")["146"] == 146
    assert open_features(write(tmp_path / "g.h5", "hdf5_packed", keys, arrays)).field == "grids"
    two = {"a": arrays["global"], "b": arrays["global"]}
    with pytest.raises(ValueError, match=r"holds fields \['a', 'b'\]; pass field="):
        open_features(write(tmp_path / "two.h5", "hdf5_packed", keys, two))
    assert open_features(tmp_path / "two").field is None   # shards: items are dicts
    assert sorted(open_features(tmp_path / "two")["139"]) == ["a", "b"]


def test_npz_items_are_dicts_and_the_suffix_is_stripped(tmp_path: Path) -> None:
    keys, arrays = toy_records()
    write(tmp_path / "sam", "npz", keys, arrays, suffix="_features")
    assert (tmp_path / "sam" / "139_features.npz").is_file()
    store = open_features(tmp_path / "sam", layout="npz")
    assert store.layout == "npz" and set(store) == set(keys)
    assert open_features(tmp_path / "sam").layout == "shards"   # the folder holds both
    item = store["146"]
    assert set(item) == {"grids", "global"}
    np.testing.assert_array_equal(item["global"], arrays["global"][1])
    np.testing.assert_array_equal(open_features(tmp_path / "sam", field="grids",
                                                layout="npz")[146], arrays["grids"][1])
    nested = ["scene0000_00/frame_0", "scene0000_00/frame_1", "scene0001_00/frame_0"]
    write(tmp_path / "uv", "npz", nested, {"uv": [np.zeros((2, 2))] * 3})
    assert sorted(open_features(tmp_path / "uv", layout="npz")) == nested
    assert sorted(open_features(tmp_path / "uv")) == nested


def test_missing_key_raises_naming_key_and_file(tmp_path: Path) -> None:
    keys, arrays = toy_records()
    for path in (write(tmp_path / "f.h5", "hdf5", keys, arrays),
                 write(tmp_path / "p.h5", "hdf5_packed", keys, arrays),
                 write(tmp_path / "n", "npy", keys, arrays),
                 write(tmp_path / "z", "npz", keys, arrays), tmp_path / "z"):
        store = open_features(path, field="grids")
        with pytest.raises(KeyError, match=f"'999' is not in {path}"):
            store[999]
        assert 999 not in store and 139 in store and store.get("999") is None


def test_store_is_read_only_and_int_keys_work(tmp_path: Path) -> None:
    keys, arrays = toy_records()
    store = open_features(write(tmp_path / "f.h5", "hdf5", keys, arrays))
    with pytest.raises(TypeError):
        store["139"] = np.zeros(3)  # type: ignore[index]
    np.testing.assert_array_equal(store[139], store["139"])


def test_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing.h5"):
        open_features(tmp_path / "nothing.h5")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no index.h5"):
        open_features(tmp_path / "empty")


def test_pickled_store_reopens_its_file(tmp_path: Path) -> None:
    keys, arrays = toy_records()
    store = open_features(write(tmp_path / "f.h5", "hdf5", keys, arrays))
    store["139"]  # opens the handle in this process
    copy = pickle.loads(pickle.dumps(store))
    assert copy._file is None
    np.testing.assert_array_equal(copy["153"], arrays["grids"][2])
    store.close()


class _PidDataset(FeatureDataset):
    """Also reports which process read the item and which process opened the handle used."""

    def __getitem__(self, i: int) -> tuple[str, torch.Tensor, int, int]:
        key, tensor = super().__getitem__(i)
        return key, tensor, os.getpid(), self.store._pid or -1


@pytest.mark.parametrize("writer, name", [("shards", "s"), ("hdf5", "f.h5"),
                                          ("hdf5_packed", "p.h5")])
def test_dataset_in_a_dataloader_with_two_workers(tmp_path: Path, writer: str, name: str) -> None:
    keys, arrays = toy_records(12)
    path = write(tmp_path / name, writer, keys, arrays)
    dataset = _PidDataset(path, dtype=torch.float32)
    dataset[0]  # the parent holds an open handle when the workers fork
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=2, shuffle=False)
    seen: dict[str, torch.Tensor] = {}
    for batch_keys, batch, readers, openers in loader:
        assert batch.shape == (len(batch_keys), 9, 4) and batch.dtype == torch.float32
        assert torch.equal(readers, openers) and os.getpid() not in readers.tolist()
        seen.update(zip(batch_keys, batch))
    assert sorted(seen) == sorted(keys)
    for key, value in zip(keys, arrays["grids"]):
        np.testing.assert_array_equal(seen[key].numpy(), value)
    assert dataset.store._pid == os.getpid()  # the parent's handle is untouched
    np.testing.assert_array_equal(dataset[1][1].numpy(), arrays["grids"][1])


def test_dataset_checks_keys_and_npz_fields(tmp_path: Path) -> None:
    keys, arrays = toy_records()
    path = write(tmp_path / "f.h5", "hdf5", keys, arrays)
    subset = FeatureDataset(path, keys=[146, "139"], field="global")
    assert len(subset) == 2 and subset[0][0] == "146" and subset[0][1].shape == (6,)
    with pytest.raises(KeyError, match="not in"):
        FeatureDataset(path, keys=["139", "1"])
    two = {"a": arrays["global"], "b": arrays["global"]}
    with pytest.raises(ValueError, match="pass field="):   # items would be dicts
        FeatureDataset(write(tmp_path / "z", "npz", keys, two))
    assert isinstance(subset, torch.utils.data.Dataset)


def test_package_import_is_light_and_exports_the_reader() -> None:
    code = ("import sys, featcache; assert featcache.__version__ == '0.1.0'; "
            "assert 'torch' not in sys.modules and 'h5py' not in sys.modules; "
            "featcache.open_features; assert 'featcache.reader' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert featcache.open_features is open_features and featcache.FeatureStore is FeatureStore
