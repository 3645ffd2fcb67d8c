"""Atomic, byte-deterministic file writing.

Every file featcache writes lands by ``os.replace`` from a temporary name in the same folder, so
a reader (or DVC) never sees a half-written file, and a run killed at any moment leaves either
the old file or the new one. NPZ files get fixed zip timestamps so that identical arrays give
identical bytes (``np.savez`` stamps the current time into every entry).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


@contextlib.contextmanager
def atomic_path(dest: str | Path, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; move it onto ``dest`` if the block succeeds.

    With ``is_dir`` the temporary path is an empty folder and an existing ``dest`` folder is
    replaced as a whole. On error the temporary path is removed and ``dest`` is untouched.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
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
    except BaseException:
        _remove(tmp)
        raise


def remove_stale_temps(dest: str | Path) -> int:
    """Remove temporaries of ``dest`` left behind by a killed run; returns how many."""
    dest = Path(dest)
    stale = list(dest.parent.glob(f".{dest.name}.*.tmp")) if dest.parent.is_dir() else []
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
