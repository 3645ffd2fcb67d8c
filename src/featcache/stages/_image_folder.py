"""The engine job over a folder of images, shared by the grid stages, ``extract_sam2`` and
``edge_maps_methodB``.

One item per image file name (in the folder's listing order), one output key per item
(``keys``). Two files with the same key: the first one listed is written, each later one is a
failure row (``duplicates`` maps it to the file that won). A stage's job subclasses
:class:`ImageFolderJob` and says how one decoded image becomes pieces (:meth:`prepare`), or
replaces the whole per-item step (:meth:`load_item`) when it does not decode pixels.

:meth:`ImageFolderJob.decode` is the one decode step (``load_image``: EXIF orientation applied,
alpha kept apart), so that a faster decoder can replace it in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from featcache.datasets.images import (
    DecodedImage,
    ImageDecodeError,
    find_duplicate_keys,
    load_image,
)
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


@dataclass(frozen=True)
class ImageFolderJob:
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
        """Decode the image (a failure row when it cannot be), then :meth:`prepare` it."""
        try:
            image = self.decode(item)
        except ImageDecodeError as e:
            return [Failure(item, FailureCode.BAD_IMAGE, e.reason)]
        return self.prepare(item, image)

    def decode(self, item: str) -> DecodedImage:
        """The decode step: the whole file, in display orientation (``load_image``)."""
        return load_image(self.folder / item)

    def prepare(self, item: str, image: DecodedImage) -> list[Piece | Failure]:
        """The pieces of one decoded image (the stage's own step)."""
        raise NotImplementedError(f"{type(self).__name__} must define prepare()")
