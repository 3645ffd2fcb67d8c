"""Typed loading of ``params.yaml``.

Every stage reads one section of ``params.yaml`` plus a few shared top-level keys (``model``,
``weights``, ``seed``) into frozen dataclasses. Loading checks everything before any work starts:
an unknown key, a wrong type or an impossible value raises :class:`ParamError` whose message names
the key, what was found and what is allowed (the checking itself:
:mod:`featcache.typed_params`).

The ``runtime`` section holds the knobs that say where and how fast a stage runs (``device``,
``batch_size``, ``num_workers``) and never what it computes, so no stage lists it in dvc.yaml's
``params`` and changing one invalidates no cache. Its top level holds the defaults; a mapping
named after a stage overrides them for that stage (see :class:`RuntimeParams`).
:func:`load_stage_params` puts the merged values where the code reads them: ``shared.device``,
and ``params.batch_size`` / ``params.num_workers`` when the stage's dataclass has those fields
(``num_workers: auto`` resolved to a count). A stage section may not hold a runtime knob.

A stage module declares its own section dataclass; :func:`load_stage_params` builds it::

    @dataclass(frozen=True)
    class EdgeParams:
        sa1b: str
        out: str
        kernel_size: int = 3

        def validate(self) -> None:
            require(self.kernel_size >= 1, "kernel_size", "must be >= 1")

    shared, params = load_stage_params("edge_maps_methodB", EdgeParams)

Every path is written once (DESIGN "every path written once"):

- **The data root.** The top-level ``data`` names the folder every stage reads its inputs
  from (the download stage writes it). Where params.yaml has ``data``, the input key of each
  stage (:data:`DATA_PATHS`) is relative to it and defaults to it, so one edit
  (``dvc exp run -S data=data/raw/real``) moves every stage to other data.
- **Links.** A stage that reads another stage's output takes the path from that stage's
  section (:data:`LINKS`): ``sample_point_feats.uv_index`` is ``build_uv_index.out``, verify's
  ``clip_grid`` is ``extract_clip_grid.out`` and so on. Writing a linked key in the reading
  section is refused; dvc.yaml reads the same keys (``${build_uv_index.out}``).
- **Weights per model stage.** Each model stage may set ``weights`` in its own section
  (:data:`MODEL_SECTIONS`); the top-level ``weights`` is the default of the stages that do
  not. ``SharedParams.weights`` is what the stage uses and ``weights_key`` the key it came
  from, so an error names the key to change.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from featcache.typed_params import ParamError, build_dataclass, require

T = TypeVar("T")

PARAMS_FILE = "params.yaml"


class StageError(Exception):
    """An expected way for a stage to fail (missing weights, a bad download, too many bad
    inputs): reported in one line by :func:`featcache.engine.cli.run_stage`, without a traceback."""


@dataclass(frozen=True)
class SharedParams:
    """Top-level keys of params.yaml shared by several stages, plus the stage's device.

    ``model`` is the open_clip model of extract_clip_grid (so ``dvc exp run -S model=ViT-L-14``
    works); ``weights`` is ``random`` (seeded init, offline), ``pretrained`` (upstream default),
    an upstream tag, or a file path. ``device`` (``auto``, ``cpu``, ``cuda`` or ``cuda:<i>``) is
    not a top-level key: :func:`load_shared` fills it from ``runtime.device`` or the stage's
    ``runtime.<stage>.device``.
    """

    model: str = "ViT-B-16"
    weights: str = "random"
    device: str = "auto"
    seed: int = 0
    data: str = ""       # the data root; "" = input paths as written (no params.yaml `data`)
    weights_dir: str = "data/weights"  # download writes fetched weights here (a DVC output)
    checkpoints: str = "checkpoints"   # the user's own checkpoint files (git or `dvc add`)
    weights_key: str = "weights"  # where ``weights`` came from: weights or <stage>.weights

    def validate(self) -> None:
        require(bool(self.model.strip()), "model", "must name an open_clip model, e.g. ViT-B-16")
        require(bool(self.weights.strip()), "weights",
                "use random, pretrained, an upstream tag or a checkpoint path")
        require(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        require(self.data == "" or bool(self.data.strip()), "data",
                "must name the folder the stages read (e.g. data/raw/sample)")
        for key in ("weights_dir", "checkpoints"):
            require(bool(getattr(self, key).strip()), key, "must name a folder (a DVC dependency "
                    "of every model stage)")


def validate_device(device: str, key: str) -> None:
    """Accept ``auto``, ``cpu``, ``cuda`` and ``cuda:<index>``."""
    ok = device in ("auto", "cpu", "cuda") or (
        device.startswith("cuda:") and device[5:].isdigit())
    require(ok, key, f"got {device!r}; allowed: auto, cpu, cuda, cuda:<index>")


@dataclass(frozen=True)
class RuntimeParams:
    """Where and how fast a stage runs: the ``runtime`` section of params.yaml.

    None of these changes what a stage computes (batches never span shards, and the compute
    ``precision`` is a method param of the stage), so no stage lists ``runtime`` in dvc.yaml's
    ``params``. The top level holds the defaults and a mapping named after a stage overrides
    them for that stage::

        runtime:
          device: auto        # auto (CUDA when available) | cpu | cuda | cuda:<i>
          num_workers: auto   # DataLoader workers; auto = cores usable by this process - 1
          batch_size: 16      # items per model call
          extract_siglip: {batch_size: 32}
    """

    device: str = "auto"
    batch_size: int = 16
    num_workers: int | Literal["auto"] = "auto"

    def validate(self) -> None:
        validate_device(self.device, "device")
        require(self.batch_size >= 1, "batch_size",
                f"must be >= 1 (items per model call), got {self.batch_size}")
        require(self.num_workers == "auto" or self.num_workers >= 0, "num_workers",
                f"got {self.num_workers}; use auto (usable cores - 1) or a count >= 0 "
                "(0 = load in the main process)")

    def resolved_num_workers(self) -> int:
        """``num_workers`` as a count: ``auto`` = :func:`available_cpus` - 1, at least 0."""
        if self.num_workers == "auto":
            return max(available_cpus() - 1, 0)
        return self.num_workers


def available_cpus() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. under Slurm or taskset)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


SHARED_KEYS = ("model", "weights", "seed", "data", "weights_dir", "checkpoints")
DATA_KEY = "data"
RUNTIME_SECTION = "runtime"
RUNTIME_KEYS = tuple(f.name for f in dataclasses.fields(RuntimeParams))
STAGE_SECTIONS = ("download", "extract_clip_grid", "extract_dinov2", "extract_siglip",
                  "extract_sam2", "edge_maps_methodB", "build_uv_index", "sample_point_feats",
                  "verify")
# the input folder of each stage, relative to the top-level `data` (and `data` itself when the
# section leaves it out); the download stage writes `data`
DATA_PATHS: dict[str, str] = {
    "download": "out", "extract_clip_grid": "root", "extract_dinov2": "root",
    "extract_siglip": "coco", "extract_sam2": "images", "edge_maps_methodB": "sa1b",
    "build_uv_index": "scannet",
}
# section -> {field: the key of params.yaml it is read from}: another stage's output
LINKS: dict[str, dict[str, str]] = {
    "sample_point_feats": {"uv_index": "build_uv_index.out",
                           "clip_grid": "extract_clip_grid.out"},
    "verify": {"raw": DATA_KEY, "clip_grid": "extract_clip_grid.out",
               "dinov2": "extract_dinov2.out", "siglip": "extract_siglip.out",
               "sam2": "extract_sam2.out", "edges": "edge_maps_methodB.out",
               "uv_index": "build_uv_index.out", "uv_metrics": "build_uv_index.metrics",
               "point_feats": "sample_point_feats.out"},
}
# stages that run a model: each may set its own `weights` (else the top-level default)
MODEL_SECTIONS = ("extract_clip_grid", "extract_dinov2", "extract_siglip", "extract_sam2")
GENERIC_WEIGHTS = ("random", "pretrained")


def read_params_file(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    """Read params.yaml as a plain mapping (no validation)."""
    path = Path(path)
    if not path.is_file():
        raise ParamError(f"{path}: not found; run the stage from the repository root")
    with path.open() as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ParamError(f"{path}: the top level must be a mapping of keys")
    return data


def load_shared(data: dict[str, Any], section: str | None = None) -> SharedParams:
    """Build :class:`SharedParams` from the top-level keys of a params mapping, with ``device``
    from its ``runtime`` section (the ``runtime.<section>`` override when ``section`` is given).

    Checks every top-level key and the whole ``runtime`` section, not only what ``section`` uses.
    """
    for key in data:
        if key in RUNTIME_KEYS:
            raise ParamError(f"{key}: a runtime knob, not a top-level key; move it to "
                             f"{RUNTIME_SECTION}.{key} (no stage depends on it)")
        if key not in SHARED_KEYS and key not in STAGE_SECTIONS and key != RUNTIME_SECTION:
            raise ParamError(f"{key}: unknown top-level key; shared keys are "
                             f"{', '.join(SHARED_KEYS)}, then {RUNTIME_SECTION} and the stage "
                             f"sections {', '.join(STAGE_SECTIONS)}")
    runtime = load_runtime(data, section)
    shared = build_dataclass(SharedParams, {k: data[k] for k in SHARED_KEYS if k in data}, "")
    return dataclasses.replace(shared, device=runtime.device)


def load_runtime(data: dict[str, Any], section: str | None = None) -> RuntimeParams:
    """The ``runtime`` section of a params mapping, merged for ``section``: its defaults, then
    ``runtime.<section>``. Every override is checked, whichever stage is loading."""
    raw = data.get(RUNTIME_SECTION)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamError(f"{RUNTIME_SECTION}: expected a mapping of keys, got {raw!r}")
    for key in raw:
        if key not in RUNTIME_KEYS and key not in STAGE_SECTIONS:
            raise ParamError(f"{RUNTIME_SECTION}.{key}: unknown key; the knobs are "
                             f"{', '.join(RUNTIME_KEYS)}, and a per-stage override is a mapping "
                             f"named after a stage: {', '.join(STAGE_SECTIONS)}")
    defaults = {k: raw[k] for k in RUNTIME_KEYS if k in raw}
    base = build_dataclass(RuntimeParams, defaults, prefix=RUNTIME_SECTION)
    merged = {}
    for stage in STAGE_SECTIONS:
        override = raw.get(stage)
        if override is not None and not isinstance(override, dict):
            raise ParamError(f"{RUNTIME_SECTION}.{stage}: expected a mapping of runtime knobs "
                             f"({', '.join(RUNTIME_KEYS)}), got {override!r}")
        merged[stage] = build_dataclass(RuntimeParams, {**dataclasses.asdict(base),
                                                        **(override or {})},
                                        prefix=f"{RUNTIME_SECTION}.{stage}")
    return merged.get(section, base)


def load_stage_params(section: str, cls: type[T], path: str | Path = PARAMS_FILE,
                      ) -> tuple[SharedParams, T]:
    """Load the shared keys, the ``runtime`` knobs and the ``section`` of params.yaml.

    Returns ``(shared, params)``: ``shared.device`` and, where ``cls`` has those fields,
    ``params.batch_size`` and ``params.num_workers`` (an int, ``auto`` resolved) come from
    ``runtime`` and ``runtime.<section>``. Raises :class:`ParamError` naming the offending key
    before any work is done; a runtime knob inside the stage section is one.
    """
    data = read_params_file(path)
    if section not in data:
        raise ParamError(f"{section}: section missing from {path}")
    shared = load_shared(data, section)
    runtime = load_runtime(data, section)
    values = data[section] if data[section] is not None else {}
    if isinstance(values, dict):
        for key in RUNTIME_KEYS:
            if key in values:
                raise ParamError(f"{section}.{key}: a runtime knob, not a method param; move it "
                                 f"to {RUNTIME_SECTION}.{section}.{key} (no stage depends on "
                                 f"{RUNTIME_SECTION}, so changing it invalidates no cache)")
        shared, values = stage_weights(shared, section, values)
        values = {**values, **data_path(data, section, values), **linked_paths(data, section, values),
                  **runtime_fields(cls, section, data, runtime)}
    return shared, build_dataclass(cls, values, prefix=section)


def stage_weights(shared: SharedParams, section: str, values: dict[str, Any],
                  ) -> tuple[SharedParams, dict[str, Any]]:
    """``<section>.weights`` (model stages) moved into ``SharedParams.weights``; without it the
    top-level ``weights``. A section's weights must be a non-empty string."""
    if section not in MODEL_SECTIONS or "weights" not in values:
        return shared, values
    weights = values["weights"]
    key = f"{section}.weights"
    if not isinstance(weights, str) or not weights.strip():
        raise ParamError(f"{key}: got {weights!r}; use random, pretrained, an upstream tag of "
                         "this stage's model or a checkpoint path")
    rest = {k: v for k, v in values.items() if k != "weights"}
    return dataclasses.replace(shared, weights=weights, weights_key=key), rest


def data_path(data: dict[str, Any], section: str, values: dict[str, Any]) -> dict[str, str]:
    """The stage's input folder under the top-level ``data`` (see the module docstring)."""
    root, key = data.get(DATA_KEY), DATA_PATHS.get(section)
    if root is None or key is None:
        return {}
    if section == "download" and key in values:
        raise ParamError(f"{section}.{key}: the download stage writes the top-level "
                         f"{DATA_KEY} ({root!r}); remove {section}.{key} (a path is written once)")
    rel = values.get(key, ".")
    if not isinstance(rel, str) or Path(rel).is_absolute():
        raise ParamError(f"{section}.{key}: got {rel!r}; a folder relative to the top-level "
                         f"{DATA_KEY} ({root!r}); to read other data, change {DATA_KEY}")
    return {key: (Path(root) / rel).as_posix()}


def linked_paths(data: dict[str, Any], section: str, values: dict[str, Any]) -> dict[str, Any]:
    """The fields of ``section`` read from other stages' keys (:data:`LINKS`), where
    params.yaml has those keys; writing one in ``section`` too is refused."""
    found = {}
    for name, source in LINKS.get(section, {}).items():
        value = lookup(data, source)
        if value is None:
            continue
        if name in values:
            raise ParamError(f"{section}.{name}: remove it; it is {source} ({value!r}), "
                             "read from there so that the path is written once")
        found[name] = value
    return found


def lookup(data: Mapping[str, Any], dotted: str) -> Any:
    """``data["a"]["b"]`` for ``"a.b"``; None where a part is missing (params, provenance)."""
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def runtime_fields(cls: type, section: str, data: dict[str, Any],
                   runtime: RuntimeParams) -> dict[str, int]:
    """``batch_size`` and ``num_workers`` for the fields ``cls`` has; an override in
    ``runtime.<section>`` of a knob ``cls`` lacks is an error (it would be ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    override = (data.get(RUNTIME_SECTION) or {}).get(section) or {}
    for key in ("batch_size", "num_workers"):
        if key in override and key not in names:
            raise ParamError(f"{RUNTIME_SECTION}.{section}.{key}: {section} has no {key}; "
                             "remove it")
    values = {"batch_size": runtime.batch_size, "num_workers": runtime.resolved_num_workers()}
    return {k: v for k, v in values.items() if k in names}
