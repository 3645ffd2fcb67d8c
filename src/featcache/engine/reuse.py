"""Finding shards made before: the scratch area, the output already on disk, DVC's cache.

DVC deletes a stage's outputs before it runs the command, but keeps their files in its
content-addressed cache: the previous ``dvc.lock`` entry of the output names the ``.dir``
listing, which maps every ``shards/<id>.h5`` to its cache file. Shards are linked (hard link,
no bytes copied) from wherever they are found into the scratch area; a copy is made only where
a link is impossible (another filesystem).
"""

from __future__ import annotations

import configparser
import json
import logging
import os
import shutil
from pathlib import Path

import yaml

from featcache.engine.atomic import temp_prefix
from featcache.engine.shards import INDEX_NAME, SHARDS_DIR, ShardReader

log = logging.getLogger(__name__)


def dvc_cache_dir(root: Path = Path(".")) -> Path:
    """The DVC cache folder of the repository at ``root`` (``cache.dir`` of ``.dvc/config``
    or ``config.local``, else ``.dvc/cache``)."""
    cache = root / ".dvc" / "cache"
    for name in ("config", "config.local"):
        path = root / ".dvc" / name
        if path.is_file():
            parser = configparser.ConfigParser()
            try:
                parser.read(path)
            except configparser.Error:
                continue
            if parser.has_option("cache", "dir"):
                value = Path(parser.get("cache", "dir").strip("'\""))
                cache = value if value.is_absolute() else (root / ".dvc" / value)
    return cache


def _cache_file(cache: Path, md5: str) -> Path:
    return cache / "files" / "md5" / md5[:2] / md5[2:]


def dvc_previous_files(out: Path, root: Path = Path(".")) -> dict[str, Path]:
    """``{path relative to out: cache file}`` for every file of ``out`` recorded in the
    previous ``dvc.lock`` whose content is in the local DVC cache. Empty when there is no
    dvc.lock, no entry, or no cache (never an error: reuse is an optimisation)."""
    lock = root / "dvc.lock"
    if not lock.is_file():
        return {}
    try:
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    except yaml.YAMLError:
        return {}
    cache = dvc_cache_dir(root)
    out = Path(os.path.normpath(out))
    found: dict[str, Path] = {}
    for stage in stages.values():
        for entry in (stage or {}).get("outs", []) or []:
            base = Path(os.path.normpath(str(entry.get("path", ""))))
            md5 = str(entry.get("md5", ""))
            if not md5.endswith(".dir") or not (out == base or base in out.parents):
                continue
            listing = _cache_file(cache, md5)
            try:
                files = json.loads(listing.read_text())
            except (OSError, ValueError):
                continue
            for f in files:
                full = base / f.get("relpath", "")
                if out in full.parents and _cache_file(cache, f.get("md5", "")).is_file():
                    found[full.relative_to(out).as_posix()] = _cache_file(cache, f["md5"])
    return found


def previous_shards(out: Path, scratch: Path) -> dict[str, Path]:
    """``{shard file name: path}`` of every earlier shard of ``out`` that can be found: in
    the scratch area (a run that did not finish), in ``out`` itself (a re-run outside DVC), and
    in DVC's cache (the version of ``out`` that the last ``dvc.lock`` records)."""
    found: dict[str, Path] = {}
    for rel, path in dvc_previous_files(out).items():
        parts = rel.split("/")
        if len(parts) == 2 and parts[0] == SHARDS_DIR and parts[1].endswith(".h5"):
            found[parts[1]] = path
    if (out / INDEX_NAME).is_file():
        found.update({p.name: p for p in (out / SHARDS_DIR).glob("*.h5")})
    if scratch.is_dir():
        found.update({p.name: p for p in scratch.glob("*.h5")})
    return found


def link_or_copy(src: Path, dest: Path) -> None:
    """Put ``src``'s bytes at ``dest`` without copying them if the filesystem allows."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        return
    tmp = dest.with_name(f"{temp_prefix(dest.name)}{os.getpid()}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        log.info("cannot hard-link %s (another filesystem?); copying it", src)
        shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def earlier_members(paths: list[Path]) -> dict[str, tuple[Path, int]]:
    """``member identity -> (shard file, member index)`` over earlier shard files."""
    found: dict[str, tuple[Path, int]] = {}
    for path in paths:
        try:
            with ShardReader(path) as r:
                for m, mid in enumerate(r.member_ids()):
                    found.setdefault(mid, (path, m))
        except (OSError, KeyError) as e:
            log.warning("ignoring unreadable earlier shard %s: %s", path, e)
    return found
