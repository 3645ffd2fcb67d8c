"""Getting remote files and archives: resumable verified downloads, safe unpacking.

:func:`fetch` streams a URL to ``<dest>.part``, resumes after a dropped connection with an HTTP
``Range`` request (a ``206`` reply is appended; a server that ignores ``Range`` and answers
``200`` makes the transfer restart from byte 0), verifies the sha256 or md5, and only then moves
the file to ``dest`` with ``os.replace``. A transfer is complete only when the ``.part`` holds
the size the server announced (``Content-Length`` of a ``200``, the total of a ``Content-Range``);
a connection closed before that resumes. When a reply announced no size, one more ``Range``
request from the end asks for it (``416`` with the total confirms, ``206`` brings the rest);
only a server that answers neither way leaves the size unchecked, with a warning. On a checksum
mismatch the file is downloaded once more from scratch; a second mismatch deletes the ``.part``
and leaves nothing at ``dest``. Without a known checksum the file's sha256 is recorded in a
``<dest>.sha256`` sidecar (``sha256sum`` format) and a warning says so; later runs check
against it.

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

import hashlib
import http.client
import logging
import os
import shutil
import stat
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from featcache.config import StageError

log = logging.getLogger(__name__)

USER_AGENT = "featcache-download"
_READ_CHUNK = 1 << 20

STAGING_PREFIX = ".extracting-"
_COPY_CHUNK = 1 << 20
MAX_MEMBERS = 1_000_000          # COCO train2017: 118k members; an SA-1B tar: ~22k
MAX_RATIO = 100                  # unpacked / packed bytes; real COCO/SA-1B archives: 1-5
MIN_BUDGET_BYTES = 1 << 30       # small archives may always unpack to 1 GiB
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


class DownloadError(StageError, RuntimeError):
    """A transfer failed for good (HTTP error, retries exhausted)."""


class ChecksumError(DownloadError):
    """The downloaded bytes do not have the expected checksum."""

    def __init__(self, url: str, algorithm: str, expected: str, actual: str) -> None:
        super().__init__(f"{url}: {algorithm} mismatch: expected {expected}, got {actual}; "
                         "the partial download was deleted, nothing was written")
        self.url, self.algorithm, self.expected, self.actual = url, algorithm, expected, actual


class _Retryable(Exception):
    """A transient failure: the transfer resumes from what ``.part`` already holds."""


def fetch(url: str, dest: str | Path, sha256: str | None = None, *, md5: str | None = None,
          retries: int = 5, timeout: float = 60.0, backoff_s: float = 1.0) -> Path:
    """Download ``url`` to ``dest`` (see the module doc); return ``dest``.

    An existing ``dest`` that matches the checksum (or its sidecar) is kept without a request.
    ``retries`` counts the attempts after the first; waits grow as ``backoff_s * 2**k`` (<= 60 s).
    Raises :class:`ChecksumError` or :class:`DownloadError`.
    """
    dest = Path(dest)
    if dest.is_file() and _existing_matches(dest, sha256, md5):
        log.info("%s: already present and verified", dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for round_ in range(2):
        _transfer_with_retries(url, part, retries, timeout, backoff_s)
        digests = file_digests(part)
        wrong = [(algorithm, expected) for algorithm, expected in (("sha256", sha256),
                                                                    ("md5", md5))
                 if expected is not None and digests[algorithm] != expected.lower()]
        if not wrong:
            break
        part.unlink()
        algorithm, expected = wrong[0]
        if round_:
            raise ChecksumError(url, algorithm, expected, digests[algorithm])
        log.warning("%s: %s mismatch (a resumed transfer may have joined two versions); "
                    "downloading it once more from scratch", url, algorithm)
    os.replace(part, dest)
    if sha256 is None:
        _write_sidecar(dest, digests["sha256"], url, warn=md5 is None)
    log.info("%s: downloaded and verified (%s)", dest, "sha256" if sha256 else
             "md5" if md5 else "sha256 recorded")
    return dest


def file_digests(path: Path) -> dict[str, str]:
    """``{"sha256": hex, "md5": hex}`` of a file, read once."""
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while chunk := f.read(_READ_CHUNK):
            sha.update(chunk)
            md5.update(chunk)
    return {"sha256": sha.hexdigest(), "md5": md5.hexdigest()}


def _existing_matches(dest: Path, sha256: str | None, md5: str | None) -> bool:
    digests = file_digests(dest)
    sidecar = dest.with_name(dest.name + ".sha256")
    if sha256 is None and md5 is None:
        if not sidecar.is_file():  # only complete files are ever renamed to dest
            _write_sidecar(dest, digests["sha256"], str(dest), warn=True)
            return True
        sha256 = sidecar.read_text().split()[0]
    ok = (sha256 is None or digests["sha256"] == sha256) and (md5 is None or
                                                              digests["md5"] == md5)
    if not ok:
        log.warning("%s: present but its checksum does not match; downloading again", dest)
        dest.unlink()
    return ok


def _write_sidecar(dest: Path, sha256: str, url: str, warn: bool) -> None:
    sidecar = dest.with_name(dest.name + ".sha256")
    sidecar.write_text(f"{sha256}  {dest.name}\n")
    if warn:
        log.warning("%s: no published checksum; recorded sha256 %s in %s (pin it with "
                    "download.sources to verify future downloads)", url, sha256, sidecar.name)


def _transfer_with_retries(url: str, part: Path, retries: int, timeout: float,
                           backoff_s: float) -> None:
    for attempt in range(retries + 1):
        try:
            total = _transfer_once(url, part, timeout)
            if total is None:   # no size announced: ask for the bytes after the end
                total = _transfer_once(url, part, timeout)
            _check_complete(url, part, total)
            return
        except _Retryable as e:
            if attempt == retries:
                raise DownloadError(f"{url}: giving up after {retries + 1} attempts: {e}; "
                                    f"run again to resume from {part}") from None
            delay = min(backoff_s * 2 ** attempt, 60.0)
            log.warning("%s: %s; retrying in %.0f s (attempt %d of %d)", url, e, delay,
                        attempt + 2, retries + 1)
            time.sleep(delay)


def _check_complete(url: str, part: Path, total: int | None) -> None:
    """Raise :class:`_Retryable` unless ``part`` holds the announced ``total`` bytes."""
    size = part.stat().st_size if part.exists() else 0
    if total is None:
        log.warning("%s: the server announced no size (no Content-Length, no Range support); "
                    "the %d bytes received cannot be checked for completeness", url, size)
    elif size < total:
        raise _Retryable(f"connection closed after {size} of {total} bytes")
    elif size > total:
        part.unlink()
        raise _Retryable(f"received {size} bytes, more than the announced {total}; restarting")


def _transfer_once(url: str, part: Path, timeout: float) -> int | None:
    """One request: append to ``part`` from its current size, or restart it. Returns the
    file's total size as the server announced it (``None`` if it did not)."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                          timeout=timeout)
    except urllib.error.HTTPError as e:
        return _raise_for_status(url, part, offset, e)   # 416 at the end: complete
    except (OSError, http.client.HTTPException) as e:
        raise _Retryable(f"{type(e).__name__}: {e}") from None
    with response:
        total = None
        if offset and response.status == 206:
            start = _content_range_start(response.headers.get("Content-Range"))
            if start != offset:
                part.unlink()
                raise _Retryable(f"server resumed at byte {start}, not {offset}; restarting")
            total = _content_range_total(response.headers.get("Content-Range"))
        else:
            if offset:
                log.info("%s: server ignored the Range request; restarting from byte 0", url)
                offset = 0
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        _copy_body(response, part, append=offset > 0)
        return total


def _raise_for_status(url: str, part: Path, offset: int, e: urllib.error.HTTPError) -> int:
    """The total size when a ``416`` says the ``.part`` is complete; else raise."""
    if e.code == 416 and offset:  # range not satisfiable: the .part is complete or wrong
        total = _content_range_total(e.headers.get("Content-Range"))
        if total == offset:
            return total
        part.unlink()
        raise _Retryable("server rejected the resume range; restarting") from None
    if e.code in (408, 429) or e.code >= 500:
        raise _Retryable(f"HTTP {e.code} {e.reason}") from None
    hint = " (SA-1B links expire: get a fresh links file)" if e.code == 403 else ""
    raise DownloadError(f"{url}: HTTP {e.code} {e.reason}{hint}") from None


def _content_range_start(value: str | None) -> int:
    """Start byte of ``Content-Range: bytes <start>-<end>/<total>``; -1 if unparsable."""
    try:
        return int((value or "").split()[1].split("-")[0])
    except (IndexError, ValueError):
        return -1


def _content_range_total(value: str | None) -> int | None:
    """Total of ``Content-Range: bytes <start>-<end>/<total>`` (or ``bytes */<total>``);
    ``None`` if absent or ``*``."""
    total = (value or "").rpartition("/")[2].strip()
    return int(total) if total.isdigit() else None


def _copy_body(response: http.client.HTTPResponse, part: Path, append: bool) -> None:
    expected = response.headers.get("Content-Length")
    received = 0
    try:
        with part.open("ab" if append else "wb") as f:
            while chunk := response.read(_READ_CHUNK):
                f.write(chunk)
                received += len(chunk)
    except (OSError, http.client.HTTPException) as e:
        raise _Retryable(f"connection lost after {received} bytes: {e}") from None
    if expected is not None and received < int(expected):
        raise _Retryable(f"connection closed after {received} of {expected} bytes")


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
