"""GPU benchmarks (``make bench-gpu``): skips cleanly, exit 0, without a CUDA device.

On a CUDA machine: for each encoder family, features on CUDA vs the CPU under the default
autocast (cosine, max abs diff), and extract_clip_grid end to end vs the pure forward. Its
results go into benchmarks/results-gpu.json; the README quotes them only when they were
measured on a GPU (naming it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("bench-gpu: no CUDA device visible; skipped (nothing measured, nothing written)")
        return 0
    from bench_host import run_stage, stage_params  # noqa: F401 - the GPU runs reuse them

    print("bench-gpu: a CUDA device is visible (%s), but the GPU measurements are not "
          "implemented yet; nothing written" % torch.cuda.get_device_name(0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
