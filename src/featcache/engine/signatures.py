"""Item signatures: what an item's inputs are, by content.

A shard's identity covers the signatures of its member items, so a signature must change
exactly when an input's bytes change. It hashes file contents (a checkout, ``dvc pull`` or a
copy to another machine keeps them), and remembers each file's digest under its
``(size, mtime_ns, inode)`` in ``.featcache/signatures.sqlite`` (the way DVC's own state
database does), so a re-run reads no input it has hashed before.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

DB_PATH = Path(".featcache") / "signatures.sqlite"
_BLOCK = 1 << 20


def _digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


class SignatureCache:
    """``digest(path)`` with a persistent stat cache (safe to share between threads)."""

    def __init__(self, db: Path = DB_PATH) -> None:
        self.db = db
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self._deferred = 0   # > 0: inside batched(), one commit at its end

    def _connection(self) -> sqlite3.Connection | None:
        if self._conn is None or self._pid != os.getpid():
            try:
                self.db.parent.mkdir(parents=True, exist_ok=True)
                self._conn = sqlite3.connect(self.db, timeout=60, check_same_thread=False)
                self._conn.execute("PRAGMA synchronous=OFF")
                self._conn.execute("CREATE TABLE IF NOT EXISTS digests (path TEXT PRIMARY KEY,"
                                   " size INTEGER, mtime INTEGER, inode INTEGER, digest TEXT)")
                self._pid = os.getpid()
            except sqlite3.Error:
                self._conn = None
        return self._conn

    def digest(self, path: str | Path) -> str:
        """Content digest of ``path``, or ``missing`` when it cannot be read."""
        path = Path(path)
        try:
            st = os.stat(path)
        except OSError:
            return "missing"
        key = os.path.abspath(path)
        stat = (st.st_size, st.st_mtime_ns, st.st_ino)
        with self._lock:
            conn = self._connection()
            row = conn.execute("SELECT size, mtime, inode, digest FROM digests WHERE path = ?",
                               (key,)).fetchone() if conn else None
        if row is not None and tuple(row[:3]) == stat:
            return row[3]
        try:
            value = _digest(path)
        except OSError:
            return "unreadable"
        with self._lock:
            if conn is not None:
                try:
                    conn.execute("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?, ?)",
                                 (key, *stat, value))
                    if not self._deferred:
                        conn.commit()
                except sqlite3.Error:
                    pass
        return value

    @contextlib.contextmanager
    def batched(self) -> Iterator[None]:
        """Digests recorded inside commit once, at the end (one commit per file cost more
        than the hashing of a small image, measured)."""
        with self._lock:
            self._deferred += 1
        try:
            yield
        finally:
            with self._lock:
                self._deferred -= 1
                if not self._deferred and self._conn is not None and self._pid == os.getpid():
                    try:
                        self._conn.commit()
                    except sqlite3.Error:
                        pass

    def signature(self, paths: Iterable[str | Path], extra: str = "") -> str:
        """One signature over several files (their names relative to nothing: the caller
        passes the paths it reads) and ``extra`` (e.g. an annotation entry)."""
        h = hashlib.sha256(extra.encode())
        for p in paths:
            h.update(f"\n{Path(p).name}\t{self.digest(p)}".encode())
        return h.hexdigest()


_CACHE = SignatureCache()


def file_signature(paths: Iterable[str | Path], extra: str = "") -> str:
    """The content signature of an item that reads ``paths`` (see the module doc)."""
    return _CACHE.signature(paths, extra)


def batched_signatures() -> contextlib.AbstractContextManager:
    """Inside: :func:`file_signature` commits its new digests once, at the end."""
    return _CACHE.batched()
