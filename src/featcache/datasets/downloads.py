"""Resumable, verified downloads of remote files (the download stage's transfers).

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
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

from featcache.config import StageError

log = logging.getLogger(__name__)

USER_AGENT = "featcache-download"
_READ_CHUNK = 1 << 20


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
