"""What every output records about how it was made (no timestamps, no host names: outputs
must be byte-identical across runs and machines with the same software)."""

from __future__ import annotations

import importlib.metadata

_LIBRARIES = ("featcache", "numpy", "torch", "torchvision", "open_clip_torch", "transformers",
              "sam2", "h5py", "opencv-python-headless", "pycocotools", "pillow")


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that can change a feature's value."""
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions
