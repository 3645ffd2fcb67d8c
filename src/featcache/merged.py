"""One image's SAM2 features and Method-B edge maps as one dict, as the seed's single NPZ held.

The cache keeps them in two outputs on purpose (``extract_sam2`` writes ``<features_dir>``,
``edge_maps_methodB`` writes ``<edges_dir>``, each a sharded folder, with ``layout: npz`` also
``<stem>_features.npz`` / ``<stem>_edges.npz`` files): two stages never write one file, so a
repair after a model or method change is re-running one stage. Training code that expects the
seed's one NPZ per image reads :func:`load_merged` instead, with the seed's key names:

- ``P4_S16`` ``(256, 64, 64)``, ``P5_S32`` ``(256, 32, 32)``, ``IMAGE_EMB_S16`` (= ``P4_S16``),
  ``feature_flag`` (from the features file; float dtype as stored, fp16 by default);
- ``edge_256x256``, ``edge_64x64``, ``edge_32x32`` uint8 0/1, ``edge_flag``, ``edge_version``
  (from the edges file; the sizes are those of ``edge_maps_methodB.sizes``).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from featcache.reader import open_features

FEATURES_SUFFIX = "_features"
EDGES_SUFFIX = "_edges"


def features_path(features_dir: str | Path, stem: str) -> Path:
    """``<features_dir>/<stem>_features.npz`` (written by ``extract_sam2``)."""
    return Path(features_dir) / f"{stem}{FEATURES_SUFFIX}.npz"


def edges_path(edges_dir: str | Path, stem: str) -> Path:
    """``<edges_dir>/<stem>_edges.npz`` (written by ``edge_maps_methodB``)."""
    return Path(edges_dir) / f"{stem}{EDGES_SUFFIX}.npz"


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an NPZ file, read into memory (no pickles).

    Raises ``FileNotFoundError`` naming ``path`` if it does not exist, ``ValueError`` naming it
    if it is not a readable NPZ.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {name: z[name] for name in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable NPZ file ({e})") from e


def _is_sharded(folder: str | Path) -> bool:
    return (Path(folder) / "index.h5").is_file()


def _read_item(folder: str | Path, stem: str, path: Path) -> dict[str, np.ndarray]:
    """One image's arrays from a sharded folder (through the reader), else from its NPZ."""
    if not _is_sharded(folder):
        return read_npz(path)

    store = open_features(folder, field=None)
    if stem not in store:
        raise FileNotFoundError(f"{stem}: not in {folder} (no {path.name} either)")
    return dict(store[stem])


def load_merged(features_dir: str | Path, edges_dir: str | Path,
                stem: str) -> dict[str, np.ndarray]:
    """One image's features and edges merged into one dict (keys in the module docstring).

    ``stem`` is the image file name without its suffix (``sa_1`` for ``sa_1.jpg``). Raises
    ``FileNotFoundError`` naming whichever item is missing, and ``ValueError`` if both outputs
    hold the same key (the merge would have to drop one of them).
    """
    merged = _read_item(features_dir, stem, features_path(features_dir, stem))
    merged.setdefault("IMAGE_EMB_S16", merged.get("P4_S16"))   # shards store P4 once
    if merged["IMAGE_EMB_S16"] is None:
        del merged["IMAGE_EMB_S16"]
    edges = _read_item(edges_dir, stem, edges_path(edges_dir, stem))
    clash = sorted(merged.keys() & edges.keys())
    if clash:
        raise ValueError(f"{stem}: both the features and the edges file hold {clash}")
    merged.update(edges)
    return merged


def list_merged_stems(features_dir: str | Path, edges_dir: str | Path) -> list[str]:
    """Sorted stems that have both a features file and an edges file (what ``load_merged``
    can load); an image that failed in either stage is left out."""
    def stems(folder: str | Path, suffix: str) -> set[str]:
        if _is_sharded(folder):

            return set(open_features(folder, field=None))
        tail = f"{suffix}.npz"
        return {p.name[:-len(tail)] for p in Path(folder).glob(f"*{tail}")}

    return sorted(stems(features_dir, FEATURES_SUFFIX) & stems(edges_dir, EDGES_SUFFIX))
