"""Stage edge_maps_methodB: Method-B edge maps of SA-1B instance masks.

Reads the ``edge_maps_methodB`` section of params.yaml and writes the sharded folder
``<out>/`` (the edge maps and flags per image stem; ``layout: npz`` adds the seed's
``<stem>_edges.npz``; see :mod:`featcache.stages.edge_maps_methodB`).
"""

from featcache.config import load_stage_params
from featcache.stages.edge_maps_methodB import STAGE, EdgeParams, run_edge_maps
from featcache.engine.cli import run_stage


def main() -> None:
    _, params = load_stage_params(STAGE, EdgeParams)
    run_edge_maps(params)


if __name__ == "__main__":
    run_stage(main)
