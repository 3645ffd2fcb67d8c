"""Atomic, byte-deterministic file writing.

Every file featcache writes lands by ``os.replace`` from a temporary name in the same folder, so
a reader (or DVC) never sees a half-written file, and a run killed at any moment leaves either
the old file or the new one. NPZ files get fixed zip timestamps so that identical arrays give
identical bytes (``np.savez`` stamps the current time into every entry).

Temporary names never push a name past the filesystem's limit (255 bytes per name): a name
that leaves room is ``.<name>.<random>.tmp``, a longer one ``.<sha256 of the name>~.<random>.tmp``
(:func:`temp_prefix`), so any name the filesystem accepts can be written atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
NAME_MAX = 255          # bytes per file name on Linux/macOS filesystems (ext4, xfs, apfs, ...)
_TEMP_ROOM = 24         # what a temporary name adds: "." + "." + 8 random chars + ".tmp", + margin


def name_bytes(name: str) -> int:
    """Length of a file name as the filesystem counts it (bytes of its encoding)."""
    return len(os.fsencode(name))


def temp_prefix(name: str) -> str:
    """The prefix of ``name``'s temporary files: ``.<name>.`` when that leaves room for the
    random part within :data:`NAME_MAX`, else ``.<sha256(name)[:32]>~.`` (same for the same
    name, so a later run finds and removes what a killed one left)."""
    if name_bytes(name) + _TEMP_ROOM <= NAME_MAX:
        return f".{name}."
    return f".{hashlib.sha256(os.fsencode(name)).hexdigest()[:32]}~."


def temp_name(name: str, tag: str) -> str:
    """A deterministic temporary name for ``name`` with a short ``tag`` (e.g. a pid)."""
    return f"{temp_prefix(name)}{tag}.tmp"


def stale_temps(dest: str | Path) -> list[Path]:
    """Temporaries of ``dest`` (files or folders) left in its folder by a killed run."""
    dest = Path(dest)
    if not dest.parent.is_dir():
        return []
    return sorted(dest.parent.glob(f"{glob_escape(temp_prefix(dest.name))}*.tmp"))


def glob_escape(text: str) -> str:
    """``text`` with glob metacharacters quoted (names may hold ``*``, ``?`` or ``[``)."""
    return re.sub(r"([*?\[])", r"[\1]", text)


@contextlib.contextmanager
def atomic_path(dest: str | Path, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; move it onto ``dest`` if the block succeeds.

    With ``is_dir`` the temporary path is an empty folder and an existing ``dest`` folder is
    replaced as a whole. On error the temporary path is removed and ``dest`` is untouched.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    prefix = temp_prefix(dest.name)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=dest.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=dest.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if is_dir:
            os.chmod(tmp, 0o755)
            if dest.exists():
                _remove(dest)
        else:
            os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except OSError as e:
        _remove(tmp)
        raise with_path(e, dest) from None
    except BaseException:
        _remove(tmp)
        raise


def with_path(error: OSError, path: str | Path) -> OSError:
    """``error`` naming ``path`` when it names no file (a failed ``write`` names none): disk
    full and the like then say where (:func:`featcache.engine.cli.run_stage` prints one line)."""
    if error.filename is not None or error.errno is None:
        return error
    named = OSError(error.errno, error.strerror or str(error), str(path))
    named.__cause__ = error
    return named


def remove_stale_temps(dest: str | Path) -> int:
    """Remove temporaries of ``dest`` left behind by a killed run; returns how many."""
    stale = stale_temps(dest)
    for path in stale:
        _remove(path)
    return len(stale)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def npz_bytes(arrays: Mapping[str, np.ndarray], compress: bool = False) -> bytes:
    """Serialise ``arrays`` as an NPZ archive whose bytes depend on the arrays only."""
    buf = io.BytesIO()
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(buf, "w", compression=method) as zf:
        for name, value in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            info.compress_type = method
            info.external_attr = 0o644 << 16
            entry = io.BytesIO()
            np.lib.format.write_array(entry, np.asanyarray(value), allow_pickle=False)
            zf.writestr(info, entry.getvalue())
    return buf.getvalue()


def save_npz(path: str | Path, arrays: Mapping[str, np.ndarray], compress: bool = False) -> None:
    """Write ``arrays`` to ``path`` atomically and byte-deterministically."""
    write_bytes(path, npz_bytes(arrays, compress))


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    write_bytes(path, text.encode("utf-8"))
