"""A toy extraction used by the engine tests: run as a script (also under torchrun).

Usage: python engine_toy.py OUT WRITER [--items N] [--sleep S] [--bad]
Items are "i000".."i{N-1}"; each yields two pieces whose tensors encode the item number;
compute sums and scales them, sleeping S seconds per batch so a test can kill it mid-run.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch

from featcache.engine import Batch, EngineParams, Failure, Piece, WriterOptions, finish_stage, run_job


class ToyJob:
    def __init__(self, n: int, bad: bool) -> None:
        self.n, self.bad = n, bad

    def items(self) -> list[str]:
        return [f"i{i:03d}" for i in range(self.n)]

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
        self.sleep, self.calls = sleep, []

    def __call__(self, batch: Batch) -> dict[str, np.ndarray]:
        self.calls.append(len(batch.keys))
        time.sleep(self.sleep)
        x = batch.inputs
        return {"feat": (x.flatten(1) * 0.5).numpy(), "sum": x.sum(dim=(1, 2, 3)).numpy()}


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("writer")
    ap.add_argument("--items", type=int, default=100)
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--bad", action="store_true")
    ap.add_argument("--workers", type=int, default=0)
    args = ap.parse_args()
    params = EngineParams(batch_size=7, num_workers=args.workers, max_failures=0.5)
    result = run_job(ToyJob(args.items, args.bad), ToyCompute(args.sleep), stage="toy", out=args.out,
                     writer=args.writer, writer_options=WriterOptions(dtype="fp16"),
                     provenance={"model": "toy"}, fingerprint={"items": args.items, "bad": args.bad},
                     params=params)
    finish_stage("toy", Path(args.out).parent, [result], params)


if __name__ == "__main__":
    main()
