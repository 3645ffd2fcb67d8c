"""featcache: reproducible caches of visual features, built as a DVC pipeline.

``featcache.open_features(path)`` and ``featcache.FeatureDataset`` (the training-side reader,
:mod:`featcache.reader`) are loaded on first access, so ``import featcache`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from featcache.reader import FeatureDataset, FeatureStore, open_features

_LAZY = ("open_features", "FeatureDataset", "FeatureStore")
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from featcache import reader

        return getattr(reader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
