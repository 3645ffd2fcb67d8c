"""torchrun support: which shard is mine, and a barrier.

Under ``torchrun --nproc_per_node N`` (``WORLD_SIZE > 1``) the engine initialises a process
group (nccl when CUDA is available, gloo otherwise), rank r computes shards r, r+N, r+2N, ...
into the shared scratch area, and rank 0 moves them into the output after a barrier. The number of
processes is never a parameter: it does not change the result.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch

_TIMEOUT = datetime.timedelta(hours=12)  # rank 0 may assemble a large output while others wait


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def sum_counts(self, results: list) -> None:
        """Sum ``computed`` and ``reused`` of every rank into each result (every rank works
        on its own shards; the metrics count them all)."""
        if self.world <= 1 or not results:
            return
        device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
        counts = torch.tensor([[r.computed, r.reused] for r in results], dtype=torch.int64,
                              device=device)
        torch.distributed.all_reduce(counts)
        for r, (computed, reused) in zip(results, counts.tolist()):
            r.computed, r.reused = computed, reused


def init_distributed() -> DistContext:
    """Read torchrun's environment and initialise the process group once (idempotent)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group(backend=backend, timeout=_TIMEOUT)
    return DistContext(rank=rank, world=world, local_rank=local_rank)


def rank_device(device: torch.device, ctx: DistContext) -> torch.device:
    """Under torchrun, a bare ``cuda`` device means this rank's local GPU."""
    if ctx.world > 1 and device.type == "cuda" and device.index is None:
        return torch.device("cuda", ctx.local_rank)
    return device


def shutdown_distributed() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
