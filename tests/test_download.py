"""Download stage: resumable verified fetch, safe extraction, dataset routes, params, the stage.

A local HTTP server on 127.0.0.1 serves the files; it can ignore Range requests and drop the
connection after K bytes, and it records the Range header of every request.
"""

from __future__ import annotations

import hashlib
import io
import logging
import runpy
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from featcache.datasets.archives import ArchiveError, UnsafeArchiveError, extract
from featcache.datasets.downloads import ChecksumError, DownloadError, fetch, file_digests
from featcache.config import ParamError, SharedParams, build_dataclass
from featcache.stages.download import SOURCES, DownloadParams, run_download

STAGE = Path(__file__).resolve().parents[1] / "stages" / "download.py"


@dataclass
class ServerState:
    files: dict[str, bytes] = field(default_factory=dict)
    drops: list[int] = field(default_factory=list)  # per request: bytes sent before dropping
    ignore_range: bool = False
    no_length: bool = False   # send no Content-Length (the server closes to end the body)
    versions: list[bytes] = field(default_factory=list)   # per request: the file's bytes
    ranges: list[str | None] = field(default_factory=list)
    base: str = ""


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        state: ServerState = self.server.state  # type: ignore[attr-defined]
        state.ranges.append(self.headers.get("Range"))
        data = state.files.get(self.path)
        if data is not None and state.versions:
            data = state.versions.pop(0)
        if data is None:
            self.send_error(404)
            return
        start = 0
        if self.headers.get("Range") and not state.ignore_range:
            start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        if not state.no_length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = state.drops.pop(0) if state.drops else len(body)
        self.wfile.write(body[:cut])  # HTTP/1.0: the connection closes after the handler

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[ServerState]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.state = ServerState(base=f"http://127.0.0.1:{httpd.server_port}")  # type: ignore
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield httpd.state  # type: ignore[attr-defined]
    httpd.shutdown()
    httpd.server_close()


def _payload(n: int = 300_000) -> bytes:
    return bytes((i * 7919 + i // 251) % 256 for i in range(n))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- fetch


def test_resume_after_dropped_connection_uses_range(server: ServerState, tmp_path: Path) -> None:
    data = _payload()
    server.files["/w.bin"] = data
    server.drops = [100_000]
    dest = fetch(f"{server.base}/w.bin", tmp_path / "w.bin", _sha(data), retries=2, backoff_s=0)
    assert dest.read_bytes() == data
    assert server.ranges == [None, "bytes=100000-"]
    assert not (tmp_path / "w.bin.part").exists()


def test_resume_from_part_left_by_a_killed_run(server: ServerState, tmp_path: Path) -> None:
    data = _payload()
    server.files["/w.bin"] = data
    (tmp_path / "w.bin.part").write_bytes(data[:123_456])
    fetch(f"{server.base}/w.bin", tmp_path / "w.bin", _sha(data), retries=0)
    assert (tmp_path / "w.bin").read_bytes() == data
    assert server.ranges == ["bytes=123456-"]


def test_server_ignoring_range_restarts_from_zero(server: ServerState, tmp_path: Path) -> None:
    data = _payload()
    server.files["/w.bin"] = data
    server.ignore_range = True
    server.drops = [50_000, 70_000]
    fetch(f"{server.base}/w.bin", tmp_path / "w.bin", _sha(data), retries=3, backoff_s=0)
    assert (tmp_path / "w.bin").read_bytes() == data  # not the 50k prefix twice
    assert server.ranges == [None, "bytes=50000-", "bytes=70000-"]


def test_complete_part_gets_416_and_is_accepted(server: ServerState, tmp_path: Path) -> None:
    data = _payload(10_000)
    server.files["/w.bin"] = data
    (tmp_path / "w.bin.part").write_bytes(data)
    fetch(f"{server.base}/w.bin", tmp_path / "w.bin", _sha(data), retries=0)
    assert (tmp_path / "w.bin").read_bytes() == data


def test_checksum_mismatch_leaves_nothing(server: ServerState, tmp_path: Path) -> None:
    server.files["/w.bin"] = _payload(5000)
    url, wrong = f"{server.base}/w.bin", "0" * 64
    with pytest.raises(ChecksumError) as info:
        fetch(url, tmp_path / "w.bin", wrong, retries=0)
    message = str(info.value)
    assert url in message and wrong in message and _sha(_payload(5000)) in message
    assert list(tmp_path.iterdir()) == []


def test_md5_is_verified(server: ServerState, tmp_path: Path) -> None:
    data = _payload(5000)
    server.files["/w.bin"] = data
    fetch(f"{server.base}/w.bin", tmp_path / "a.bin", md5=hashlib.md5(data).hexdigest())
    with pytest.raises(ChecksumError, match="md5"):
        fetch(f"{server.base}/w.bin", tmp_path / "b.bin", md5="f" * 32)
    assert (tmp_path / "a.bin").exists() and not (tmp_path / "b.bin").exists()


def test_unknown_checksum_is_recorded_and_warned(server: ServerState, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    data = _payload(5000)
    server.files["/w.bin"] = data
    with caplog.at_level(logging.WARNING):
        dest = fetch(f"{server.base}/w.bin", tmp_path / "w.bin")
    assert (tmp_path / "w.bin.sha256").read_text() == f"{_sha(data)}  w.bin\n"
    assert "no published checksum" in caplog.text
    fetch(f"{server.base}/w.bin", dest)  # verified against the sidecar: no request
    assert len(server.ranges) == 1
    dest.write_bytes(b"tampered")
    fetch(f"{server.base}/w.bin", dest)  # sidecar mismatch: downloaded again
    assert dest.read_bytes() == data and len(server.ranges) == 2


def test_gives_up_after_retries_and_keeps_part(server: ServerState, tmp_path: Path) -> None:
    server.files["/w.bin"] = _payload(50_000)
    server.drops = [1000] * 10
    with pytest.raises(DownloadError, match="giving up after 3 attempts"):
        fetch(f"{server.base}/w.bin", tmp_path / "w.bin", retries=2, backoff_s=0)
    assert not (tmp_path / "w.bin").exists()
    assert (tmp_path / "w.bin.part").stat().st_size == 3000
    assert server.ranges == [None, "bytes=1000-", "bytes=2000-"]


def test_http_404_is_not_retried(server: ServerState, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="404"):
        fetch(f"{server.base}/missing", tmp_path / "m.bin", retries=5, backoff_s=0)
    assert len(server.ranges) == 1


# ---------------------------------------------------------------- extract


def _zip(path: Path, members: dict[str, bytes], symlink: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.create_system = 3
            info.external_attr = 0o120777 << 16
            zf.writestr(info, "/etc/passwd")
    return path


def _tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tf.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tf.addfile(info, io.BytesIO(m[1]))
    return path


def _special(name: str, kind: bytes, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


def _snapshot(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def test_good_zip_and_tar_extract_and_merge(tmp_path: Path) -> None:
    target = tmp_path / "out"
    z = _zip(tmp_path / "a.zip", {"val/1.jpg": b"one", "val/sub/2.jpg": b"two", "./top.txt": b"t"})
    t = _tar(tmp_path / "b.tar.gz", [("./val/3.jpg", b"three"), ("ann/x.json", b"{}")])
    assert sorted(p.name for p in extract(z, target)) == ["1.jpg", "2.jpg", "top.txt"]
    extract(t, target)
    assert (target / "val/sub/2.jpg").read_bytes() == b"two"
    assert (target / "val/3.jpg").read_bytes() == b"three"
    assert _snapshot(target) == {"val", "val/1.jpg", "val/sub", "val/sub/2.jpg", "top.txt",
                                 "val/3.jpg", "ann", "ann/x.json"}


@pytest.mark.parametrize("name", ["../evil.txt", "a/../../evil.txt", "/tmp/abs_evil.txt",
                                  "..\\evil.txt", "C:/evil.txt"])
def test_zip_escaping_members_are_refused(tmp_path: Path, name: str) -> None:
    archive = _zip(tmp_path / "bad.zip", {"ok.txt": b"fine", name: b"evil"})
    before = _snapshot(tmp_path)
    with pytest.raises(UnsafeArchiveError, match="refusing"):
        extract(archive, tmp_path / "out")
    assert _snapshot(tmp_path) - before <= {"out"}
    assert list((tmp_path / "out").iterdir()) == []


def test_zip_symlink_is_refused(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "bad.zip", {"ok.txt": b"fine"}, symlink="link")
    with pytest.raises(UnsafeArchiveError, match="symbolic link"):
        extract(archive, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("member,reason", [
    (_special("link", tarfile.SYMTYPE, "/etc/passwd"), "symbolic link"),
    (_special("hard", tarfile.LNKTYPE, "ok.txt"), "hard link"),
    (_special("dev", tarfile.CHRTYPE), "device"),
    (_special("fifo", tarfile.FIFOTYPE), "device"),
    (("../evil.txt", b"evil"), "'..'"),
    (("/abs_evil.txt", b"evil"), "absolute"),
])
def test_tar_unsafe_members_are_refused(tmp_path: Path, member: Any, reason: str) -> None:
    archive = _tar(tmp_path / "bad.tar.gz", [("ok.txt", b"fine"), member, ("after.txt", b"x")])
    before = _snapshot(tmp_path)
    with pytest.raises(UnsafeArchiveError, match=reason):
        extract(archive, tmp_path / "out")
    assert _snapshot(tmp_path) - before <= {"out"}
    assert list((tmp_path / "out").iterdir()) == []


def test_symlinked_folder_in_target_is_not_followed(tmp_path: Path) -> None:
    outside, target = tmp_path / "outside", tmp_path / "out"
    outside.mkdir()
    target.mkdir()
    (target / "val").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafeArchiveError, match="outside"):
        extract(_zip(tmp_path / "a.zip", {"val/1.jpg": b"x"}), target)
    assert list(outside.iterdir()) == []


def test_not_an_archive_and_corrupt_archives(tmp_path: Path) -> None:
    (tmp_path / "x.bin").write_bytes(b"hello")
    with pytest.raises(ArchiveError, match="not a zip or tar"):
        extract(tmp_path / "x.bin", tmp_path / "out")
    good = _zip(tmp_path / "a.zip", {"a.txt": b"x" * 1000}).read_bytes()
    (tmp_path / "cut.zip").write_bytes(good[: len(good) // 2])
    good_tar = _tar(tmp_path / "a.tar.gz", [("a.txt", bytes(range(256)) * 400)]).read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(good_tar[: len(good_tar) // 2])
    for name in ("cut.zip", "cut.tar.gz"):
        with pytest.raises(ArchiveError, match="corrupt or truncated"):
            extract(tmp_path / name, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


# ---------------------------------------------------------------- params


def _params(**values: Any) -> DownloadParams:
    return build_dataclass(DownloadParams, values, "download")


@pytest.mark.parametrize("values,key", [
    ({"dataset": "imagenet"}, "download.dataset"),
    ({"coco": {"parts": ["val2018"]}}, "download.coco.parts"),
    ({"weights": ["nope"]}, "download.weights"),
    ({"sources": {"x": {"url": "ftp://a/b", "sha256": None}}}, "download.sources.x.url"),
    ({"sources": {"x": {"url": "http://a/b", "sha256": "abc"}}}, "download.sources.x.sha256"),
    ({"sources": {"x": {"url": "http://a/b", "filename": "../b"}}}, "download.sources.x.filename"),
    ({"dataset": "sa1b", "sa1b": {"links": "missing.tsv"}}, "download.sa1b.links"),
    ({"dataset": "scannet", "scannet": {"path": "nowhere"}}, "download.scannet.path"),
    ({"retries": -1}, "download.retries"),
    ({"colour": 1}, "download.colour"),
])
def test_bad_params_name_the_key(values: dict, key: str) -> None:
    with pytest.raises(ParamError) as info:
        _params(**values)
    assert str(info.value).startswith(key), str(info.value)
    if key == "download.dataset":
        assert all(name in str(info.value) for name in ("sample", "coco", "sa1b", "scannet"))


def test_source_table_is_well_formed() -> None:
    for name, src in SOURCES.items():
        assert src.url.startswith(("http://", "https://")), name
        assert src.sha256 is None or len(src.sha256) == 64
        assert src.md5 is None or len(src.md5) == 32
        assert src.checksum_origin
    assert SOURCES["ViT-B-16/openai"].sha256 in SOURCES["ViT-B-16/openai"].url
    assert SOURCES["sam2.1_hiera_tiny"].url.startswith(
        "https://dl.fbaipublicfiles.com/segment_anything_2/092824/")


# ---------------------------------------------------------------- dataset routes


def _zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_coco_route_unpacks_images_and_nested_panoptic_zip(server: ServerState,
                                                           tmp_path: Path) -> None:
    images = _zip_bytes({"val2017/000000000139.jpg": b"jpg"})
    nested = _zip_bytes({"panoptic_val2017/000000000139.png": b"png"})
    panoptic = _zip_bytes({"annotations/panoptic_val2017.json": b"{}",
                           "annotations/panoptic_val2017.zip": nested})
    server.files.update({"/val2017.zip": images, "/panoptic.zip": panoptic})
    params = _params(dataset="coco", out=str(tmp_path / "raw"), cache_dir=str(tmp_path / "c"),
                     keep_archives=False, sources={
                         "coco/val2017": {"url": f"{server.base}/val2017.zip",
                                          "sha256": _sha(images)},
                         "coco/panoptic_annotations": {"url": f"{server.base}/panoptic.zip",
                                                       "md5": hashlib.md5(panoptic).hexdigest()}})
    summary = run_download(SharedParams(), params)
    coco = tmp_path / "raw" / "coco"
    assert (coco / "val2017/000000000139.jpg").read_bytes() == b"jpg"
    assert (coco / "annotations/panoptic_val2017/000000000139.png").read_bytes() == b"png"
    assert (coco / "annotations/panoptic_val2017.json").exists()
    assert not (coco / "annotations/panoptic_val2017.zip").exists()
    assert summary["files"] == 3
    assert not list((tmp_path / "c").rglob("*.zip"))  # keep_archives: false


def _tar_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_sa1b_route_reads_links_and_respects_max_files(server: ServerState,
                                                       tmp_path: Path) -> None:
    for k in range(3):
        server.files[f"/sa_{k:06d}.tar?sig=x"] = _tar_bytes({f"sa_{k}.jpg": b"j",
                                                              f"sa_{k}.json": b"{}"})
    links = tmp_path / "links.tsv"
    links.write_text("file_name\tcdn_link\n" + "".join(
        f"sa_{k:06d}.tar\t{server.base}/sa_{k:06d}.tar?sig=x\n" for k in range(3)))
    params = _params(dataset="sa1b", out=str(tmp_path / "raw"), cache_dir=str(tmp_path / "c"),
                     sa1b={"links": str(links), "max_files": 2})
    run_download(SharedParams(), params)
    assert sorted(p.name for p in (tmp_path / "raw/sa1b").iterdir()) == [
        "sa_0.jpg", "sa_0.json", "sa_1.jpg", "sa_1.json"]
    assert len(server.ranges) == 2
    links.write_text("file_name\tcdn_link\nsa_000000.tar\tnot-a-url\n")
    with pytest.raises(ParamError, match="download.sa1b.links: .*line 2"):
        _params(dataset="sa1b", sa1b={"links": str(links)})


def _fake_scannet(root: Path, scenes: list[str], skip: str = "") -> Path:
    for scene in scenes:
        d = root / "scans" / scene
        for sub in ("color", "depth", "pose", "intrinsic"):
            if sub != skip:
                (d / sub).mkdir(parents=True)
        (d / "intrinsic").mkdir(exist_ok=True)
        (d / "intrinsic/intrinsic_color.txt").write_text("1 0 0 0\n")
        (d / f"{scene}_vh_clean_2.ply").write_bytes(b"ply\n")
    return root


@pytest.mark.parametrize("link", ["symlink", "copy"])
def test_scannet_route_links_validated_scenes(tmp_path: Path, link: str) -> None:
    src = _fake_scannet(tmp_path / "ScanNet", ["scene0000_00", "scene0707_00"])
    params = _params(dataset="scannet", out=str(tmp_path / "raw"),
                     scannet={"path": str(src), "link": link})
    run_download(SharedParams(), params)
    out = tmp_path / "raw/scannet"
    assert (out / "scannetv2_sample.txt").read_text().split() == ["scene0000_00", "scene0707_00"]
    scene = out / "scans/scene0707_00"
    assert scene.is_symlink() == (link == "symlink")
    assert (scene / "intrinsic/intrinsic_color.txt").read_text() == "1 0 0 0\n"


def test_scannet_without_exported_frames_is_a_param_error(tmp_path: Path) -> None:
    src = _fake_scannet(tmp_path / "ScanNet", ["scene0000_00"], skip="color")
    with pytest.raises(ParamError, match="download.scannet.path: .*lacks color.*SensReader"):
        _params(dataset="scannet", scannet={"path": str(src)})
    with pytest.raises(ParamError, match="download.scannet.scenes"):
        _params(dataset="scannet", scannet={"path": str(src), "scenes": ["scene0001_00"]})


def test_weights_are_fetched_into_weights_dir(server: ServerState, tmp_path: Path) -> None:
    data = _payload(2000)
    server.files["/ckpt.pt"] = data
    params = _params(dataset="scannet", out=str(tmp_path / "raw"),
                     scannet={"path": str(_fake_scannet(tmp_path / "S", ["scene0000_00"]))},
                     weights=["mine"],
                     sources={"mine": {"url": f"{server.base}/ckpt.pt", "sha256": _sha(data),
                                       "filename": "sub/mine.pt"}})
    summary = run_download(SharedParams(weights_dir=str(tmp_path / "weights")), params)
    assert summary["weights"] == [str(tmp_path / "weights/sub/mine.pt")]
    assert file_digests(tmp_path / "weights/sub/mine.pt")["sha256"] == _sha(data)


# ---------------------------------------------------------------- the stage script


def _run_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, section: dict) -> int:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"seed": 5, "download": section}))
    monkeypatch.chdir(tmp_path)
    try:
        runpy.run_path(str(STAGE), run_name="__main__")
    except SystemExit as e:
        return int(e.code)
    return 0


def test_stage_writes_the_sample(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _run_stage(tmp_path, monkeypatch, {"dataset": "sample", "out": "data/raw/s"}) == 0
    manifest = yaml.safe_load((tmp_path / "data/raw/s/MANIFEST.json").read_text())
    assert manifest["seed"] == 5
    assert (tmp_path / "data/raw/s/coco/annotations/panoptic_val2017.json").exists()


def test_stage_bad_param_exits_2_before_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    assert _run_stage(tmp_path, monkeypatch, {"dataset": "mnist", "out": "data/raw/s"}) == 2
    assert "download.dataset" in caplog.text
    assert not (tmp_path / "data").exists()
