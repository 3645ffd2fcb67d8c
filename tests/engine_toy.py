"""A toy extraction used by the engine tests: run as a script (also under torchrun).

Usage: python engine_toy.py OUT LAYOUT [--items N] [--drop i,j] [--sleep S] [--bad]
       [--workers W] [--shard-mb MB]
Items are "i000".."i{N-1}" minus the dropped ones; each yields two pieces whose tensors encode
the item number; compute scales and sums them, sleeping S seconds per batch so a test can kill
it mid-run. Every item stores ~1 KiB (ITEM_BYTES), so --shard-mb 0.01 gives ~10 items a shard.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch

from featcache.engine import Batch, EngineParams, Failure, Piece, WriterOptions, finish_stage, run_job

ITEM_BYTES = 1024


class ToyJob:
    def __init__(self, n: int, bad: bool, drop: frozenset[int] = frozenset()) -> None:
        self.n, self.bad, self.drop = n, bad, drop

    def items(self) -> list[str]:
        return [f"i{i:03d}" for i in range(self.n) if i not in self.drop]

    def signature(self, item: str) -> str:
        return f"toy input {item}"

    def load(self, item: str) -> list[Piece | Failure]:
        i = int(item[1:])
        if self.bad and i % 17 == 5:
            raise ValueError(f"corrupt input {item}")
        if self.bad and i % 17 == 6:
            return [Failure(item, "empty_mask", "nothing to encode"), Piece(f"{item}_a", torch.full((3, 4, 4), float(i)))]
        rng = np.random.default_rng(i)
        x = torch.from_numpy(rng.standard_normal((3, 4, 4)).astype(np.float32))
        return [Piece(f"{item}_a", x), Piece(f"{item}_b", -x)]


class ToyCompute:
    def __init__(self, sleep: float) -> None:
        self.sleep, self.calls, self.batches = sleep, [], []

    def __call__(self, batch: Batch) -> dict[str, np.ndarray]:
        self.calls.append(len(batch.inputs))
        self.batches.append(list(batch.keys))
        time.sleep(self.sleep)
        x = batch.inputs
        return {"feat": (x.flatten(1) * 0.5).numpy(), "sum": x.sum(dim=(1, 2, 3)).numpy()}


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("layout")
    ap.add_argument("--items", type=int, default=100)
    ap.add_argument("--drop", default="")
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--bad", action="store_true")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--shard-mb", type=float, default=0.01)
    args = ap.parse_args()
    drop = frozenset(int(x) for x in args.drop.split(",") if x)
    params = EngineParams(batch_size=7, num_workers=args.workers, max_failures=0.5,
                          shard_mb=args.shard_mb)
    result = run_job(ToyJob(args.items, args.bad, drop), ToyCompute(args.sleep), stage="toy",
                     out=args.out, writer=args.layout, writer_options=WriterOptions(dtype="fp16"),
                     provenance={"model": "toy"}, fingerprint={"bad": args.bad},
                     params=params, item_bytes=ITEM_BYTES)
    finish_stage("toy", Path(args.out).parent, [result], params)


if __name__ == "__main__":
    main()
