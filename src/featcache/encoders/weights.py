"""Where model weights come from, and their identity.

``weights`` in params is one of:

- ``random``: seeded random initialisation, built without downloading anything (offline demo,
  tests). Every load logs a WARNING; the identity is ``random(seed=<seed>)``.
- ``pretrained``: the upstream default for the model (open_clip's first listed tag, e.g.
  ``openai`` for ViT-B-16 and ``webli`` for ViT-B-16-SigLIP; ``facebook/dinov2-*`` on the HF hub;
  the official SAM2/SAM2.1 checkpoint).
- an upstream tag (an open_clip tag, an HF repo id): the identity is the tag.
- a file (or, for DINOv2, a ``save_pretrained`` folder) path: the identity is
  ``sha256:<hex>`` of its bytes.

A tag is resolved in this order: ``data/weights/`` (relative to the working directory, or
``$FEATCACHE_WEIGHTS_DIR``), the library's local cache (the HF hub cache, open_clip's URL cache),
then a download unless ``HF_HUB_OFFLINE`` is set. When nothing is found the caller gets one
:class:`WeightsNotFoundError` naming what was looked for, where, and how to supply it.
Checkpoints are read with safetensors or ``torch.load(weights_only=True)``, never unpickled.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import random
import warnings
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from featcache.config import ParamError, SharedParams, StageError
from featcache.engine.cli import checkpoint_refusal

log = logging.getLogger(__name__)

RANDOM = "random"
PRETRAINED = "pretrained"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz")


class WeightsNotFoundError(StageError, FileNotFoundError):
    """Weights were asked for by tag but are in none of the places looked at."""


class UnsafeCheckpointError(StageError, ValueError):
    """A checkpoint holds pickled Python objects or code: refused, never unpickled."""


def is_random(weights: str) -> bool:
    return weights == RANDOM


def random_weights_id(seed: int) -> str:
    return f"random(seed={seed})"


def looks_like_path(weights: str) -> bool:
    """A file/folder path rather than a tag: it exists, has a checkpoint suffix, or starts
    like a path (``/``, ``.``, ``~``). HF repo ids (``org/name``) are tags."""
    if weights in (RANDOM, PRETRAINED):
        return False
    p = Path(weights).expanduser()
    return (p.exists() or p.suffix.lower() in CHECKPOINT_SUFFIXES
            or weights.startswith(("/", ".", "~")))


def weights_dir() -> Path:
    """Folder of locally supplied weights: ``$FEATCACHE_WEIGHTS_DIR`` or ``data/weights``."""
    return Path(os.environ.get("FEATCACHE_WEIGHTS_DIR", "data/weights"))


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` read now (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hf_cache_dir() -> str | None:
    """The HF hub cache as the environment says now (None: huggingface_hub's default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def hf_cached_file(repo_id: str, filename: str) -> Path | None:
    """A file of an HF repo if it is already in the local hub cache (no network)."""
    from huggingface_hub import try_to_load_from_cache  # deferred: it reads HF_HUB_OFFLINE at import

    found = try_to_load_from_cache(repo_id, filename, cache_dir=hf_cache_dir())
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def hf_download(repo_id: str, filename: str) -> Path:
    """Download one file of an HF repo into the hub cache (network; tests replace this)."""
    from huggingface_hub import hf_hub_download  # deferred: it reads HF_HUB_OFFLINE at import

    return Path(hf_hub_download(repo_id=repo_id, filename=filename, cache_dir=hf_cache_dir()))


def url_download(url: str) -> Path:
    """Download a URL into open_clip's cache (``~/.cache/clip``), checksum-checked by open_clip
    when the URL carries one (network; tests replace this)."""
    from open_clip.pretrained import download_pretrained_from_url

    return Path(download_pretrained_from_url(url))


def locate_weights(what: str, local: Sequence[Path], cached: Callable[[], Path | None],
                   download: Callable[[], Path], how: str) -> Path:
    """First of: an existing ``local`` path, ``cached()``, ``download()`` (skipped when
    ``HF_HUB_OFFLINE`` is set). Raises :class:`WeightsNotFoundError` naming ``what`` was looked
    for, every place tried, and ``how`` to supply it."""
    for path in local:
        if path.exists():
            log.info("weights for %s: %s", what, path)
            return path
    found = cached()
    if found is not None:
        log.info("weights for %s from the local cache: %s", what, found)
        return found
    places = describe_paths(local) + "; the local HF hub/open_clip cache"
    if hub_offline():
        raise WeightsNotFoundError(
            f"weights for {what} not found in {places}, and HF_HUB_OFFLINE is set so nothing "
            f"was downloaded. {how}")
    log.info("downloading weights for %s", what)
    try:
        return download()
    except Exception as e:  # any network/hub failure ends in the same actionable message
        raise WeightsNotFoundError(
            f"weights for {what} not found in {places}, and the download failed ({e}). {how}"
        ) from e


def describe_paths(paths: Sequence[Path]) -> str:
    """Compact listing grouped by folder: ``data/weights/M/{a.bin, b.safetensors}; ...``."""
    groups: dict[Path, list[str]] = {}
    for p in paths:
        groups.setdefault(p.parent, []).append(p.name)
    return "; ".join(f"{folder}/{names[0]}" if len(names) == 1
                     else f"{folder}/{{{', '.join(names)}}}" for folder, names in groups.items())


def sha256_path(path: str | Path) -> str:
    """``sha256:<hex>`` of a file, or of a folder (relative names and bytes of every file,
    in sorted order)."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return f"sha256:{h.hexdigest()}"


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch so a random initialisation is reproducible."""
    import torch  # deferred: resolving a weights name needs no torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def warn_random(what: str, seed: int) -> None:
    log.warning("%s: weights are RANDOM (seed=%d); features are not meaningful "
                "(set weights: pretrained or a checkpoint path for real features)", what, seed)


def load_state_dict_file(path: str | Path) -> dict[str, Any]:
    """A checkpoint's tensors: safetensors, ``torch.load(weights_only=True)``, or for a
    TorchScript archive (OpenAI's original CLIP ``.pt`` files) the archive's ``state_dict()``
    read with ``torch.jit.load`` (TorchScript's restricted unpickler, no Python classes)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    import torch  # deferred: resolving a weights name needs no torch

    if is_torchscript_archive(path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return dict(torch.jit.load(str(path), map_location="cpu").state_dict())


    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:   # torch's message would suggest the unsafe option
        raise UnsafeCheckpointError(checkpoint_refusal(e, path)) from None


def is_torchscript_archive(path: str | Path) -> bool:
    """A zip holding ``<root>/constants.pkl`` and ``<root>/code/`` (what ``torch.jit.save``
    writes); ``torch.save`` archives have neither."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def resolve_stage_spec(resolve: Callable[..., Any], name: str, *, stage: str,
                       shared: SharedParams, **options: Any) -> Any:
    """``resolve(name, weights=..., seed=..., **options)`` (a family's ``resolve_*_spec``) for
    the model stage ``stage``, with a ``weights`` error renamed to the key the value came
    from (``<stage>.weights``, or the top-level ``weights`` default): a tag or checkpoint that
    does not fit this stage's model family is refused, never applied.

    A checkpoint path must lie inside ``shared.checkpoints`` or ``shared.weights_dir``, the two
    folders every model stage lists as DVC dependencies, so that replacing the file re-runs the
    stage. The encoders look for fetched weights in ``shared.weights_dir`` (published to this
    process and its workers as ``$FEATCACHE_WEIGHTS_DIR``)."""
    weights, weights_key, seed = shared.weights, shared.weights_key, shared.seed
    os.environ["FEATCACHE_WEIGHTS_DIR"] = shared.weights_dir
    try:
        spec = resolve(name, weights=weights, seed=seed, **options)
    except ParamError as e:
        message = str(e)
        if not message.startswith("weights:"):
            raise
        hint = ""
        if weights_key == "weights" and weights not in (RANDOM, PRETRAINED):
            hint = (f" (the top-level weights is the default of every model stage; set "
                    f"{stage}.weights for the stage whose model it fits, and keep the "
                    f"top-level weights random or pretrained)")
        raise ParamError(f"{weights_key}{message[len('weights'):]}{hint}") from None
    check_tracked_checkpoint(weights, weights_key, (shared.checkpoints, shared.weights_dir))
    return spec


def check_tracked_checkpoint(weights: str, key: str, folders: Sequence[str]) -> None:
    """Refuse a checkpoint path outside ``folders`` (DVC would not see it change)."""
    if not looks_like_path(weights):
        return
    path = Path(weights).expanduser().resolve()
    for folder in folders:
        if path.is_relative_to(Path(folder).resolve()):
            return
    raise ParamError(
        f"{key}: {weights} is outside {' and '.join(f'{f}/' for f in folders)}, the folders the "
        f"model stages depend on, so DVC would not re-run the stage when the file changes; "
        f"copy it into {folders[0]}/ (cp {weights} {folders[0]}/, then git add or dvc add it) "
        f"and set {key}: {folders[0]}/{Path(weights).name}")
