"""Hardening: every legal name works, every bad one is one row, nothing escapes its folder.

Per-item layouts (npy, npz) with long, unicode, dotted and tab-holding keys and with keys whose
files would collide; temporary names near the 255-byte limit; scratch left by abandoned outputs.
Inputs are generated; the engine runs a model-free job inline.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from test_coco_panoptic import SplitBuilder, blocks
from test_download import ServerState, _payload, _sha, server  # noqa: F401 - the fixture

from featcache.config import ParamError, build_dataclass
from featcache.datasets import archives
from featcache.datasets.archives import UnsafeArchiveError, extract
from featcache.datasets.downloads import ChecksumError, fetch
from featcache.encoders import resolve_spec
from featcache.engine import EngineParams, WriterOptions, atomic, finish_stage, run_job
from featcache.engine.metrics import timing_path
from featcache.engine.types import Failure, Piece
from featcache.reader import open_features
from featcache.sample import generate_sample
from featcache.stages.download import read_sa1b_links
from featcache.stages.edge_maps_methodB import EdgeParams, run_edge_maps
from featcache.stages.extract_siglip import SiglipParams, build_siglip_job
from featcache.verify.checks import Report
from featcache.verify.npz_checks import check_edges

NAME_MAX = 255   # bytes per file name (ext4, xfs, btrfs, apfs, ...)


class NamedJob:
    """Items are the given keys; each gives ``grids`` and, for names listed in ``extra``,
    the extra fields (``global``, ``mask``): what the grid stages store per image."""

    def __init__(self, keys: list[str], extra: dict[str, tuple[str, ...]] | None = None) -> None:
        self.keys, self.extra = keys, extra or {}

    def items(self) -> list[str]:
        return list(self.keys)

    def signature(self, item: str) -> str:
        return f"named {item}"

    def load(self, item: str) -> list[Piece | Failure]:
        seed = sum(item.encode("utf-8", "surrogateescape"))
        arrays = {"grids": np.full((2, 3), seed, np.float32)}
        for field in self.extra.get(item, ()):
            arrays[field] = np.full((4,), seed + len(field), np.float32)
        return [Piece(item, None, arrays)]


def run_named(tmp_path: Path, keys: list[str], layout: str, extra=None, suffix: str = "",
              out: str = "out"):
    os.chdir(tmp_path)
    params = EngineParams(batch_size=4, num_workers=0, max_failures=1000, shard_mb=0.001)
    result = run_job(NamedJob(keys, extra), None, stage="named", out=tmp_path / out,
                     writer=layout, writer_options=WriterOptions(suffix=suffix),
                     provenance={"model": "none"}, fingerprint={}, params=params,
                     item_bytes=256)
    return result


@pytest.fixture(autouse=True)
def _keep_cwd():
    cwd = os.getcwd()
    yield
    os.chdir(cwd)


def failures_by_item(result) -> dict[str, str]:
    return {f.item: f.error for f in result.failures}


# ------------------------------------------------------------ names (point 1)


def test_long_names_write_and_over_long_ones_are_one_row(tmp_path):
    fits = "x" * (NAME_MAX - len("_edges.npz"))         # the final name is exactly 255 bytes
    near = "é" * 118 + "n"                                # 237 bytes of unicode
    over = "y" * (NAME_MAX - len("_edges.npz") + 1)       # 256 bytes: no filesystem takes it
    keys = ["a", fits, near, over, "with space", "sub/dir/leaf"]
    for run in range(2):   # a re-run must finish the same way (no crash, nothing left behind)
        result = run_named(tmp_path, keys, "npz", suffix="_edges")
        assert failures_by_item(result) == {over: "name_too_long"}, result.failures
        store = open_features(tmp_path / "out", layout="npz", suffix="_edges")
        assert sorted(store) == sorted(k for k in keys if k != over)
        assert store[fits]["grids"].shape == (2, 3)
        assert not [p for p in (tmp_path / "out").rglob("*.tmp")]
    # the shards keep every key, the over-long one included
    assert over in open_features(tmp_path / "out", field="grids")


def test_npy_layout_unicode_dots_and_tabs(tmp_path):
    keys = [".hidden", "ünï cödé", "z" * (NAME_MAX - len("_global.npy")), "tab\there",
            "new\nline", "../escape", "shards/x"]
    result = run_named(tmp_path, keys, "npy", extra={k: ("global",) for k in keys})
    assert failures_by_item(result) == {"tab\there": "bad_name", "new\nline": "bad_name",
                                        "../escape": "bad_name", "shards/x": "bad_name"}
    assert not (tmp_path / "escape.npy").exists() and not (tmp_path / "escape_global.npy").exists()
    grids = open_features(tmp_path / "out", layout="npy")
    assert sorted(grids) == sorted(keys[:3])        # index.tsv stays readable
    pooled = open_features(tmp_path / "out", layout="npy", field="global")
    for key in keys[:3]:
        assert grids[key].shape == (2, 3) and pooled[key].shape == (4,)


def test_temporary_names_never_exceed_the_limit(tmp_path):
    long = "t" * NAME_MAX
    assert len(os.fsencode(atomic.temp_prefix(long))) + 16 <= NAME_MAX
    atomic.write_text(tmp_path / long, "fine")                 # a 255-byte name, written atomically
    assert (tmp_path / long).read_text() == "fine"
    stale = tmp_path / f"{atomic.temp_prefix(long)}abc.tmp"
    stale.write_text("left by a killed run")
    assert atomic.stale_temps(tmp_path / long) == [stale]


# ------------------------------------------------------------ collisions (point 2)


def test_npy_collisions_are_rows_not_replacements(tmp_path):
    keys = ["b", "b_global", "c", "c_mask", "d", "d_mask"]
    extra = {"b": ("global",), "c": ("mask",)}    # d has no mask: d_mask.npy is d_mask's own
    result = run_named(tmp_path, keys, "npy", extra=extra)
    assert failures_by_item(result) == {k: "name_collision" for k in ("b", "b_global", "c",
                                                                      "c_mask")}
    grids = open_features(tmp_path / "out", layout="npy")
    assert sorted(grids) == ["d", "d_mask"]
    assert grids["d_mask"][0, 0] == sum(b"d_mask")    # its own grid, not another item's
    with pytest.raises(KeyError):
        open_features(tmp_path / "out", layout="npy", field="global")["b"]


def test_file_folder_collision_is_a_row(tmp_path):
    result = run_named(tmp_path, ["a", "a.npz/x"], "npz")
    assert failures_by_item(result) == {"a": "name_collision", "a.npz/x": "name_collision"}


# ------------------------------------------------------------ scratch (point 10)


def test_stage_run_drops_scratch_no_output_can_use(tmp_path):
    os.chdir(tmp_path)
    run_named(tmp_path, ["p", "q"], "shards", out="old")
    scratch = tmp_path / ".featcache" / "scratch" / "named"
    # an abandoned output's shards (renamed output, old params): left in scratch by a kill
    leftover = scratch / ("0" * 32 + ".h5")
    leftover.write_bytes(b"x" * 1000)
    (scratch / f".{leftover.name}.123.tmp").write_bytes(b"y" * 10)
    params = EngineParams(batch_size=4, num_workers=0, max_failures=0, shard_mb=0.001,
                          metrics=str(tmp_path / "m.json"))
    result = run_named(tmp_path, ["p", "q", "r"], "shards", out="new")
    finish_stage("named", tmp_path / "new", [result], params)
    assert not list(scratch.iterdir())
    # a size, not a result: beside the timings, outside the DVC metric
    assert json.loads(timing_path("named").read_text())["scratch_bytes"] == 0
    assert "scratch_bytes" not in json.loads((tmp_path / "m.json").read_text())


# ------------------------------------------------------------ COCO panoptic (points 3, 4)


def _coco_job(root: Path):
    params = SiglipParams(coco=str(root), split="val2017", out=str(root / "o"),
                          model="featcache-tiny-siglip", batch_size=4, num_workers=0)
    return build_siglip_job(params, resolve_spec("open_clip", "featcache-tiny-siglip",
                                                 weights="random"))


def test_coco_paths_escaping_the_dataset_are_rows_and_never_opened(tmp_path, monkeypatch):
    secret = tmp_path / "outside" / "secret.jpg"
    b = SplitBuilder(tmp_path / "coco")
    for i in range(1, 6):
        b.add(i, blocks())
    secret.parent.mkdir()
    secret.write_bytes((tmp_path / "coco" / "val2017" / "000000000001.jpg").read_bytes())
    b.images[1]["file_name"] = str(secret)                       # absolute image name
    b.annotations[2]["file_name"] = "../../outside/secret.png"    # PNG outside its folder
    b.images[3]["file_name"] = "..\\outside\\secret.jpg"          # backslash spelling
    b.write()
    opened: list[str] = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: (
        opened.append(str(f)), real_open(f, *a, **k))[1])
    job = _coco_job(tmp_path / "coco")
    rows = {}
    for item in job.items():
        job.signature(item)
        for r in job.load(item):
            if isinstance(r, Failure):
                rows[r.item] = r.error
    assert rows == {"000000000002": "unsafe_path", "000000000003": "unsafe_path",
                    "000000000004": "unsafe_path"}
    assert not [f for f in opened if "outside" in f]


@pytest.mark.parametrize("segment, field", [
    ({"bbox": ["1", "2", "3", "4"]}, "bbox"), ({"bbox": None}, "bbox"),
    ({"bbox": [[1, 2], [3, 4]]}, "bbox"), ({"bbox": [1, 2, float("nan"), 4]}, "bbox"),
    ({"category_id": "person"}, "category_id"), ({"area": [3]}, "area"),
    ({"iscrowd": "yes"}, "iscrowd")])
def test_coco_malformed_segment_fields_are_one_row(tmp_path, segment, field):
    b = SplitBuilder(tmp_path)
    b.add(1, blocks())
    ann = b.add(2, blocks())
    ann["segments_info"][0].update(segment)
    b.write()
    job = _coco_job(tmp_path)
    loaded = {item: job.load(item) for item in job.items()}
    failures = [(f.item, f.error) for out in loaded.values() for f in out
                if isinstance(f, Failure)]
    assert failures == [("000000000002_7", "bad_segment")], failures
    assert field in next(f.message for f in loaded["000000000002"] if isinstance(f, Failure))
    pieces = [p.key for out in loaded.values() for p in out if isinstance(p, Piece)]
    assert pieces == ["000000000001_7", "000000000001_300", "000000000002_300"]


@pytest.mark.parametrize("edit", [
    lambda im, ann: im.update(width=float("nan")), lambda im, ann: im.update(height="48"),
    lambda im, ann: ann.pop("segments_info"), lambda im, ann: ann.update(file_name=None),
    lambda im, ann: im.update(file_name=["a.jpg"]), lambda im, ann: ann.update(file_name="")])
def test_coco_malformed_image_fields_are_one_row(tmp_path, edit):
    b = SplitBuilder(tmp_path)
    b.add(1, blocks())
    ann = b.add(2, blocks())
    edit(b.images[1], ann)
    b.write()
    job = _coco_job(tmp_path)
    rows = [(f.item, f.error) for item in job.items() for f in job.load(item)
            if isinstance(f, Failure)]
    assert len(rows) == 1 and rows[0][0] == "000000000002", rows


@pytest.mark.parametrize("text", ['{"annotations": [', "[" * 100_000, "\xff\xfe"])
def test_coco_unparsable_json_is_one_error_naming_it(tmp_path, text):
    b = SplitBuilder(tmp_path)
    b.add(1, blocks())
    path = b.write()
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ParamError, match=r"panoptic_val2017\.json: not readable JSON"):
        _coco_job(tmp_path)


# ------------------------------------------------------------ downloads (point 8)


def test_download_without_length_is_complete_only_at_the_announced_size(server, tmp_path):  # noqa: F811
    """The SA-1B case: no checksum, no Content-Length, the server closes early."""
    data = _payload()
    server.files["/sa_0.tar"] = data
    server.no_length, server.drops = True, [1000, 5000]
    dest = fetch(f"{server.base}/sa_0.tar", tmp_path / "sa_0.tar", None, backoff_s=0)
    assert dest.read_bytes() == data
    assert (tmp_path / "sa_0.tar.sha256").read_text().split()[0] == _sha(data)
    assert server.ranges[1:] == ["bytes=1000-", "bytes=6000-"]


def test_download_checksum_mismatch_restarts_once_from_scratch(server, tmp_path):  # noqa: F811
    data = _payload()
    other = bytes(reversed(data))     # the first transfer joined another version of the file
    server.files["/w.pt"] = data
    server.versions, server.drops = [other, data, data], [1000]
    dest = fetch(f"{server.base}/w.pt", tmp_path / "w.pt", _sha(data), backoff_s=0)
    assert dest.read_bytes() == data
    assert server.ranges == [None, "bytes=1000-", None]    # resumed, then once from scratch
    server.versions, server.ranges = [other, other], []
    with pytest.raises(ChecksumError):
        fetch(f"{server.base}/w.pt", tmp_path / "x.pt", _sha(data), backoff_s=0)
    assert server.ranges == [None, None] and not list(tmp_path.glob("x.pt*"))


# ------------------------------------------------------------ archive bombs (point 5)


def test_archive_bombs_are_refused_before_anything_lands(tmp_path, monkeypatch):
    monkeypatch.setattr(archives, "MIN_BUDGET_BYTES", 0)   # the ratio alone decides
    zeros = bytes(8 << 20)
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ok.txt", b"small")
        zf.writestr("zeros.bin", zeros)                   # ~8 KB packed, 8 MiB unpacked
    tgz = tmp_path / "bomb.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        info = tarfile.TarInfo("zeros.bin")
        info.size = len(zeros)
        tf.addfile(info, io.BytesIO(zeros))
    many = tmp_path / "many.tar"
    with tarfile.open(many, "w") as tf:
        for i in range(30):
            info = tarfile.TarInfo(f"f{i}.txt")
            info.size = 1
            tf.addfile(info, io.BytesIO(b"x"))
    target = tmp_path / "target"
    for archive, kwargs, reason in ((bomb, {}, "unpacks to more than"),
                                    (tgz, {}, "unpacks to more than"),
                                    (many, {"max_members": 10}, "more than 10 members")):
        with pytest.raises(UnsafeArchiveError, match=reason):
            extract(archive, target, **kwargs)
        assert not [p for p in target.rglob("*")]      # nothing reached the target
    assert len(extract(many, target)) == 30           # within the default bounds: fine


@pytest.mark.parametrize("name", ["../sa_1.tar", "sub/sa_1.tar", "sa\\1.tar", ".sa_1.tar",
                                  "sa_1\x00.tar", "s" * 256, "sa_0.tar"])
def test_sa1b_links_names_must_stay_in_the_download_folder(tmp_path, name):
    links = tmp_path / "links.txt"
    links.write_text(f"file_name\tcdn_link\nsa_0.tar\thttps://x/0\n{name}\thttps://x/1\n")
    with pytest.raises(ParamError, match="sa1b.links.*line 3"):
        read_sa1b_links(str(links))


def test_verify_accepts_a_per_item_file_refused_for_its_name(tmp_path, monkeypatch):
    """layout npz: an image whose stem makes `<stem>_edges.npz` longer than a file name can
    be is one failures row and stays in the shards; verify's npz_view check accepts that
    and still checks every other file."""
    generate_sample(tmp_path / "raw", seed=0)
    sa1b = tmp_path / "raw" / "sa1b"
    first = sorted(sa1b.glob("*.jpg"))[0]
    long = "l" * (NAME_MAX - len("_edges.npz") + 5)           # the .jpg and .json still fit
    shutil.move(first, sa1b / f"{long}.jpg")
    shutil.move(first.with_suffix(".json"), sa1b / f"{long}.json")
    monkeypatch.chdir(tmp_path)
    params = build_dataclass(EdgeParams, {"sa1b": str(sa1b), "out": "edges", "layout": "npz",
                                          "num_workers": 0, "max_failures": 0.5},
                             prefix="edge_maps_methodB")
    result = run_edge_maps(params)
    assert [(f.item, f.error) for f in result.failures] == [(long, "name_too_long")]
    report = Report()
    check_edges(report, tmp_path / "edges")
    assert report.checks["edges.npz_view"].items == result.records - 1
    assert not report.failed, {n: report.checks[n].first_problems for n in report.failed}
    next(p for p in (tmp_path / "edges").glob("*_edges.npz")).unlink()   # still caught
    report = Report()
    check_edges(report, tmp_path / "edges")
    assert report.failed == ["edges.npz_view"]
