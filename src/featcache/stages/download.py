"""The ``download`` stage: the embedded sample, or real data and weights fetched safely.

``dataset: sample`` generates :mod:`featcache.sample` into ``out``. Real datasets land in
``<out>/<dataset>/`` with the same sub-layout as the sample (``coco/val2017``,
``coco/annotations/panoptic_val2017/``, ``sa1b/sa_<n>.jpg``, ``scannet/scans/<scene>/``), so the
other stages only need their ``data/raw/sample`` prefix changed:

- ``coco``: the ``coco.parts`` archives from :data:`SOURCES` (the panoptic PNG zips nested in
  ``panoptic_annotations`` are unpacked too);
- ``sa1b``: the first ``sa1b.max_files`` tars of the links file Meta sends (TSV with a
  ``file_name<TAB>cdn_link`` header);
- ``scannet``: a local, already exported ScanNet (``scannet.path``) is validated and linked or
  copied - its licence forbids redistribution, so there is nothing to download.

``weights`` fetches model files (from :data:`SOURCES` or ``sources``) into the top-level
``weights_dir``, which is always created (a DVC output the model stages depend on).
Transfers are done by :func:`featcache.datasets.downloads.fetch` (resumable, checksum-verified,
atomic) and unpacked by :func:`featcache.datasets.archives.extract` (refuses members escaping the
target).
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from featcache.config import SharedParams, require
from featcache.datasets.archives import extract
from featcache.datasets.downloads import fetch
from featcache.sample import generate_sample
from featcache.sample.scannet_scenes import SCENE_LIST

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    """A file we know how to fetch; ``checksum_origin`` says who published the checksum."""

    url: str
    filename: str  # relative path under the destination folder
    sha256: str | None = None
    md5: str | None = None
    checksum_origin: str = "none: sha256 recorded on first download (<file>.sha256)"


_COCO = "http://images.cocodataset.org"
_COCO_MD5 = ("md5 not published by cocodataset.org; the value used by several downloaders "
             "(pytorchcocotools, LAVIS, intel/neural-compressor)")
_OPENAI = "https://openaipublic.azureedge.net/clip/models"
_OPENAI_SHA = "sha256 in OpenAI's URL path, checked by open_clip's own downloader"
_SAM21 = "https://dl.fbaipublicfiles.com/segment_anything_2/092824"
_HF = "https://huggingface.co"


def _coco(path: str, md5: str | None) -> Source:
    return Source(f"{_COCO}/{path}", path.rsplit("/", 1)[-1], md5=md5,
                  checksum_origin=_COCO_MD5 if md5 else Source.checksum_origin)


def _openai(sha: str, name: str) -> Source:
    return Source(f"{_OPENAI}/{sha}/{name}", name, sha256=sha, checksum_origin=_OPENAI_SHA)


SOURCES: dict[str, Source] = {
    "coco/train2014": _coco("zips/train2014.zip", "0da8c0bd3d6becc4dcb32757491aca88"),
    "coco/val2014": _coco("zips/val2014.zip", "a3d79f5ed8d289b7a7554ce06a5782b3"),
    "coco/annotations_trainval2014": _coco("annotations/annotations_trainval2014.zip", None),
    "coco/train2017": _coco("zips/train2017.zip", "cced6f7f71b7629ddf16f17bbcfab6b2"),
    "coco/val2017": _coco("zips/val2017.zip", "442b8da7639aecaf257c1dceb8ba8c80"),
    "coco/test2017": _coco("zips/test2017.zip", "77ad2c53ac5d0aea611d422c0938fb35"),
    "coco/annotations_trainval2017": _coco("annotations/annotations_trainval2017.zip",
                                           "f4bbac642086de4f52a3fdda2de5fa2c"),
    "coco/panoptic_annotations": _coco("annotations/panoptic_annotations_trainval2017.zip",
                                       "4170db65fc022c9c296af880dbca6055"),
    "ViT-B-32/openai": _openai(
        "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af", "ViT-B-32.pt"),
    "ViT-B-16/openai": _openai(
        "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", "ViT-B-16.pt"),
    "ViT-L-14/openai": _openai(
        "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836", "ViT-L-14.pt"),
    "ViT-B-16-SigLIP/webli": Source(
        f"{_HF}/timm/ViT-B-16-SigLIP/resolve/main/open_clip_model.safetensors",
        "timm/ViT-B-16-SigLIP/open_clip_model.safetensors"),
    **{f"dinov2-{size}/{part}": Source(f"{_HF}/facebook/dinov2-{size}/resolve/main/{part}",
                                       f"facebook/dinov2-{size}/{part}")
       for size in ("small", "base") for part in ("config.json", "model.safetensors")},
    **{f"sam2.1_hiera_{size}": Source(f"{_SAM21}/sam2.1_hiera_{size}.pt",
                                      f"sam2.1_hiera_{size}.pt")
       for size in ("tiny", "small", "base_plus", "large")},
}

COCO_PARTS = tuple(name.split("/", 1)[1] for name in SOURCES if name.startswith("coco/"))
_SCENE_RE = re.compile(r"scene\d{4}_\d{2}")
_HEX = re.compile(r"[0-9a-f]+")
_UNSAFE_CHAR = re.compile(r"[/\\\x00-\x1f\x7f]")   # separators, NUL, control characters


@dataclass(frozen=True, kw_only=True)
class SourceParams:
    """A user-defined source (or an override of a built-in one, e.g. a mirror or a checksum)."""

    url: str
    sha256: str | None = None
    md5: str | None = None
    filename: str | None = None  # relative path under the destination; default: URL basename

    def validate(self) -> None:
        require(self.url.startswith(("http://", "https://")), "url",
                f"must be an http(s) URL, got {self.url!r}")
        for key, value, length in (("sha256", self.sha256, 64), ("md5", self.md5, 32)):
            require(value is None or (len(value) == length and bool(_HEX.fullmatch(value))), key,
                    f"must be {length} lowercase hex digits, got {value!r}")
        if self.filename is not None:
            parts = Path(self.filename).parts
            require(bool(parts) and not Path(self.filename).is_absolute() and ".." not in parts,
                    "filename", f"must be a relative path without '..', got {self.filename!r}")

    def to_source(self) -> Source:
        name = self.filename or self.url.split("?")[0].rstrip("/").rsplit("/", 1)[-1]
        return Source(url=self.url, filename=name, sha256=self.sha256, md5=self.md5,
                      checksum_origin="download.sources in params.yaml")


@dataclass(frozen=True, kw_only=True)
class CocoParams:
    parts: list[str] = field(default_factory=lambda: ["val2017", "panoptic_annotations"])

    def validate(self) -> None:
        require(bool(self.parts), "parts", f"list at least one of: {', '.join(COCO_PARTS)}")
        for part in self.parts:
            require(part in COCO_PARTS, "parts", f"unknown part {part!r}; allowed: "
                    f"{', '.join(COCO_PARTS)}")


@dataclass(frozen=True, kw_only=True)
class Sa1bParams:
    links: str = ""  # Meta's links file: TSV "file_name<TAB>cdn_link" with a header line
    max_files: int = 1  # 0 = every tar in the links file (about 11 TB)

    def validate(self) -> None:
        require(self.max_files >= 0, "max_files", f"must be >= 0 (0 = all), got {self.max_files}")


@dataclass(frozen=True, kw_only=True)
class ScannetParams:
    path: str = ""  # local ScanNet root holding scans/<scene>/ exported by SensReader
    scenes: list[str] = field(default_factory=list)  # empty = every scene found
    link: Literal["symlink", "copy"] = "symlink"


@dataclass(frozen=True, kw_only=True)
class DownloadParams:
    """The ``download:`` section of params.yaml."""

    dataset: Literal["sample", "coco", "sa1b", "scannet"] = "sample"
    out: str = "data/raw/sample"
    cache_dir: str = ".featcache/downloads"  # archives in transit; git- and DVC-ignored
    keep_archives: bool = True
    retries: int = 5
    timeout_s: float = 60.0
    coco: CocoParams = field(default_factory=CocoParams)
    sa1b: Sa1bParams = field(default_factory=Sa1bParams)
    scannet: ScannetParams = field(default_factory=ScannetParams)
    weights: list[str] = field(default_factory=list)
    sources: dict[str, SourceParams] = field(default_factory=dict)

    def validate(self) -> None:
        require(bool(self.out.strip()), "out", "must name the output folder")
        require(self.retries >= 0, "retries", f"must be >= 0, got {self.retries}")
        require(self.timeout_s > 0, "timeout_s", f"must be > 0, got {self.timeout_s}")
        known = sorted(set(SOURCES) | set(self.sources))
        for name in self.weights:
            require(name in known, "weights", f"unknown source {name!r}; known: {', '.join(known)}")
        if self.dataset == "sa1b":
            read_sa1b_links(self.sa1b.links)
        if self.dataset == "scannet":
            find_scannet_scenes(self.scannet)

    def source(self, name: str) -> Source:
        """The source ``name``: a ``sources`` entry overrides the built-in table."""
        return self.sources[name].to_source() if name in self.sources else SOURCES[name]


def read_sa1b_links(path: str) -> list[tuple[str, str]]:
    """``[(file_name, url)]`` from Meta's SA-1B links file; ParamError naming ``sa1b.links``."""
    require(bool(path) and Path(path).is_file(), "sa1b.links",
            f"{path!r} is not a file; request the links file from Meta (SA-1B download page)")
    lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
    require(bool(lines) and lines[0].split("\t")[:2] == ["file_name", "cdn_link"], "sa1b.links",
            f"{path}: the first line must be the header 'file_name<TAB>cdn_link'")
    rows: list[tuple[str, str]] = []
    for number, line in enumerate(lines[1:], start=2):
        cells = line.split("\t")
        ok = len(cells) >= 2 and cells[1].startswith(("http://", "https://"))
        require(ok, "sa1b.links",
                f"{path}: line {number}: expected 'sa_XXXXXX.tar<TAB>https://...'")
        require(_plain_file_name(cells[0]), "sa1b.links",
                f"{path}: line {number}: file name {cells[0][:80]!r} is not a plain file name "
                "(no '/', '\\', NUL, control characters, leading '.', at most 255 bytes): it "
                "must stay inside the download folder")
        require(cells[0] not in {name for name, _ in rows}, "sa1b.links",
                f"{path}: line {number}: {cells[0]!r} is listed twice")
        rows.append((cells[0], cells[1]))
    require(bool(rows), "sa1b.links", f"{path}: no files listed")
    return rows


def _plain_file_name(name: str) -> bool:
    """A name that is one file inside its folder, whatever the filesystem: no separator
    (``/`` or ``\\``), no NUL or control character, not hidden or ``.``/``..``, <= 255 bytes."""
    return (bool(name) and not name.startswith(".") and not _UNSAFE_CHAR.search(name)
            and len(name.encode("utf-8", "surrogateescape")) <= 255)


def find_scannet_scenes(params: ScannetParams) -> list[tuple[str, Path]]:
    """``[(scene, folder)]`` of a local exported ScanNet; ParamError naming ``scannet.*``."""
    root = Path(params.path)
    require(bool(params.path) and root.is_dir(), "scannet.path",
            f"{params.path!r} is not a folder; point it at your ScanNet copy (with scans/)")
    scans = root / "scans" if (root / "scans").is_dir() else root
    names = params.scenes or sorted(p.name for p in scans.iterdir()
                                    if p.is_dir() and _SCENE_RE.fullmatch(p.name))
    require(bool(names), "scannet.path", f"no sceneXXXX_XX folders in {scans}")
    found = []
    for name in names:
        scene = scans / name
        require(scene.is_dir(), "scannet.scenes", f"{name}: no folder {scene}")
        needed = ["color", "depth", "pose", "intrinsic/intrinsic_color.txt",
                  f"{name}_vh_clean_2.ply"]
        missing = [n for n in needed if not (scene / n).exists()]
        require(not missing, "scannet.path",
                f"{scene} lacks {', '.join(missing)}; export the .sens with ScanNet's "
                "SensReader (--export_color_images --export_depth_images --export_poses "
                "--export_intrinsics) and download the _vh_clean_2.ply")
        found.append((name, scene))
    return found


def run_download(shared: SharedParams, params: DownloadParams) -> dict[str, Any]:
    """Produce ``params.out`` for ``params.dataset`` and fetch ``params.weights``.

    Returns a summary (``dataset``, ``out``, ``files`` written, ``weights`` paths).
    """
    out = Path(params.out)
    if params.dataset == "sample":
        manifest = generate_sample(out, shared.seed)
        files = [out / f for f in manifest["files"]]
    elif params.dataset == "coco":
        files = download_coco(params, out / "coco")
    elif params.dataset == "sa1b":
        files = download_sa1b(params, out / "sa1b")
    else:
        files = link_scannet(params.scannet, out / "scannet")
    weights_dir = Path(shared.weights_dir)
    weights_dir.mkdir(parents=True, exist_ok=True)  # declared in dvc.yaml even when empty
    weights = [fetch_source(params, name, weights_dir) for name in params.weights]
    log.info("download: %s -> %s (%d files), %d weight files", params.dataset, out,
             len(files), len(weights))
    return {"dataset": params.dataset, "out": str(out), "files": len(files),
            "weights": [str(w) for w in weights]}


def fetch_source(params: DownloadParams, name: str, dest_dir: Path) -> Path:
    """Fetch source ``name`` to ``dest_dir / source.filename``."""
    src = params.source(name)
    return fetch(src.url, dest_dir / src.filename, src.sha256, md5=src.md5,
                 retries=params.retries, timeout=params.timeout_s)


def download_coco(params: DownloadParams, target: Path) -> list[Path]:
    """Fetch and unpack ``coco.parts`` into ``target`` (nested panoptic PNG zips included)."""
    files: list[Path] = []
    for part in params.coco.parts:
        archive = fetch_source(params, f"coco/{part}", Path(params.cache_dir) / "coco")
        files += extract(archive, target)
        for nested in sorted((target / "annotations").glob("panoptic_*2017.zip")):
            files += extract(nested, target / "annotations")
            nested.unlink()
        _drop_archive(params, archive)
    return [f for f in files if f.exists()]


def download_sa1b(params: DownloadParams, target: Path) -> list[Path]:
    """Fetch the first ``sa1b.max_files`` tars of the links file and unpack them flat."""
    rows = read_sa1b_links(params.sa1b.links)
    if params.sa1b.max_files:
        rows = rows[: params.sa1b.max_files]
    files: list[Path] = []
    for file_name, url in rows:
        archive = fetch(url, Path(params.cache_dir) / "sa1b" / file_name, None,
                        retries=params.retries, timeout=params.timeout_s)
        files += extract(archive, target)
        _drop_archive(params, archive)
    return files


def link_scannet(params: ScannetParams, target: Path) -> list[Path]:
    """Symlink (or copy) the validated scenes to ``target/scans/`` and write the scene list."""
    scenes = find_scannet_scenes(params)
    (target / "scans").mkdir(parents=True, exist_ok=True)
    for name, folder in scenes:
        dest = target / "scans" / name
        if dest.is_symlink() or dest.is_file():
            dest.unlink()
        elif dest.exists():
            shutil.rmtree(dest)
        if params.link == "symlink":
            dest.symlink_to(folder.resolve(), target_is_directory=True)
        else:
            shutil.copytree(folder, dest)
    (target / SCENE_LIST).write_text("".join(f"{name}\n" for name, _ in scenes))
    log.info("scannet: %d scenes %sed into %s", len(scenes), params.link, target)
    return [target / SCENE_LIST] + [target / "scans" / name for name, _ in scenes]


def _drop_archive(params: DownloadParams, archive: Path) -> None:
    if not params.keep_archives:
        archive.unlink(missing_ok=True)
        archive.with_name(archive.name + ".sha256").unlink(missing_ok=True)


__all__ = ["SOURCES", "DownloadParams", "Source", "download_coco", "download_sa1b", "extract",
           "fetch", "fetch_source", "find_scannet_scenes", "link_scannet", "read_sa1b_links",
           "run_download"]
