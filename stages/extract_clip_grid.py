"""Stage extract_clip_grid: last-layer patch grids of the open_clip model ``model``.

Reads the shared keys and the ``extract_clip_grid`` section of params.yaml and writes one
``<out>/<split>.h5`` per split (see :mod:`featcache.stages.extract_clip_grid`).
"""

from featcache.stages.extract_clip_grid import STAGE, ClipGridParams, extract_clip_grid
from featcache.config import load_stage_params
from featcache.engine.cli import run_stage


def main() -> None:
    shared, params = load_stage_params(STAGE, ClipGridParams)
    extract_clip_grid(shared, params)


if __name__ == "__main__":
    run_stage(main)
