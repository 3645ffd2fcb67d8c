"""The engine job over a folder of images, shared by the grid stages, ``extract_sam2`` and
``edge_maps_methodB``.

One item per image file name (in the folder's listing order), one output key per item
(``keys``). Two files with the same key: the first one listed is written, each later one is a
failure row (``duplicates`` maps it to the file that won). A stage's job subclasses
:class:`ImageFolderJob` and says how one file is decoded (:meth:`~ImageFolderJob.decode`) and
how the decoded file becomes pieces (:meth:`~ImageFolderJob.prepare`), or replaces the whole
per-item step (:meth:`~ImageFolderJob.load_item`) when it does not decode pixels.

:meth:`ImageFolderJob.load_item` is the one place where a file that does not decode
(``ImageDecodeError``) becomes a ``bad_image`` row. What ``decode`` returns is the stage's: the
model stages decode and preprocess along their preprocessing path
(``featcache.encoders.preprocess.prepare_file``; the encoders are theirs to import, not this
module's, so that a model-free stage's code deps stay free of them).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from featcache.datasets.images import ImageDecodeError, find_duplicate_keys
from featcache.engine import file_signature
from featcache.engine.types import Failure, Piece
from featcache.failures import FailureCode


def stem_key(name: str) -> str:
    """The default output key of an image file: its stem (``sa_1.jpg`` -> ``sa_1``)."""
    return Path(name).stem


def index_folder(names: Sequence[str], key: Callable[[str], str] = stem_key,
                 ) -> tuple[tuple[str, ...], dict[str, str], dict[str, str]]:
    """``(names, {name: key}, {later name: earlier name with the same key})`` of a listing."""
    keys = {n: key(n) for n in names}
    return tuple(names), keys, find_duplicate_keys(list(names), keys.__getitem__)


Decoded = TypeVar("Decoded")   # what a stage's decode step makes of one file


@dataclass(frozen=True)
class ImageFolderJob(Generic[Decoded]):
    """Engine job of one image folder (see the module docstring). Picklable: paths, keys and
    preprocessing settings, never a model; :meth:`load` runs in DataLoader workers.

    ``signature`` hashes the file's content (:meth:`signature_files`) and
    :meth:`signature_extra` (by default the earlier file it duplicates, so that removing that
    one turns this item from a failure into features)."""

    folder: Path
    names: tuple[str, ...]
    keys: Mapping[str, str]
    duplicates: Mapping[str, str]

    def items(self) -> list[str]:
        return list(self.names)

    def signature_files(self, item: str) -> list[Path]:
        return [self.folder / item]

    def signature_extra(self, item: str) -> str:
        return self.duplicates.get(item, "")

    def signature(self, item: str) -> str:
        return file_signature(self.signature_files(item), extra=self.signature_extra(item))

    def load(self, item: str) -> list[Piece | Failure]:
        """A duplicate's failure row, or :meth:`load_item`'s pieces."""
        if item in self.duplicates:
            return [Failure.duplicate_key(item, self.keys[item], self.duplicates[item])]
        return self.load_item(item)

    def load_item(self, item: str) -> list[Piece | Failure]:
        """:meth:`decode` the file (a ``bad_image`` row when it cannot be), then
        :meth:`prepare` it."""
        try:
            decoded = self.decode(item)
        except ImageDecodeError as e:
            return [Failure(item, FailureCode.BAD_IMAGE, e.reason)]
        return self.prepare(item, decoded)

    def decode(self, item: str) -> Decoded:
        """The decode step of ``folder / item`` (the stage's own); raises ``ImageDecodeError``
        for a file that does not decode completely."""
        raise NotImplementedError(f"{type(self).__name__} must define decode()")

    def prepare(self, item: str, decoded: Decoded) -> list[Piece | Failure]:
        """The pieces of one decoded file (the stage's own step)."""
        raise NotImplementedError(f"{type(self).__name__} must define prepare()")
