"""The small vocabulary of the engine: params, pieces of work, failures, batches, results."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

from featcache.config import require
from featcache.failures import FailureCode


@dataclass(frozen=True, kw_only=True)
class EngineParams:
    """Knobs every extraction stage has. None of them changes the result.

    ``max_failures`` is a count of failed items, or a fraction of all items when < 1; more
    failures than that make the stage exit non-zero (after writing everything it could).
    ``metrics`` is where the stage's metrics JSON goes (a DVC metric).
    """

    batch_size: int = 16
    num_workers: int = 2
    max_failures: float = 0.0
    metrics: str = ""  # the stage's metrics JSON (params.yaml names it; "" = metrics/<stage>.json)
    shard_mb: float = 256.0  # average shard size (see featcache.engine.shards); a cache key

    def method_params(self) -> dict:
        """The params that determine the result, as a plain dict: everything but the engine
        knobs above (for fingerprints and provenance)."""
        knobs = {f.name for f in dataclasses.fields(EngineParams)}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in knobs}

    def validate(self) -> None:
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")
        require(self.max_failures >= 0, "max_failures",
                "must be >= 0: a count of items, or a fraction of items when < 1")
        require(self.shard_mb > 0, "shard_mb", f"must be > 0 (MiB per shard), got {self.shard_mb}")


Precision = Literal["auto", "fp32", "fp16", "bf16"]


@dataclass(frozen=True, kw_only=True)
class ModelParams(EngineParams):
    """Knobs of stages that run a model. ``precision`` is the compute precision: ``auto`` =
    autocast on CUDA (bf16 where supported, else fp16), fp32 on the CPU; ``fp32``, ``fp16`` or
    ``bf16`` to ask for one everywhere. It can change the last bits of a feature, so it is a
    dependency of the stage (unlike ``batch_size`` and ``num_workers``, it is in the
    fingerprint)."""

    precision: Precision = "auto"


@dataclass
class Piece:
    """One unit of output produced by :meth:`Job.load`.

    ``key`` names the output record (unique within one output). ``tensor`` is the model input
    (``[3,H,W]`` float32 for image encoders) or ``None`` for model-free jobs; ``arrays`` are
    per-piece arrays handed to ``compute`` (or, without a model, the output fields themselves).
    """

    key: str
    tensor: object | None = None  # torch.Tensor; typed loosely so this module stays torch-free
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class Failure:
    """An item (or part of one) that could not be processed: one row of ``failures.tsv``.

    ``error`` is a :class:`~featcache.failures.FailureCode` (a plain string of one is turned
    into it; any other string is a ``ValueError``: the vocabulary is closed)."""

    item: str
    error: FailureCode
    message: str

    def __post_init__(self) -> None:
        if self.error not in _CODES:
            raise ValueError(f"failure code {self.error!r} of {self.item!r} is not a "
                             "featcache.failures.FailureCode; add it there (and to the README)")
        object.__setattr__(self, "error", FailureCode(self.error))

    @classmethod
    def duplicate_key(cls, item: str, key: str, earlier: str) -> Failure:
        """``item`` would be written under ``key``, which ``earlier`` already takes (and wins)."""
        return cls(item, FailureCode.DUPLICATE_KEY,
                   f"key {key!r} is already taken by {earlier}, which is written instead")


_CODES = frozenset(c.value for c in FailureCode)


class Job(Protocol):
    """A picklable description of the work of one output: paths and params, never a model.

    Optional: ``input_bytes``, the largest model input (``Piece.tensor``) one piece carries;
    past 4 MB the engine hands such inputs over through shared slots
    (:mod:`featcache.engine.slots`)."""

    def items(self) -> list[str]:
        """Stable work items (e.g. relative image paths) in a deterministic order."""

    def load(self, item: str) -> list[Piece | Failure]:
        """Decode and preprocess one item; runs in DataLoader worker processes."""

    def signature(self, item: str) -> str:
        """What the item's result depends on besides the method: a content signature of the
        files it reads (``featcache.engine.file_signature``) and any annotation it uses."""


@dataclass
class Batch:
    """Pieces from many items, stacked for one model call.

    ``inputs`` is ``[B, ...]`` (the pieces' tensors stacked) or ``None``; ``arrays[name][i]``
    belongs to ``keys[i]``.
    """

    keys: list[str]
    inputs: object | None
    arrays: dict[str, list[np.ndarray]]


@dataclass
class RunResult:
    """What one :func:`run_job` did; summed into the stage's metrics."""

    output: str
    items: int = 0
    computed: int = 0      # items loaded and computed in this run
    reused: int = 0        # items whose rows came from an earlier shard (no model work)
    shards: int = 0
    bytes_written: int = 0  # feature bytes written into shards by this process
    finalized: bool = False  # the output was moved into place (not in compute-only mode)
    failed: int = 0
    records: int = 0
    wall_s: float = 0.0
    compute_s: float = 0.0
    compute_cpu_s: float = 0.0   # the main thread's CPU in compute (device-side work on a CPU)
    device: str = "cpu"
    failures: list[Failure] = field(default_factory=list)
