"""Stage extract_dinov2: last-layer DINOv2 patch tokens as ``(hidden, g, g)`` grids.

Reads the shared keys and the ``extract_dinov2`` section of params.yaml and writes one
``<out>/<split>.h5`` per split (see :mod:`featcache.stages.extract_dinov2`).
"""

from featcache.config import load_stage_params
from featcache.stages.extract_dinov2 import STAGE, Dinov2Params, extract_dinov2
from featcache.engine.cli import run_stage


def main() -> None:
    shared, params = load_stage_params(STAGE, Dinov2Params)
    extract_dinov2(shared, params)


if __name__ == "__main__":
    run_stage(main)
