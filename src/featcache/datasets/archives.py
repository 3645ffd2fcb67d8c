"""Safe unpacking of zip and tar archives (the download stage's extraction; the transfers
are :mod:`featcache.datasets.downloads`).

:func:`extract` refuses a whole archive - before anything reaches the target folder - if any
member could write outside it or is not a plain file or folder: absolute paths, drive letters,
``..`` components (also spelled with backslashes), symlinks, hardlinks, device files and FIFOs.
Members are unpacked into a staging folder inside the target and then moved into place file by
file with ``os.replace``, so an interrupted or refused extraction leaves no partial files at
their final paths; the staging folder is removed on error and on the next run. Permissions,
owners and timestamps from the archive are not applied. Archive bombs are refused the same way:
at most :data:`MAX_MEMBERS` members, and at most :data:`MAX_RATIO` times the archive's own size
(but never less than :data:`MIN_BUDGET_BYTES`) unpacked, counted on the bytes actually written
(a zip's declared sizes are checked first, but not trusted).
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from featcache.config import StageError

log = logging.getLogger(__name__)

STAGING_PREFIX = ".extracting-"
_COPY_CHUNK = 1 << 20
MAX_MEMBERS = 1_000_000          # COCO train2017: 118k members; an SA-1B tar: ~22k
MAX_RATIO = 100                  # unpacked / packed bytes; real COCO/SA-1B archives: 1-5
MIN_BUDGET_BYTES = 1 << 30       # small archives may always unpack to 1 GiB
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


class ArchiveError(StageError, ValueError):
    """An archive cannot be unpacked (corrupt, truncated, unknown format or unsafe)."""


class UnsafeArchiveError(ArchiveError):
    """An archive member would escape the target folder or is not a regular file or folder."""

    def __init__(self, archive: Path, member: str, reason: str) -> None:
        super().__init__(f"{archive}: refusing member {member!r}: {reason}; nothing was extracted")
        self.archive, self.member, self.reason = archive, member, reason


def safe_member_path(archive: Path, name: str) -> PurePosixPath | None:
    """The relative path a member may be written to, ``None`` for the archive root (``./``).

    Raises :class:`UnsafeArchiveError` for absolute paths, drive letters, ``..`` and NUL bytes.
    """
    if "\x00" in name:
        raise UnsafeArchiveError(archive, name, "NUL byte in the name")
    posix = name.replace("\\", "/")
    if posix.startswith("/") or (len(posix) >= 2 and posix[1] == ":"):
        raise UnsafeArchiveError(archive, name, "absolute path")
    parts = [p for p in posix.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(archive, name, "'..' path component")
    return PurePosixPath(*parts) if parts else None


class _Budget:
    """Members and bytes an archive may still unpack; exceeding either refuses it."""

    def __init__(self, archive: Path, max_members: int, max_bytes: int) -> None:
        self.archive, self.members, self.bytes = archive, max_members, max_bytes
        self.max_members, self.max_bytes = max_members, max_bytes

    def member(self, name: str) -> None:
        self.members -= 1
        if self.members < 0:
            raise UnsafeArchiveError(self.archive, name, f"more than {self.max_members} "
                                     "members (an archive bomb?)")

    def spend(self, name: str, n: int) -> None:
        self.bytes -= n
        if self.bytes < 0:
            raise UnsafeArchiveError(self.archive, name, f"unpacks to more than "
                                     f"{self.max_bytes} bytes, {MAX_RATIO}x the archive "
                                     "(an archive bomb?)")


def extract(archive: str | Path, target: str | Path, *, max_members: int = MAX_MEMBERS,
            max_bytes: int | None = None) -> list[Path]:
    """Unpack a zip or tar(.gz/.bz2/.xz) ``archive`` into ``target``; return the files written.

    Existing files in ``target`` with the same relative path are replaced, other files are
    kept (archives that share a top-level folder merge). Raises :class:`UnsafeArchiveError`
    (nothing written) for an unsafe member or one past ``max_members`` / ``max_bytes``
    unpacked (default ``max(MAX_RATIO * archive size, MIN_BUDGET_BYTES)``),
    :class:`ArchiveError` for a corrupt archive or an unknown format.
    """
    archive, target = Path(archive), Path(target)
    if max_bytes is None:
        max_bytes = max(MAX_RATIO * archive.stat().st_size, MIN_BUDGET_BYTES)
    budget = _Budget(archive, max_members, max_bytes)
    target.mkdir(parents=True, exist_ok=True)
    staging = target / f"{STAGING_PREFIX}{archive.name}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        if _is_zip(archive):
            _unpack_zip(archive, staging, budget)
        elif _is_tar(archive):
            _unpack_tar(archive, staging, budget)
        else:
            raise ArchiveError(f"{archive}: not a zip or tar archive")
        written = _move_into(staging, target, archive)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as e:
        raise ArchiveError(f"{archive}: corrupt or truncated archive ({e}); delete it and run "
                           "again to download it afresh") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("extracted %d files from %s into %s", len(written), archive.name, target)
    return written


def _is_zip(archive: Path) -> bool:
    if archive.name.lower().endswith(".zip"):
        return True
    return not archive.name.lower().endswith(_TAR_SUFFIXES) and zipfile.is_zipfile(archive)


def _is_tar(archive: Path) -> bool:
    return archive.name.lower().endswith(_TAR_SUFFIXES) or tarfile.is_tarfile(archive)


def _unpack_zip(archive: Path, staging: Path, budget: _Budget) -> None:
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()
        if len(members) > budget.max_members:
            budget.members = len(members) - 1   # refuse before reading any member
            budget.member(members[-1].filename)
        checked = [(info, _check_zip_member(archive, info)) for info in members]
        declared = _Budget(archive, budget.max_members, budget.max_bytes)
        for info in members:   # the declared sizes first: refuse a bomb before unpacking
            declared.spend(info.filename, info.file_size)
        for info, rel in checked:
            budget.member(info.filename)
            if rel is None:
                continue
            if info.is_dir():
                (staging / rel).mkdir(parents=True, exist_ok=True)
            else:
                with zf.open(info) as src:
                    _write_file(src, staging / rel, budget, info.filename)


def _check_zip_member(archive: Path, info: zipfile.ZipInfo) -> PurePosixPath | None:
    rel = safe_member_path(archive, info.filename)
    kind = stat.S_IFMT(info.external_attr >> 16)
    if info.create_system == 3 and kind:  # unix file type bits present (0 = unspecified)
        if kind == stat.S_IFLNK:
            raise UnsafeArchiveError(archive, info.filename, "symbolic link")
        if kind not in (stat.S_IFREG, stat.S_IFDIR):
            raise UnsafeArchiveError(archive, info.filename, "device file, FIFO or socket")
    return rel


def _unpack_tar(archive: Path, staging: Path, budget: _Budget) -> None:
    """Stream the members in one pass; an unsafe one aborts (staging is then discarded)."""
    with tarfile.open(archive, "r:*") as tf:
        for member in tf:
            budget.member(member.name)
            rel = _check_tar_member(archive, member)
            if rel is None:
                continue
            if member.isdir():
                (staging / rel).mkdir(parents=True, exist_ok=True)
                continue
            src = tf.extractfile(member)
            if src is None:
                raise UnsafeArchiveError(archive, member.name, "unreadable member")
            with src:
                _write_file(src, staging / rel, budget, member.name)


def _check_tar_member(archive: Path, member: tarfile.TarInfo) -> PurePosixPath | None:
    rel = safe_member_path(archive, member.name)
    if member.issym():
        raise UnsafeArchiveError(archive, member.name, f"symbolic link to {member.linkname!r}")
    if member.islnk():
        raise UnsafeArchiveError(archive, member.name, f"hard link to {member.linkname!r}")
    if not (member.isreg() or member.isdir()):
        raise UnsafeArchiveError(archive, member.name, "device file, FIFO or other special file")
    return rel


def _write_file(src: BinaryIO, dest: Path, budget: _Budget, name: str) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with dest.open("wb") as out:
        while chunk := src.read(_COPY_CHUNK):
            budget.spend(name, len(chunk))
            out.write(chunk)


def _move_into(staging: Path, target: Path, archive: Path) -> list[Path]:
    """Move every staged file to the same relative path under ``target``.

    All destinations are checked first: a folder in ``target`` that is a symlink leading
    elsewhere is refused rather than followed.
    """
    root = target.resolve()
    moves = [(p, target / p.relative_to(staging))
             for p in sorted(staging.rglob("*")) if p.is_file()]
    for src, dest in moves:
        if not dest.parent.resolve().is_relative_to(root):
            raise UnsafeArchiveError(archive, src.relative_to(staging).as_posix(),
                                     f"{dest.parent} leads outside {target} (a symlink?)")
    for path in sorted(staging.rglob("*")):
        if path.is_dir():
            (target / path.relative_to(staging)).mkdir(parents=True, exist_ok=True)
    for src, dest in moves:
        os.replace(src, dest)
    return [dest for _, dest in moves]
